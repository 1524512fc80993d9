"""Batch mode's worker steps as plain functions in this process: submit,
poll, import, re-send, cancel, recovery. The provider is the LLM simulator's
Batch API over HTTP; no qcluster runs (tests/test_e2e_batch.py has those)."""

import io
import json
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from django.utils.module_loading import import_string
from django_q.brokers import get_broker
from django_q.models import OrmQ
from django_q.signing import SignedPackage

from extraction.extract import CacheKeys, build_messages
from extraction.llm import request_arguments
from jobs.batchmode import importing, lines, poll, records, submit
from jobs.batchmode.provider import BatchProvider
from jobs.models import (
    PROPERTY_CONTENT,
    CompletionCache,
    ExtractJob,
    ExtractRow,
    JobState,
    Property,
    ProviderBatch,
    ProviderBatchState,
    RowStatus,
)
from jobs.services import budgets, grants, lifecycle, recovery
from jobs.services.errors import JobConflict
from jobs.worker.engine import WorkerSettings, extraction_spec
from tests.factories import job_params, run_job, simple_rows

pytestmark = pytest.mark.django_db(transaction=True)

DEADLINE = 60.0


@pytest.fixture
def batch_env(sim, monkeypatch, settings, no_background_worker):
    """The workers' endpoint is the simulator, as a qcluster's would be."""
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sim-key")
    settings.STRINGSIGHT_MAX_ATTEMPTS = 2
    return sim


@pytest.fixture
def provider(batch_env):
    provider = BatchProvider.from_django()
    yield provider
    provider.close()


def start_batch_job(rows, **params) -> ExtractJob:
    return lifecycle.job_start(
        owner=None, rows=rows, params=job_params(mode="batch", model_name="gpt-4o-mini", **params)
    )


def run_queued_tasks() -> None:
    """Run the tasks waiting in the broker here, as a worker would (a
    follow-up batch's submission, a cancel's)."""
    broker = get_broker()
    while tasks := broker.dequeue():
        for ack_id, package in tasks:
            task = SignedPackage.loads(package)
            import_string(task["func"])(*task["args"], **task["kwargs"])
            broker.acknowledge(ack_id)


def poll_until(predicate, provider, timeout: float = DEADLINE):
    """Poll as the sweep thread would, and run the tasks it enqueues, until
    `predicate()` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        poll.poll(provider=provider)
        run_queued_tasks()
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout} s")


def job_of(job: ExtractJob) -> ExtractJob:
    return ExtractJob.objects.get(pk=job.pk)


def input_lines(provider: BatchProvider, batch: ProviderBatch) -> list[dict]:
    content = provider.client.files.content(batch.input_file_id).read()
    return [json.loads(line) for line in content.splitlines() if line.strip()]


def test_submit_sends_each_row_once_with_the_online_request_body(provider):
    job = start_batch_job(simple_rows(5))

    result = submit.submit_batches(job_id=job.pk)

    batch = ProviderBatch.objects.get(job=job)
    assert result == "sent 1 batches; finished 0 left by a stopped worker"
    assert (batch.state, batch.attempt, batch.batch_id.startswith("batch_")) == ("submitted", 1, True)
    assert job_of(job).state == JobState.RUNNING
    spec = extraction_spec(job_of(job), WorkerSettings.from_django())
    rows = list(ExtractRow.objects.filter(job=job).order_by("index"))
    assert [line["custom_id"] for line in input_lines(provider, batch)] == [
        f"{job.pk}:{i}:1" for i in range(5)
    ]
    assert [line["body"] for line in input_lines(provider, batch)] == [
        json.loads(json.dumps(request_arguments(build_messages(row.data, spec), spec.call))) for row in rows
    ]
    assert {(row.status, row.claimed_by, row.provider_batch_id) for row in rows} == {
        (RowStatus.RUNNING, f"batch:{batch.pk}", batch.pk)
    }


def test_submit_answers_cached_rows_at_once_and_sends_the_rest(provider):
    rows = simple_rows(4)
    job = start_batch_job(rows)
    spec = extraction_spec(job, WorkerSettings.from_django())
    keys = CacheKeys(spec, base_url=provider.base_url)
    answer = json.dumps(
        {
            "properties": [
                {
                    "property_description": "Doubles the number correctly.",
                    "category": "Math",
                    "reason": "r",
                    "evidence": ["The answer is 2."],
                    "behavior_type": "Positive",
                    "contains_errors": False,
                    "unexpected_behavior": False,
                    "model": "demo-model",
                }
            ]
        }
    )
    for row in rows[:2]:
        CompletionCache.objects.create(
            key=keys.key(build_messages(row, spec)), model_name="gpt-4o-mini", answer=answer
        )

    submit.submit_batches(job_id=job.pk)

    batch = ProviderBatch.objects.get(job=job)
    assert [line["custom_id"] for line in input_lines(provider, batch)] == [f"{job.pk}:2:1", f"{job.pk}:3:1"]
    done = ExtractRow.objects.filter(job=job, status=RowStatus.DONE, cached=True)
    assert sorted(done.values_list("index", flat=True)) == [0, 1]
    assert (job_of(job).cache_hits, job_of(job).count_done, job_of(job).properties_count) == (2, 2, 2)


def test_submit_splits_rows_at_the_providers_line_and_byte_limits(provider, monkeypatch):
    monkeypatch.setattr(submit, "MAX_LINES", 3)
    job = start_batch_job(simple_rows(7))
    submit.submit_batches(job_id=job.pk)
    by_lines = [batch.rows.count() for batch in ProviderBatch.objects.filter(job=job).order_by("created_at")]

    monkeypatch.setattr(submit, "MAX_LINES", 50_000)
    one_line = len(submit.Submitter(job, provider).line(submit.ClaimedRow(0, 0, "q0", simple_rows(1)[0]), 1))
    monkeypatch.setattr(submit, "MAX_BYTES", one_line * 2 + 10)
    other = start_batch_job(simple_rows(5))
    submit.submit_batches(job_id=other.pk)
    by_bytes = [
        batch.rows.count() for batch in ProviderBatch.objects.filter(job=other).order_by("created_at")
    ]

    assert by_lines == [3, 3, 1]
    assert by_bytes == [2, 2, 1]
    assert ExtractRow.objects.filter(job__in=[job, other], status=RowStatus.RUNNING).count() == 12


def test_a_batch_job_is_never_served_by_the_online_engine(batch_env):
    batch_job = start_batch_job(simple_rows(3))
    online = lifecycle.job_start(owner=None, rows=simple_rows(3), params=job_params())

    assert [job.job_id for job in grants.jobs_to_serve()] == [online.pk]
    assert grants.jobs_to_serve(only_job=batch_job.pk) == []


def test_an_ended_batch_is_imported_as_online_rows_are_recorded_at_the_batch_price(provider):
    job = start_batch_job(simple_rows(6))
    submit.submit_batches(job_id=job.pk)

    final = poll_until(lambda: (found := job_of(job)).state == JobState.DONE and found, provider)

    batch = ProviderBatch.objects.get(job=job)
    assert (batch.state, batch.provider_status, batch.request_counts) == (
        "imported",
        "completed",
        {"total": 6, "completed": 6, "failed": 0},
    )
    assert (final.count_done, final.count_failed, final.properties_count) == (
        6,
        0,
        Property.objects.filter(job=job).count(),
    )
    assert final.properties_count > 0
    rows = ExtractRow.objects.filter(job=job)
    assert final.prompt_tokens == sum(row.prompt_tokens for row in rows) > 0
    assert (final.price_input_per_mtok, final.price_output_per_mtok) == (0.075, 0.30)
    assert final.cost_usd == pytest.approx(
        (final.prompt_tokens * 0.075 + final.completion_tokens * 0.30) / 1e6
    )
    assert {row.attempts for row in rows} == {1}
    assert CompletionCache.objects.count() == 6  # the answers serve later jobs, online or batch
    assert records.pending_provider_results(job_id=job.pk) is False


def test_importing_a_batch_again_records_no_line_twice(provider):
    job = start_batch_job(simple_rows(5))
    submit.submit_batches(job_id=job.pk)
    poll_until(lambda: job_of(job).state == JobState.DONE, provider)
    before = job_of(job)
    properties = Property.objects.filter(job=job).count()
    batch = ProviderBatch.objects.get(job=job)
    # As if the worker was killed after the last line, before `imported`.
    ProviderBatch.objects.filter(pk=batch.pk).update(state=ProviderBatchState.SUBMITTED)
    batch.refresh_from_db()

    importing.import_batch(batch, provider)

    after = job_of(job)
    assert (after.count_done, after.properties_count, after.prompt_tokens, after.state) == (
        before.count_done,
        before.properties_count,
        before.prompt_tokens,
        JobState.DONE,
    )
    assert Property.objects.filter(job=job).count() == properties
    assert ProviderBatch.objects.get(pk=batch.pk).state == ProviderBatchState.IMPORTED


def test_failed_lines_are_sent_again_once_and_only_they(provider, batch_env):
    batch_env.configure(batch_rate_failed=0.4, seed=7)
    job = start_batch_job(simple_rows(20))
    submit.submit_batches(job_id=job.pk)

    final = poll_until(lambda: (found := job_of(job)).state == JobState.DONE and found, provider)

    lines = batch_env.batch_lines()
    first = {line["custom_id"]: line for line in lines if line["custom_id"].endswith(":1")}
    second = {line["custom_id"]: line for line in lines if line["custom_id"].endswith(":2")}
    failed_first = {cid.rsplit(":", 1)[0] for cid, line in first.items() if line["status"] != 200}
    failed_second = {cid.rsplit(":", 1)[0] for cid, line in second.items() if line["status"] != 200}
    assert len(first) == 20
    assert failed_first, "the seed should fail some lines"
    assert {cid.rsplit(":", 1)[0] for cid in second} == failed_first
    assert not [line for line in lines if line["custom_id"].endswith(":3")]
    assert [batch.attempt for batch in ProviderBatch.objects.filter(job=job).order_by("created_at")] == [1, 2]
    failed_rows = ExtractRow.objects.filter(job=job, status=RowStatus.FAILED)
    assert {f"{job.pk}:{row.index}" for row in failed_rows} == failed_second
    assert {row.attempts for row in failed_rows} <= {2}
    assert all("server_error" in row.error for row in failed_rows)
    assert (final.count_done, final.count_failed) == (20 - len(failed_second), len(failed_second))


def test_expired_lines_are_sent_again_in_a_follow_up_batch(provider, batch_env):
    # 10 lines a second and a window of 1 s: the first batch expires with
    # some lines answered. A batch's window is set when it is created, so
    # the follow-up gets a long one.
    batch_env.configure(batch_lines_per_second=10, batch_expiry_seconds=1.0, batch_validating_seconds=0)
    job = start_batch_job(simple_rows(15))
    submit.submit_batches(job_id=job.pk)
    batch_env.configure(batch_expiry_seconds=600)

    final = poll_until(lambda: (found := job_of(job)).state == JobState.DONE and found, provider)

    first = ProviderBatch.objects.get(job=job, attempt=1)
    answered_first = first.request_counts["completed"]
    assert first.provider_status == "expired"
    assert 0 < answered_first < 15
    follow_up = ProviderBatch.objects.get(job=job, attempt=2)
    assert follow_up.request_counts["total"] == 15 - answered_first
    assert (final.count_done, final.count_failed) == (15, 0)
    resent = ExtractRow.objects.filter(job=job, provider_batch=follow_up)
    assert {row.attempts for row in resent} == {2}


def test_a_cancel_answers_at_once_and_imports_what_the_provider_completed(provider, batch_env):
    batch_env.configure(batch_lines_per_second=4, batch_cancel_seconds=0.5, batch_validating_seconds=0)
    job = start_batch_job(simple_rows(40))
    submit.submit_batches(job_id=job.pk)
    poll_until(lambda: ProviderBatch.objects.get(job=job).request_counts.get("completed", 0) >= 3, provider)

    outcome = lifecycle.job_cancel(job=job_of(job))
    poll.cancel_batches(job_id=job.pk)

    assert (outcome.job.state, outcome.cancelled_now) == (JobState.CANCELLED, True)
    assert records.pending_provider_results(job_id=job.pk) is True
    poll_until(lambda: not records.pending_provider_results(job_id=job.pk), provider)
    batch = ProviderBatch.objects.get(job=job)
    final = job_of(job)
    completed = batch.request_counts["completed"]
    assert (batch.provider_status, batch.state, final.state) == ("cancelled", "imported", JobState.CANCELLED)
    assert 3 <= completed < 40
    assert final.count_done == completed == ExtractRow.objects.filter(job=job, status=RowStatus.DONE).count()
    assert ExtractRow.objects.filter(job=job, status=RowStatus.CANCELLED).count() == 40 - completed
    assert final.properties_count == Property.objects.filter(job=job).count() > 0
    assert len(batch_env.batch_lines()) == completed


def test_a_cancel_before_the_batch_is_created_abandons_it(provider):
    job = start_batch_job(simple_rows(3))
    lifecycle.job_mark_running(job_id=job.pk)
    with submit.tempfile.TemporaryFile() as file:
        batch, _, _ = submit.Submitter(job_of(job), provider).fill(file)
        lifecycle.job_cancel(job=job_of(job))
        file.seek(0)
        sent = submit.send(batch, provider, file)

    assert sent == 0
    assert ProviderBatch.objects.get(pk=batch.pk).state == ProviderBatchState.ABANDONED
    assert set(ExtractRow.objects.filter(job=job).values_list("status", flat=True)) == {RowStatus.CANCELLED}
    assert records.pending_provider_results(job_id=job.pk) is False


def killed_after_upload(job: ExtractJob, provider: BatchProvider) -> ProviderBatch:
    """The submit's steps up to the upload, as a worker killed right after
    it left them: the record says uploaded, no batch is created."""
    lifecycle.job_mark_running(job_id=job.pk)
    with submit.tempfile.TemporaryFile() as file:
        batch, _, _ = submit.Submitter(job_of(job), provider).fill(file)
        file.seek(0)
        file_id = provider.upload("killed.jsonl", file)
    long_ago = timezone.now() - timedelta(hours=1)
    ProviderBatch.objects.filter(pk=batch.pk).update(
        state=ProviderBatchState.UPLOADED, input_file_id=file_id, updated_at=long_ago
    )
    return ProviderBatch.objects.get(pk=batch.pk)


def test_a_batch_left_uploaded_is_created_once_by_the_next_submit(provider):
    job = start_batch_job(simple_rows(4))
    batch = killed_after_upload(job, provider)

    submit.submit_batches(job_id=job.pk)
    submit.submit_batches(job_id=job.pk)

    batch.refresh_from_db()
    ours = [
        b
        for b in provider.client.batches.list(limit=100)
        if b.metadata.get("stringsight_batch") == str(batch.pk)
    ]
    assert [b.id for b in ours] == [batch.batch_id]
    assert ProviderBatch.objects.filter(job=job).count() == 1
    poll_until(lambda: job_of(job).state == JobState.DONE, provider)
    assert job_of(job).count_done == 4


def test_a_batch_created_but_not_recorded_is_found_by_its_metadata(provider, batch_env):
    job = start_batch_job(simple_rows(4))
    batch = killed_after_upload(job, provider)
    # Killed after the create reached the provider, before its id was stored.
    created = provider.create(input_file_id=batch.input_file_id, record_id=str(batch.pk))

    submit.submit_batches(job_id=job.pk)

    batch.refresh_from_db()
    assert (batch.state, batch.batch_id) == (ProviderBatchState.SUBMITTED, created.id)
    ours = [
        b
        for b in provider.client.batches.list(limit=100)
        if b.metadata.get("stringsight_batch") == str(batch.pk)
    ]
    assert len(ours) == 1
    poll_until(lambda: job_of(job).state == JobState.DONE, provider)
    assert (job_of(job).count_done, len(batch_env.batch_lines())) == (4, 4)


def test_a_submission_that_stopped_is_enqueued_again_by_the_poll(batch_env):
    job = start_batch_job(simple_rows(2))
    from django_q.models import OrmQ

    OrmQ.objects.all().delete()  # the start's task, lost
    quiet = timezone.now() - timedelta(minutes=5)
    ExtractJob.objects.filter(pk=job.pk).update(work_enqueued_at=quiet)

    enqueued = poll.enqueue_submit_work(now=timezone.now())
    again = poll.enqueue_submit_work(now=timezone.now())

    assert (enqueued, again) == (1, 0)
    assert OrmQ.objects.count() == 1


def test_a_provider_without_a_batch_api_ends_the_job_with_a_clear_error(provider, batch_env):
    batch_env.configure(batch_api=False)
    job = start_batch_job(simple_rows(3))

    submit.submit_batches(job_id=job.pk)

    final = job_of(job)
    assert final.state == JobState.ERROR
    assert final.error.startswith(f"the LLM provider has no Batch API at {batch_env.base_url.rstrip('/')}")
    assert "sim-key" not in final.error
    assert set(ExtractRow.objects.filter(job=job).values_list("status", flat=True)) == {RowStatus.CANCELLED}
    assert ProviderBatch.objects.filter(job=job).exclude(state=ProviderBatchState.ABANDONED).count() == 0


def test_a_resumed_batch_job_sends_its_unfinished_rows_again(provider):
    job = start_batch_job(simple_rows(5))
    lifecycle.job_cancel(job=job_of(job))

    lifecycle.job_resume(job=job_of(job))
    submit.submit_batches(job_id=job.pk)

    final = poll_until(lambda: (found := job_of(job)).state == JobState.DONE and found, provider)
    assert (final.count_done, final.mode) == (5, "batch")
    assert ProviderBatch.objects.get(job=job).request_counts["total"] == 5


def test_a_budget_too_small_for_one_row_sends_nothing(provider):
    job = start_batch_job(simple_rows(6), max_total_tokens=1)

    submit.submit_batches(job_id=job.pk)

    final = job_of(job)
    assert final.state == JobState.ERROR
    assert final.error.startswith("budget exceeded")
    assert ProviderBatch.objects.filter(job=job).count() == 0


def test_a_budget_sends_only_the_rows_it_can_reserve(provider):
    rows = simple_rows(6)
    job = start_batch_job(rows, max_tokens=100)
    two_rows = sum(
        budgets.reservation_for(job, row).prompt_tokens + budgets.reservation_for(job, row).completion_tokens
        for row in rows[:2]
    )
    ExtractJob.objects.filter(pk=job.pk).update(max_total_tokens=two_rows)

    submit.submit_batches(job_id=job.pk)

    batch = ProviderBatch.objects.get(job=job)
    assert sorted(batch.rows.values_list("index", flat=True)) == [0, 1]
    assert ExtractRow.objects.filter(job=job, status=RowStatus.PENDING).count() == 4
    assert job_of(job).state == JobState.RUNNING


def rows_of(job: ExtractJob) -> list[tuple]:
    rows = ExtractRow.objects.filter(job=job).order_by("index")
    return list(rows.values_list("status", "attempts", "prompt_tokens", "completion_tokens", "error"))


def properties_of(job: ExtractJob) -> list[tuple]:
    return list(
        Property.objects.filter(job=job)
        .order_by("row_index", "position")
        .values_list("row_index", "position", *PROPERTY_CONTENT)
    )


def test_an_answer_without_properties_is_asked_once_more_as_online(provider, batch_env):
    # Every first answer to a request is prose: online asks each row again
    # at once, batch mode in a follow-up batch; both end with the same.
    batch_env.configure(rate_bad_json_first=1.0)
    rows = simple_rows(4)
    online = lifecycle.job_start(
        owner=None, rows=rows, params=job_params(model_name="gpt-4o-mini", use_cache=False)
    )
    run_job(online.pk, base_url=batch_env.base_url)
    batch_env.reset()  # the simulator forgets the requests it answered
    job = start_batch_job(rows, use_cache=False)
    submit.submit_batches(job_id=job.pk)

    final = poll_until(lambda: (found := job_of(job)).state == JobState.DONE and found, provider)

    online = job_of(online)
    assert (final.count_done, final.count_failed) == (online.count_done, online.count_failed) == (4, 0)
    assert properties_of(final) == properties_of(online)
    assert (final.prompt_tokens, final.completion_tokens) == (online.prompt_tokens, online.completion_tokens)
    assert rows_of(final) == rows_of(online)
    assert [batch.attempt for batch in ProviderBatch.objects.filter(job=job).order_by("created_at")] == [1, 2]


def test_a_result_line_names_its_row_or_why_it_has_no_answer():
    job_id = "1f0c6f9e-0000-4000-8000-000000000001"
    answered = {
        "custom_id": f"{job_id}:7:2",
        "response": {"status_code": 200, "body": {"id": "c"}},
        "error": None,
    }
    expired = {
        "custom_id": f"{job_id}:8:1",
        "response": None,
        "error": {"code": "batch_expired", "message": "Too late."},
    }
    refused = {
        "custom_id": f"{job_id}:9:1",
        "response": {
            "status_code": 500,
            "body": {"error": {"code": "server_error", "message": "Oops sk-abcdef123456."}},
        },
        "error": None,
    }
    other_job = {**answered, "custom_id": "another-job:7:1"}

    read = [
        lines.read_result_line(json.dumps(line).encode(), job_id=job_id, api_key=None)
        for line in (answered, expired, refused, other_job)
    ]
    read.append(lines.read_result_line(b"not json", job_id=job_id, api_key=None))

    assert read == [
        lines.ResultLine(row_index=7, completion={"id": "c"}),
        lines.ResultLine(
            row_index=8, failure="the provider's batch failed this line (batch_expired): Too late"
        ),
        lines.ResultLine(
            row_index=9, failure="the provider's batch failed this line (server_error): Oops [redacted]"
        ),
        None,
        None,
    ]


def test_a_lost_cancel_task_is_made_good_by_the_next_poll(provider, batch_env):
    batch_env.configure(batch_lines_per_second=1, batch_validating_seconds=0, batch_cancel_seconds=0.2)
    job = start_batch_job(simple_rows(20))
    submit.submit_batches(job_id=job.pk)
    lifecycle.job_cancel(job=job_of(job))
    OrmQ.objects.all().delete()  # the cancel's task, lost with its worker

    report = poll.poll(provider=provider)

    assert report.cancels_sent == 1
    poll_until(lambda: not records.pending_provider_results(job_id=job.pk), provider)
    batch = ProviderBatch.objects.get(job=job)
    assert (batch.provider_status, batch.state) == ("cancelled", ProviderBatchState.IMPORTED)
    assert (
        job_of(job).count_done + ExtractRow.objects.filter(job=job, status=RowStatus.CANCELLED).count() == 20
    )


def test_a_batch_left_preparing_is_uploaded_and_created_once_by_the_next_submit(provider, batch_env):
    job = start_batch_job(simple_rows(4))
    lifecycle.job_mark_running(job_id=job.pk)
    with submit.tempfile.TemporaryFile() as file:
        batch, lines_written, _ = submit.Submitter(job_of(job), provider).fill(file)
    # Killed before the upload: the rows are linked, nothing was sent.
    ProviderBatch.objects.filter(pk=batch.pk).update(updated_at=timezone.now() - timedelta(hours=1))

    submit.submit_batches(job_id=job.pk)

    batch.refresh_from_db()
    assert (lines_written, batch.state, len(input_lines(provider, batch))) == (4, "submitted", 4)
    poll_until(lambda: job_of(job).state == JobState.DONE, provider)
    assert (job_of(job).count_done, len(batch_env.batch_lines())) == (4, 4)
    assert ProviderBatch.objects.filter(job=job).count() == 1


def test_the_sweep_leaves_a_batch_job_running_until_its_batches_are_imported(provider):
    job = start_batch_job(simple_rows(2))
    lifecycle.job_mark_running(job_id=job.pk)
    batch = ProviderBatch.objects.create(
        job_id=job.pk, state=ProviderBatchState.SUBMITTED, batch_id="batch_x"
    )
    ExtractJob.objects.filter(pk=job.pk).update(count_done=2)

    recovery.sweep()
    during = job_of(job).state
    ProviderBatch.objects.filter(pk=batch.pk).update(state=ProviderBatchState.IMPORTED)
    recovery.sweep()

    assert (during, job_of(job).state) == (JobState.RUNNING, JobState.DONE)


def test_one_worker_polls_per_interval(batch_env, settings):
    settings.STRINGSIGHT_BATCH_POLL_SECONDS = 60
    start_batch_job(simple_rows(1))

    first = poll.poll_if_due()
    second = poll.poll_if_due()

    assert (first is not None, second) == (True, None)


def test_a_resume_leaves_the_rows_the_provider_still_holds_to_their_batch(provider, batch_env):
    batch_env.configure(batch_lines_per_second=2, batch_validating_seconds=0, batch_cancel_seconds=0.5)
    job = start_batch_job(simple_rows(8))
    submit.submit_batches(job_id=job.pk)
    poll_until(lambda: ProviderBatch.objects.get(job=job).request_counts.get("completed", 0) >= 1, provider)
    lifecycle.job_cancel(job=job_of(job))

    with pytest.raises(JobConflict, match="no rows to run again"):
        lifecycle.job_resume(job=job_of(job))
    poll.cancel_batches(job_id=job.pk)
    poll_until(lambda: not records.pending_provider_results(job_id=job.pk), provider)
    completed = job_of(job).count_done
    lifecycle.job_resume(job=job_of(job))
    final = poll_until(lambda: (found := job_of(job)).state == JobState.DONE and found, provider)

    assert 0 < completed < 8
    first, second = ProviderBatch.objects.filter(job=job).order_by("created_at")
    assert (first.provider_status, second.request_counts["total"]) == ("cancelled", 8 - completed)
    assert (final.count_done, final.count_failed) == (8, 0)
    assert len(batch_env.batch_lines()) == 8


def test_rows_of_a_batch_the_provider_failed_say_what_it_said(provider, batch_env, settings):
    settings.STRINGSIGHT_MAX_ATTEMPTS = 1
    job = start_batch_job(simple_rows(3))
    lifecycle.job_mark_running(job_id=job.pk)
    with submit.tempfile.TemporaryFile() as file:
        batch, _, _ = submit.Submitter(job_of(job), provider).fill(file)
    # An input file the provider refuses (a line that is not JSON), as a
    # bug of ours would make it.
    refused = provider.upload("bad.jsonl", io.BytesIO(b"not a request line\n"))
    ProviderBatch.objects.filter(pk=batch.pk).update(state=ProviderBatchState.UPLOADED, input_file_id=refused)
    batch.refresh_from_db()
    submit.create(batch, provider)

    final = poll_until(lambda: (found := job_of(job)).state == JobState.DONE and found, provider)

    assert ProviderBatch.objects.get(pk=batch.pk).provider_status == "failed"
    assert (final.count_done, final.count_failed) == (0, 3)
    (error,) = set(ExtractRow.objects.filter(job=job).values_list("error", flat=True))
    assert error.startswith("the provider's batch failed: ")
    assert error != "the provider's batch failed: its input file was refused"  # the provider's own words
