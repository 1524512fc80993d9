"""The worker's chunk runner as a plain function, against the LLM simulator
over real HTTP."""

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
from jobs.runner import ChunkRunner, RunnerSettings, _CallPool, _LoopThread
from jobs.services import claims, lifecycle, recovery
from jobs.services.sql import ClaimedRow
from jobs.sweeper import start_background_sweeps
from tests.factories import make_job, simple_rows


def run_chunk(job, sim, **overrides) -> str:
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
    lifecycle.job_mark_running(job_id=job.id)
    return ChunkRunner(job.id, RunnerSettings(**config)).run()


def run_at_once(job, sim, runners: int = 2, meanwhile=None) -> None:
    """Several runners on one job, as several worker processes would be,
    each on a thread of its own (with its own connection); `meanwhile`
    runs on this thread while they work."""

    def run():
        try:
            run_chunk(job, sim)
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
def test_runner_extracts_every_row_of_the_airline_data(user, sim, airline_rows):
    rows = airline_rows[:12]
    job = make_job(user, rows, max_workers=4, temperature=0.0, top_p=0.9, max_tokens=3000)

    run_chunk(job, sim)

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
def test_runner_keeps_calls_in_flight_within_max_workers(user, sim):
    # Long enough for all three calls to be in flight together on a busy machine.
    sim.configure(latency_ms=500)
    job = make_job(user, simple_rows(12), max_workers=3)

    run_chunk(job, sim)

    assert sim.stats()["max_in_flight"] == 3
    assert ExtractJob.objects.get(pk=job.id).count_done == 12


@pytest.mark.django_db
def test_runner_fails_a_row_with_a_bad_answer_and_goes_on(user, sim):
    rows = simple_rows(3)
    rows[1]["prompt"] += " [[sim:bad_json]]"
    job = make_job(user, rows)

    run_chunk(job, sim)

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
def test_runner_retries_server_errors_within_the_attempt_budget(user, sim):
    rows = simple_rows(2)
    rows[0]["prompt"] += " [[sim:500x2]]"
    rows[1]["prompt"] += " [[sim:500x5]]"
    job = make_job(user, rows)

    run_chunk(job, sim, max_attempts=3)

    recovered, exhausted = ExtractRow.objects.filter(job=job).order_by("index")
    assert (recovered.status, recovered.attempts) == ("done", 3)
    assert (exhausted.status, exhausted.attempts) == ("failed", 3)
    assert exhausted.error == (
        "LLM error 500: The server had an error processing your request (simulated); gave up after 3 attempts"
    )


@pytest.mark.django_db
def test_runner_fails_the_job_at_once_on_bad_credentials(user, sim):
    sim.configure(api_key="the-right-key")
    job = make_job(user, simple_rows(40), max_workers=4)

    run_chunk(job, sim, api_key="a-wrong-key")

    job.refresh_from_db()
    assert (job.state, job.error) == (
        "error",
        "the LLM provider refused the API key (401): Incorrect API key provided; check OPENAI_API_KEY",
    )
    assert len(sim.requests()) <= 4
    assert "a-wrong-key" not in job.error


@pytest.mark.django_db
def test_runner_stops_claiming_when_its_claim_time_is_up_and_finishes_what_it_holds(user, sim):
    sim.configure(latency_ms=100)
    job = make_job(user, simple_rows(40), max_workers=2)

    outcome = run_chunk(job, sim, claim_seconds=0.3)

    job.refresh_from_db()
    assert outcome.endswith("; claim time is up")
    assert (job.state, job.count_failed) == ("running", 0)
    assert 0 < job.count_done < 40
    assert ExtractRow.objects.filter(job=job, status="pending").count() == 40 - job.count_done
    assert len(sim.requests()) == job.count_done  # every row it claimed was called and recorded


@pytest.mark.django_db
def test_runner_makes_no_call_for_a_cancelled_job(user, sim):
    job = make_job(user, simple_rows(3))
    lifecycle.job_cancel(job=job)

    outcome = ChunkRunner(
        job.id,
        RunnerSettings(
            poll_seconds=0.05,
            lease_seconds=60,
            api_key="k",
            base_url=sim.base_url,
            llm_timeout=5,
            max_attempts=1,
            retry_base=0.01,
            retry_max=0.01,
            structured_output=True,
        ),
    ).run()

    assert outcome == "job is not running: nothing to do"
    assert sim.requests() == []


@pytest.mark.django_db(transaction=True)
def test_runner_aborts_calls_in_flight_the_moment_the_job_is_cancelled(user, sim, no_background_worker):
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
    run_chunk(job, sim)
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
def test_two_runners_on_one_job_share_its_max_workers(user, sim, no_background_worker):
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
    assert not WorkerSlots.objects.exists()  # each runner gave its grant back


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
        run_chunk(job, sim, lease_seconds=2)
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


def test_no_call_starts_after_a_fatal_answer_whatever_is_added_or_allowed_later():
    loop_thread = _LoopThread()
    results: queue.SimpleQueue = queue.SimpleQueue()
    pool = _CallPool(loop_thread.loop, results)
    started = []

    def call(index, fatal=False):
        async def run():
            started.append(index)
            if fatal:
                raise LLMCallError("LLM authentication failed (401)", fatal_for_job=True, attempts=1)
            return RowOutcome()

        return ClaimedRow(id=index, index=index, question_id=f"q{index}", data={}), run

    pool.add([call(0, fatal=True), call(1)])
    pool.set_cap(1)
    row, answer = results.get(timeout=5)
    pool.add([call(2)])
    pool.set_cap(5)
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop_thread.loop).result(timeout=5)

    assert (row.index, type(answer)) == (0, LLMCallError)
    assert started == [0]
    assert pool.counts() == (0, 0)
    loop_thread.close(client=ClosedClient())


class ClosedClient:
    async def close(self):
        pass


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
        # The runner's own code too: frozen objects are no longer tracked.
        assert not any(tracked is ChunkRunner._work for tracked in gc.get_objects())
        assert sweeps_started == ["Process-1"]
    finally:
        gc.unfreeze()
        post_spawn.disconnect(dispatch_uid=BACKGROUND_SWEEPS)
        post_spawn.connect(start_background_sweeps, dispatch_uid=BACKGROUND_SWEEPS)
