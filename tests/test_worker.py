"""The worker's engine as a plain function, against the LLM simulator over
real HTTP: one job, several jobs sharing one worker, several workers
sharing one job."""

import asyncio
import gc
import queue
import threading
import time
from collections import Counter

import pytest
from django.db import connection
from django_q.signals import post_spawn

from extraction.extract import RowOutcome
from extraction.llm import LLMCallError
from extraction.render import render_row
from jobs.apps import BACKGROUND_SWEEPS
from jobs.models import ExtractJob, ExtractRow, Property, WorkerSlots
from jobs.services import claims, lifecycle, recovery
from jobs.services.sql import ClaimedRow
from jobs.sweeper import start_background_sweeps
from jobs.worker.callpool import CallPool, LoopThread
from jobs.worker.engine import Engine, WorkerSettings
from tests.factories import make_job, simple_rows


def worker_settings(sim, **overrides) -> WorkerSettings:
    config = {
        "poll_seconds": 0.05,
        "lease_seconds": 60,
        "api_key": "sim-key",
        "base_url": sim.base_url,
        "llm_timeout": 10.0,
        "max_attempts": 3,
        "retry_base": 0.01,
        "retry_max": 0.05,
        "structured_output": True,
    }
    config.update(overrides)
    return WorkerSettings(**config)


def run_job(job, sim, **overrides) -> str:
    """A worker serving only this job, until it is done or stops running."""
    lifecycle.job_mark_running(job_id=job.id)
    return Engine(worker_settings(sim, **overrides), job_id=job.id).run()


def run_workers(sim, workers: int = 1, meanwhile=None, **overrides) -> list[str]:
    """Workers serving every job, as worker processes would, each on a
    thread of its own (with its own connection) until no job has rows left
    for it; `meanwhile` runs on this thread while they work."""
    outcomes = []

    def run():
        try:
            outcomes.append(Engine(worker_settings(sim, **overrides)).run())
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(workers)]
    for thread in threads:
        thread.start()
    if meanwhile is not None:
        meanwhile()
    for thread in threads:
        thread.join()
    return outcomes


def run_at_once(job, sim, runners: int = 2, meanwhile=None) -> None:
    """Several runners on one job, as several worker processes would be,
    each on a thread of its own (with its own connection); `meanwhile`
    runs on this thread while they work."""

    def run():
        try:
            run_job(job, sim)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(runners)]
    for thread in threads:
        thread.start()
    if meanwhile is not None:
        meanwhile()
    for thread in threads:
        thread.join()


@pytest.mark.django_db
def test_worker_extracts_every_row_of_the_airline_data(user, sim, airline_rows):
    rows = airline_rows[:12]
    job = make_job(user, rows, max_workers=4, temperature=0.0, top_p=0.9, max_tokens=3000)

    run_job(job, sim)

    job.refresh_from_db()
    assert (job.state, job.count_done, job.count_failed) == ("done", 12, 0)
    assert job.properties_count == Property.objects.filter(job=job).count() > 12 * 2
    assert job.prompt_tokens > 0
    assert job.completion_tokens > 0
    for row in ExtractRow.objects.filter(job=job):
        transcript = render_row(row.data, "single_model")
        properties = list(row.properties.all())
        assert row.status == "done"
        assert len(properties) >= 3
        for prop in properties:
            assert prop.model == row.data["model"]
            assert prop.question_id == row.question_id
            assert all(quote in transcript for quote in prop.evidence)
    requests = sim.requests()
    assert len(requests) == 12
    assert {(r["temperature"], r["top_p"], r["max_tokens"]) for r in requests} == {(0.0, 0.9, 3000)}


@pytest.mark.django_db
def test_worker_keeps_calls_in_flight_within_max_workers(user, sim):
    # Long enough for all three calls to be in flight together on a busy machine.
    sim.configure(latency_ms=500)
    job = make_job(user, simple_rows(12), max_workers=3)

    run_job(job, sim)

    assert sim.stats()["max_in_flight"] == 3
    assert ExtractJob.objects.get(pk=job.id).count_done == 12


@pytest.mark.django_db
def test_worker_fails_a_row_with_a_bad_answer_and_goes_on(user, sim):
    rows = simple_rows(3)
    rows[1]["prompt"] += " [[sim:bad_json]]"
    job = make_job(user, rows)

    run_job(job, sim)

    job.refresh_from_db()
    assert (job.state, job.count_done, job.count_failed) == ("done", 2, 1)
    failed = ExtractRow.objects.get(job=job, index=1)
    assert (failed.status, failed.attempts) == ("failed", 2)  # asked once more first
    assert failed.error == (
        "no valid property in the LLM answer, asked twice. First answer: no JSON found in the answer. "
        "Second answer: no JSON found in the answer"
    )
    assert failed.raw_answer != ""
    assert failed.properties.count() == 0
    assert len(sim.requests()) == 4


@pytest.mark.django_db
def test_worker_retries_server_errors_within_the_attempt_budget(user, sim):
    rows = simple_rows(2)
    rows[0]["prompt"] += " [[sim:500x2]]"
    rows[1]["prompt"] += " [[sim:500x5]]"
    job = make_job(user, rows)

    run_job(job, sim, max_attempts=3)

    recovered, exhausted = ExtractRow.objects.filter(job=job).order_by("index")
    assert (recovered.status, recovered.attempts) == ("done", 3)
    assert (exhausted.status, exhausted.attempts) == ("failed", 3)
    assert exhausted.error == (
        "LLM error 500: The server had an error processing your request (simulated); gave up after 3 attempts"
    )


@pytest.mark.django_db
def test_worker_fails_the_job_at_once_on_bad_credentials(user, sim):
    sim.configure(api_key="the-right-key")
    job = make_job(user, simple_rows(40), max_workers=4)

    run_job(job, sim, api_key="a-wrong-key")

    job.refresh_from_db()
    assert (job.state, job.error) == (
        "error",
        "the LLM provider refused the API key (401): Incorrect API key provided; check OPENAI_API_KEY",
    )
    assert len(sim.requests()) <= 4
    assert "a-wrong-key" not in job.error


@pytest.mark.django_db
def test_worker_stops_claiming_when_its_claim_time_is_up_and_finishes_what_it_holds(user, sim):
    sim.configure(latency_ms=100)
    job = make_job(user, simple_rows(40), max_workers=2)

    outcome = run_job(job, sim, claim_seconds=0.3)

    job.refresh_from_db()
    assert outcome.endswith("; claim time is up")
    assert (job.state, job.count_failed) == ("running", 0)
    assert 0 < job.count_done < 40
    assert ExtractRow.objects.filter(job=job, status="pending").count() == 40 - job.count_done
    assert len(sim.requests()) == job.count_done  # every row it claimed was called and recorded


@pytest.mark.django_db
def test_worker_makes_no_call_for_a_cancelled_job(user, sim):
    job = make_job(user, simple_rows(3))
    lifecycle.job_cancel(job=job)

    outcome = Engine(worker_settings(sim), job_id=job.id).run()

    assert outcome == "recorded 0 rows; the job stopped running"
    assert sim.requests() == []


@pytest.mark.django_db(transaction=True)
def test_worker_aborts_calls_in_flight_the_moment_the_job_is_cancelled(user, sim, no_background_worker):
    # Calls that would take a minute: only an abort ends them (how soon is
    # benchmark #3's figure).
    sim.configure(latency_ms=60_000)
    job = make_job(user, simple_rows(10), max_workers=4)
    cancelled_at = {}

    def cancel_with_every_slot_busy():
        deadline = time.monotonic() + 60
        while sim.stats()["in_flight"] < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        cancelled_at["t"] = time.monotonic()
        try:
            lifecycle.job_cancel(job=ExtractJob.objects.get(pk=job.id))
        finally:
            connection.close()  # this thread's own connection

    canceller = threading.Thread(target=cancel_with_every_slot_busy)
    canceller.start()
    run_job(job, sim)
    returned = time.monotonic()
    canceller.join()

    assert returned - cancelled_at["t"] < 30
    requests = sim.requests()
    assert len(requests) == 4
    assert {r["outcome"] for r in requests} == {"aborted"}
    assert max(r["ended_at"] - r["started_at"] for r in requests) < 30
    assert Property.objects.filter(job=job).count() == 0
    assert ExtractJob.objects.get(pk=job.id).properties_count == 0


@pytest.mark.django_db(transaction=True)
def test_two_workers_on_one_job_share_its_max_workers(user, sim, no_background_worker):
    # No answer comes back before both runners are on the job.
    sim.configure(latency_ms=100, paused=True)
    job = make_job(user, simple_rows(48), max_workers=4)

    def both_on_the_job():
        deadline = time.monotonic() + 60
        while WorkerSlots.objects.filter(job=job).count() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        sim.configure(paused=False)

    run_at_once(job, sim, meanwhile=both_on_the_job)

    job.refresh_from_db()
    assert (job.state, job.count_done) == ("done", 48)
    assert sim.stats()["max_in_flight"] == 4
    rows_by_worker = Counter(ExtractRow.objects.filter(job=job).values_list("claimed_by", flat=True))
    assert len(rows_by_worker) == 2
    assert min(rows_by_worker.values()) >= 8
    assert not WorkerSlots.objects.exists()  # each worker gave its grant back


@pytest.mark.django_db(transaction=True)
def test_a_worker_whose_calls_outlast_the_lease_keeps_its_rows(user, sim, settings, no_background_worker):
    settings.STRINGSIGHT_LEASE_SECONDS = 2
    sim.configure(latency_ms=5000)
    job = make_job(user, simple_rows(4), max_workers=4)
    finished, taken_by_rival = threading.Event(), []

    def rival():
        """Once the worker holds every row: another worker on the job, and
        the sweep, as often as they can."""
        try:
            while ExtractRow.objects.filter(job=job, status="running").count() < 4:
                if finished.wait(0.05):
                    return
            while not finished.wait(0.05):
                recovery.sweep()
                taken_by_rival.extend(claims.claim_rows(job_id=job.id, worker_id="rival", limit=4).rows)
        finally:
            connection.close()

    thread = threading.Thread(target=rival)
    thread.start()
    try:
        run_job(job, sim, lease_seconds=2)
    finally:
        finished.set()
        thread.join()

    job.refresh_from_db()
    rows = list(ExtractRow.objects.filter(job=job))
    assert (job.state, job.count_done) == ("done", 4)
    assert taken_by_rival == []
    assert {(row.status, row.lease_expiries) for row in rows} == {("done", 0)}  # never released
    assert len({row.claimed_by for row in rows}) == 1
    requests = sim.requests()
    assert len(requests) == len({r["user_sha256"] for r in requests}) == 4  # each row asked once
    assert min(r["ended_at"] - r["started_at"] for r in requests) > 4  # each call outlasted the lease


def test_no_call_of_a_job_starts_after_its_fatal_answer_and_other_jobs_go_on():
    loop_thread = LoopThread()
    results: queue.SimpleQueue = queue.SimpleQueue()
    pool = CallPool(loop_thread.loop, results, is_fatal=lambda answer: isinstance(answer, LLMCallError))
    started = []

    def call(index, fatal=False):
        async def run():
            started.append(index)
            if fatal:
                raise LLMCallError("LLM authentication failed (401)", fatal_for_job=True, attempts=1)
            return RowOutcome()

        return ClaimedRow(id=index, index=index, question_id=f"q{index}", data={}), run

    pool.add("failing", [call(0, fatal=True), call(1)])
    pool.set_cap("failing", 1)
    job, row, answer = results.get(timeout=5)
    pool.add("failing", [call(2)])
    pool.set_cap("failing", 5)
    pool.add("other", [call(10), call(11)])
    pool.set_cap("other", 1)
    arrived = [results.get(timeout=5)[:2], results.get(timeout=5)[:2]]

    assert (job, row.index, type(answer)) == ("failing", 0, LLMCallError)
    assert [(job, row.index) for job, row in arrived] == [("other", 10), ("other", 11)]
    assert started == [0, 10, 11]
    assert pool.counts("failing") == (0, 0)
    loop_thread.close()


def test_stopping_a_job_cancels_its_calls_in_flight_and_not_another_jobs():
    loop_thread = LoopThread()
    results: queue.SimpleQueue = queue.SimpleQueue()
    pool = CallPool(loop_thread.loop, results, is_fatal=lambda answer: False)
    release = asyncio.Event()
    cancelled = []

    def call(index):
        async def run():
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.append(index)
                raise
            return RowOutcome()

        return ClaimedRow(id=index, index=index, question_id=f"q{index}", data={}), run

    pool.add("stopped", [call(0), call(1), call(2)])
    pool.add("going-on", [call(10), call(11)])
    pool.set_cap("stopped", 2)
    pool.set_cap("going-on", 2)
    deadline = time.monotonic() + 30
    while pool.total_in_flight() < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.stop("stopped")
    while pool.counts("stopped")[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    loop_thread.loop.call_soon_threadsafe(release.set)
    arrived = sorted(results.get(timeout=30)[1].index for _ in range(2))

    assert sorted(cancelled) == [0, 1]
    assert arrived == [10, 11]
    assert pool.counts("stopped") == (0, 0)  # the third row never started
    assert results.empty()
    loop_thread.close()


def test_a_spawned_qcluster_process_hides_its_long_lived_objects_and_starts_sweeping():
    # The background sweeps would outlive the test in this process: a stand-in records their start.
    assert post_spawn.disconnect(dispatch_uid=BACKGROUND_SWEEPS)
    sweeps_started = []
    post_spawn.connect(
        lambda proc_name, **kwargs: sweeps_started.append(proc_name),
        dispatch_uid=BACKGROUND_SWEEPS,
        weak=False,
    )
    gc.unfreeze()
    try:
        post_spawn.send(sender="django_q", proc_name="Process-1")

        assert gc.get_freeze_count() > 10_000  # Django, the SDK, every module
        # The worker's own code too: frozen objects are no longer tracked.
        assert not any(tracked is Engine._poll for tracked in gc.get_objects())
        assert sweeps_started == ["Process-1"]
    finally:
        gc.unfreeze()
        post_spawn.disconnect(dispatch_uid=BACKGROUND_SWEEPS)
        post_spawn.connect(start_background_sweeps, dispatch_uid=BACKGROUND_SWEEPS)


# Several jobs sharing one worker.


def requests_of(sim, tag: str) -> list[dict]:
    return [request for request in sim.requests() if tag in request["user_preview"]]


def wait_until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def in_the_background(function) -> threading.Thread:
    def run():
        try:
            function()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_one_worker_divides_its_calls_between_owners_first(user, other_user, sim, no_background_worker):
    # Answers wait until the shares are seen: every call in flight is then
    # one the worker started under them.
    sim.configure(paused=True)
    first = make_job(user, simple_rows(12, marker="tag-first"), max_workers=8)
    second = make_job(user, simple_rows(12, marker="tag-second"), max_workers=8)
    others = make_job(other_user, simple_rows(12, marker="tag-others"), max_workers=8)

    def check_shares():
        wait_until(lambda: sim.stats()["in_flight"] == 8, what="8 calls in flight")
        shares["seen"] = {
            tag: sum(r["outcome"] is None for r in requests_of(sim, tag))
            for tag in ("tag-first", "tag-second", "tag-others")
        }
        sim.configure(paused=False)

    shares = {}
    run_workers(sim, concurrency=8, meanwhile=check_shares)

    # Half to each owner; the first owner's half split between their jobs.
    assert shares["seen"] == {"tag-first": 2, "tag-second": 2, "tag-others": 4}
    assert sim.stats()["max_in_flight"] == 8
    for job in (first, second, others):
        job.refresh_from_db()
        assert (job.state, job.count_done) == ("done", 12)
    assert not WorkerSlots.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_job_started_while_another_takes_every_call_gets_its_share_and_finishes_first(
    user, other_user, sim, no_background_worker
):
    sim.configure(latency_ms=200)
    big = make_job(user, simple_rows(400, marker="tag-big"), max_workers=4)
    finished_small = {}

    def start_a_small_job_while_the_big_one_runs():
        wait_until(lambda: sim.stats()["in_flight"] == 4, what="the big job at full concurrency")
        small = make_job(other_user, simple_rows(8, marker="tag-small"), max_workers=4)
        wait_until(
            lambda: ExtractJob.objects.get(pk=small.id).state == "done",
            timeout=120,
            what="the small job done",
        )
        finished_small["big_state"] = ExtractJob.objects.get(pk=big.id).state
        lifecycle.job_cancel(job=ExtractJob.objects.get(pk=big.id))

    run_workers(sim, concurrency=4, meanwhile=start_a_small_job_while_the_big_one_runs)

    assert finished_small["big_state"] == "running"
    assert len(requests_of(sim, "tag-small")) == 8


@pytest.mark.django_db(transaction=True)
def test_cancelling_one_of_three_jobs_aborts_only_its_calls(user, other_user, sim, no_background_worker):
    sim.configure(paused=True)
    jobs = {
        tag: make_job(user, simple_rows(6, marker=tag), max_workers=2) for tag in ("tag-a", "tag-b", "tag-c")
    }
    seen = {}

    def cancel_b_with_every_call_in_flight():
        wait_until(lambda: sim.stats()["in_flight"] == 6, what="6 calls in flight")
        lifecycle.job_cancel(job=ExtractJob.objects.get(pk=jobs["tag-b"].id))
        wait_until(
            lambda: all(r["outcome"] is not None for r in requests_of(sim, "tag-b")), what="b's calls ended"
        )
        seen["others_in_flight"] = sum(
            r["outcome"] is None for tag in ("tag-a", "tag-c") for r in requests_of(sim, tag)
        )
        sim.configure(paused=False)

    run_workers(sim, concurrency=6, meanwhile=cancel_b_with_every_call_in_flight)

    assert {r["outcome"] for r in requests_of(sim, "tag-b")} == {"aborted"}
    assert len(requests_of(sim, "tag-b")) == 2
    assert seen["others_in_flight"] == 4
    for tag in ("tag-a", "tag-c"):
        assert "aborted" not in {r["outcome"] for r in requests_of(sim, tag)}
        job = ExtractJob.objects.get(pk=jobs[tag].id)
        assert (job.state, job.count_done) == ("done", 6)
    assert ExtractJob.objects.get(pk=jobs["tag-b"].id).state == "cancelled"


@pytest.mark.django_db(transaction=True)
def test_an_owners_calls_in_flight_stay_within_their_limit_across_workers(
    user, other_user, sim, settings, no_background_worker
):
    settings.STRINGSIGHT_USER_MAX_CONCURRENCY = 3
    sim.configure(latency_ms=100)
    for tag in ("tag-one", "tag-two"):
        make_job(user, simple_rows(20, marker=tag), max_workers=8)
    others = make_job(other_user, simple_rows(20, marker="tag-others"), max_workers=8)

    run_workers(sim, workers=2, concurrency=8, user_max_concurrency=3)

    mine = requests_of(sim, "tag-one") + requests_of(sim, "tag-two")
    assert len(mine) == 40
    assert most_at_once(mine) == 3
    assert most_at_once(requests_of(sim, "tag-others")) == 3
    assert ExtractJob.objects.get(pk=others.id).state == "done"


def most_at_once(requests: list[dict]) -> int:
    """The most of these calls that were in flight at one moment."""
    edges = sorted(
        [(r["started_at"], 1) for r in requests] + [(r["ended_at"], -1) for r in requests],
        key=lambda edge: (edge[0], edge[1]),
    )
    most = current = 0
    for _, change in edges:
        current += change
        most = max(most, current)
    return most
