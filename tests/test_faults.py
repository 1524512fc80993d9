"""LLM faults, driven through the simulator over HTTP, and duplicate task
delivery."""

import math
import threading
import time

import pytest
from django.db import connection

from extraction.render import render_row
from jobs.models import ExtractJob, ExtractRow, Property
from jobs.services import lifecycle
from llm_simulator import compose_answer
from tests.factories import make_job, run_at_once, run_job, simple_rows


def rows_with(markers: dict[int, str], count: int = 4) -> list[dict]:
    rows = simple_rows(count)
    for index, marker in markers.items():
        rows[index]["prompt"] += f" {marker}"
    return rows


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("marker", "error", "calls"),
    [
        ("[[sim:400]]", "LLM error 400: Invalid request (simulated)", 1),
        ("[[sim:refusal]]", "the LLM refused: I'm sorry, but I can't help with that.", 1),
        # An answer without a property is asked again before the row fails.
        (
            "[[sim:empty]]",
            "no valid property in the LLM answer, asked twice. First answer: the answer held no property. "
            "Second answer: the answer held no property",
            2,
        ),
    ],
)
def test_a_row_level_fault_fails_that_row_and_the_job_goes_on(user, sim, marker, error, calls):
    job = make_job(user, rows_with({1: marker}))

    run_job(job.id, base_url=sim.base_url)

    job.refresh_from_db()
    assert (job.state, job.count_done, job.count_failed) == ("done", 3, 1)
    failed = ExtractRow.objects.get(job=job, index=1)
    assert (failed.status, failed.error, failed.attempts) == ("failed", error, calls)
    assert len([r for r in sim.requests() if marker in r["user_preview"]]) == calls


@pytest.mark.django_db
def test_invalid_items_are_dropped_and_counted_and_their_siblings_kept(user, sim):
    job = make_job(user, rows_with({0: "[[sim:invalid_items]]"}, count=1))

    run_job(job.id, base_url=sim.base_url)

    row = ExtractRow.objects.get(job=job)
    assert (row.status, row.properties_dropped, row.properties.count()) == ("done", 2, 2)


@pytest.mark.django_db
def test_a_call_that_never_answers_times_out_and_is_retried_within_budget(user, sim):
    job = make_job(user, rows_with({0: "[[sim:hang]]"}, count=2))

    started = time.monotonic()
    run_job(job.id, base_url=sim.base_url, llm_timeout=0.3, max_attempts=2)

    assert time.monotonic() - started < 30  # the hung calls timed out (they would never end)
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

    run_job(job.id, base_url=sim.base_url, retry_max=5)

    first, second = sim.requests()
    assert (first["outcome"], second["outcome"]) == ("rate_limited", "ok")
    assert second["started_at"] - first["ended_at"] >= 1.0
    assert ExtractRow.objects.get(job=job).attempts == 2


@pytest.mark.django_db
def test_an_unknown_model_fails_the_job_at_once(user, sim):
    job = make_job(user, simple_rows(30), model_name="no-such-model", max_workers=3)

    run_job(job.id, base_url=sim.base_url)

    job.refresh_from_db()
    assert job.state == "error"
    assert job.error == (
        "the LLM provider has no model 'no-such-model' (404): The model `no-such-model` does not exist "
        "or you do not have access to it; check model_name and OPENAI_BASE_URL"
    )
    assert len(sim.requests()) <= 3


@pytest.mark.django_db(transaction=True)
def test_a_cancel_during_a_backoff_sleep_is_honoured_at_once(user, sim, no_background_worker):
    sim.configure(retry_after=60)
    job = make_job(user, rows_with({0: "[[sim:429]]"}, count=1))
    cancelled = {}

    def cancel_during_backoff():
        # Once the 429 is answered the worker waits 60 s (Retry-After) to ask again.
        deadline = time.monotonic() + 60
        while not any(r["ended_at"] for r in sim.requests()) and time.monotonic() < deadline:
            time.sleep(0.02)
        cancelled["at"] = time.monotonic()
        try:
            lifecycle.job_cancel(job=ExtractJob.objects.get(pk=job.id))
        finally:
            connection.close()

    canceller = threading.Thread(target=cancel_during_backoff)
    canceller.start()
    run_job(job.id, base_url=sim.base_url, retry_max=60, max_attempts=5)
    returned = time.monotonic()
    canceller.join()

    # Well before the 60 s backoff would have ended, and without a second call.
    assert returned - cancelled["at"] < 30
    assert len(sim.requests()) == 1
    assert ExtractJob.objects.get(pk=job.id).state == "cancelled"


@pytest.mark.django_db(transaction=True)
def test_a_chunk_task_delivered_twice_does_no_duplicate_work(user, sim, no_background_worker):
    sim.configure(latency_ms=30)
    job = make_job(user, simple_rows(40), max_workers=6)

    run_at_once(job.id, base_url=sim.base_url)  # the same task, delivered to two worker processes

    job.refresh_from_db()
    sent = [request["user_sha256"] for request in sim.requests()]
    assert len(sent) == len(set(sent)) == 40
    assert (job.state, job.count_done) == ("done", 40)
    assert job.properties_count == Property.objects.filter(job=job).count()
    assert sim.stats()["max_in_flight"] <= 6


def tokens_by_row(job) -> dict[int, tuple[int, int]]:
    return {
        row.index: (row.prompt_tokens, row.completion_tokens) for row in ExtractRow.objects.filter(job=job)
    }


@pytest.mark.django_db
def test_a_row_whose_first_answer_is_not_json_is_asked_again_and_done_paying_for_both(user, sim):
    rows = simple_rows(3)
    asked_once = make_job(user, rows)
    run_job(asked_once.id, base_url=sim.base_url)
    sim.configure(rate_bad_json_first=1.0)
    sim.reset()
    job = make_job(user, rows, use_cache=False)

    run_job(job.id, base_url=sim.base_url)

    job.refresh_from_db()
    assert (job.state, job.count_done, job.count_failed) == ("done", 3, 0)
    stored = ExtractRow.objects.filter(job=job).order_by("index")
    assert [(row.status, row.attempts, row.error) for row in stored] == [("done", 2, "")] * 3
    assert [r["outcome"] for r in sim.requests()].count("bad_json") == 3
    assert len(sim.requests()) == 6
    for row in stored:
        user_message = render_row(row.data, "single_model")
        prose, _ = compose_answer(user_message, 0, "bad_json", object_form=True)
        prompt, completion = tokens_by_row(asked_once)[row.index]
        assert (row.prompt_tokens, row.completion_tokens) == (
            2 * prompt,
            completion + math.ceil(len(prose) / 4),
        )
    assert (job.prompt_tokens, job.completion_tokens) == (
        sum(row.prompt_tokens for row in stored),
        sum(row.completion_tokens for row in stored),
    )


@pytest.mark.django_db
def test_a_row_cut_off_twice_with_nothing_usable_fails_with_both_reasons(user, sim):
    job = make_job(user, simple_rows(1), max_tokens=10)

    run_job(job.id, base_url=sim.base_url)

    row = ExtractRow.objects.get(job=job)
    reason = "cut off at max_tokens (finish_reason: length); item 1: cut off at the end of the answer"
    assert (row.status, row.attempts) == ("failed", 2)
    assert row.error == (
        f"no valid property in the LLM answer, asked twice. First answer: {reason}. Second answer: {reason}"
    )
    assert [r["outcome"] for r in sim.requests()] == ["truncated", "truncated"]
    assert row.completion_tokens == 2 * 10  # both answers, cut at max_tokens
