"""LLM faults, driven through the simulator over HTTP, and duplicate task
delivery."""

import threading
import time

import pytest
from django.db import connection

from jobs import services
from jobs.models import ExtractJob, ExtractRow, Property
from tests.factories import make_job, simple_rows
from tests.test_runner import run_at_once, run_chunk


def rows_with(markers: dict[int, str], count: int = 4) -> list[dict]:
    rows = simple_rows(count)
    for index, marker in markers.items():
        rows[index]["prompt"] += f" {marker}"
    return rows


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("marker", "error"),
    [
        ("[[sim:400]]", "LLM error 400: Invalid request (simulated)"),
        ("[[sim:refusal]]", "the LLM refused: I'm sorry, but I can't help with that."),
        ("[[sim:empty]]", "no valid property in the LLM answer: the answer held no property"),
    ],
)
def test_a_row_level_fault_fails_that_row_and_the_job_goes_on(user, sim, marker, error):
    job = make_job(user, rows_with({1: marker}))

    run_chunk(job, sim)

    job.refresh_from_db()
    assert (job.state, job.count_done, job.count_failed) == ("done", 3, 1)
    failed = ExtractRow.objects.get(job=job, index=1)
    assert (failed.status, failed.error, failed.attempts) == ("failed", error, 1)


@pytest.mark.django_db
def test_invalid_items_are_dropped_and_counted_and_their_siblings_kept(user, sim):
    job = make_job(user, rows_with({0: "[[sim:invalid_items]]"}, count=1))

    run_chunk(job, sim)

    row = ExtractRow.objects.get(job=job)
    assert (row.status, row.properties_dropped, row.properties.count()) == ("done", 2, 2)


@pytest.mark.django_db
def test_a_call_that_never_answers_times_out_and_is_retried_within_budget(user, sim):
    job = make_job(user, rows_with({0: "[[sim:hang]]"}, count=2))

    started = time.monotonic()
    run_chunk(job, sim, llm_timeout=0.3, max_attempts=2)

    assert time.monotonic() - started < 5
    hung = ExtractRow.objects.get(job=job, index=0)
    assert (hung.status, hung.attempts, hung.error) == (
        "failed",
        2,
        "LLM call timed out; gave up after 2 attempts",
    )
    assert ExtractRow.objects.get(job=job, index=1).status == "done"
    assert [r["outcome"] for r in sim.requests() if "hang" in r["user_preview"]] == ["aborted", "aborted"]


@pytest.mark.django_db
def test_retry_after_is_honoured_between_attempts(user, sim):
    sim.configure(retry_after=1)
    job = make_job(user, rows_with({0: "[[sim:429x1]]"}, count=1))

    run_chunk(job, sim, retry_max=5)

    first, second = sim.requests()
    assert (first["outcome"], second["outcome"]) == ("rate_limited", "ok")
    assert second["started_at"] - first["ended_at"] >= 1.0
    assert ExtractRow.objects.get(job=job).attempts == 2


@pytest.mark.django_db
def test_an_unknown_model_fails_the_job_at_once(user, sim):
    job = make_job(user, simple_rows(30), model_name="no-such-model", max_workers=3)

    run_chunk(job, sim)

    job.refresh_from_db()
    assert job.state == "error"
    assert job.error == "LLM model not found (404): check model_name 'no-such-model' and OPENAI_BASE_URL"
    assert len(sim.requests()) <= 3


@pytest.mark.django_db(transaction=True)
def test_a_cancel_during_a_backoff_sleep_is_honoured_at_once(user, sim, no_background_worker):
    sim.configure(retry_after=30)
    job = make_job(user, rows_with({0: "[[sim:429]]"}, count=1))
    cancelled = {}

    def cancel_during_backoff():
        deadline = time.monotonic() + 10
        while not sim.requests() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the worker is now sleeping for Retry-After
        cancelled["at"] = time.monotonic()
        try:
            services.job_cancel(job=ExtractJob.objects.get(pk=job.id))
        finally:
            connection.close()

    canceller = threading.Thread(target=cancel_during_backoff)
    canceller.start()
    run_chunk(job, sim, retry_max=60, max_attempts=5)
    returned = time.monotonic()
    canceller.join()

    assert returned - cancelled["at"] < 0.25
    assert len(sim.requests()) == 1


@pytest.mark.django_db(transaction=True)
def test_a_chunk_task_delivered_twice_does_no_duplicate_work(user, sim, no_background_worker):
    sim.configure(latency_ms=30)
    job = make_job(user, simple_rows(40), max_workers=6)

    run_at_once(job, sim)  # the same task, delivered to two worker processes

    job.refresh_from_db()
    sent = [request["user_sha256"] for request in sim.requests()]
    assert len(sent) == len(set(sent)) == 40
    assert (job.state, job.count_done) == ("done", 40)
    assert job.properties_count == Property.objects.filter(job=job).count()
    assert sim.stats()["max_in_flight"] <= 6
