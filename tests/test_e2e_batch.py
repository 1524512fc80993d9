"""Batch mode end to end: real `qcluster` processes poll and import, the
LLM simulator's Batch API over HTTP, on whichever database the suite runs
on. Jobs are started through the lifecycle (the rules the API calls);
cancels go through the API."""

import json
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from django_q.models import OrmQ

from jobs.batchmode import importing, lines, records, submit
from jobs.batchmode.provider import BatchProvider
from jobs.models import PROPERTY_CONTENT, ExtractJob, ExtractRow, JobState, Property, ProviderBatch, RowStatus
from jobs.services import lifecycle
from tests.factories import job_params, simple_rows

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# Generous: a loaded 2-core machine runs the cluster, the simulator and the tests.
DEADLINE = 120.0
BATCH_WORKER = {"STRINGSIGHT_BATCH_POLL_SECONDS": "0.5", "STRINGSIGHT_MAX_ATTEMPTS": "2"}


def wait_for(predicate, timeout: float = DEADLINE, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture
def here_too(sim, monkeypatch):
    """This process reaches the simulator as the workers do (for the steps a
    test runs itself, and to read the provider's files)."""
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sim-key")
    provider = BatchProvider.from_django()
    yield provider
    provider.close()


def start(rows, *, owner=None, **params) -> ExtractJob:
    return lifecycle.job_start(owner=owner, rows=rows, params=job_params(model_name="gpt-4o-mini", **params))


def ended(job: ExtractJob) -> ExtractJob | None:
    found = ExtractJob.objects.get(pk=job.pk)
    return found if found.state not in (JobState.QUEUED, JobState.RUNNING) else None


def properties_of(job: ExtractJob) -> list[tuple]:
    return list(
        Property.objects.filter(job=job)
        .order_by("row_index", "position")
        .values_list("row_index", "position", *PROPERTY_CONTENT)
    )


def input_custom_ids(provider: BatchProvider, batch: ProviderBatch) -> set[str]:
    content = provider.client.files.content(batch.input_file_id).read()
    return {json.loads(line)["custom_id"] for line in content.splitlines() if line.strip()}


def row_of(custom_id: str) -> int:
    return int(custom_id.split(":")[1])


def test_a_batch_job_ends_done_with_the_online_jobs_properties_at_half_the_cost(
    start_worker, sim, airline_rows
):
    start_worker("batch", **BATCH_WORKER)
    rows = airline_rows[:30]
    online_job = start(rows, use_cache=False)
    online = wait_for(lambda: ended(online_job))
    live_calls = len(sim.requests())

    batch_job = start(rows, use_cache=False, mode="batch")
    batch = wait_for(lambda: ended(batch_job))

    assert (online.state, batch.state, batch.mode) == (JobState.DONE, JobState.DONE, "batch")
    assert properties_of(batch) == properties_of(online)
    assert (batch.count_done, batch.properties_count) == (online.count_done, online.properties_count)
    assert (batch.prompt_tokens, batch.completion_tokens) == (online.prompt_tokens, online.completion_tokens)
    assert batch.cost_usd / online.cost_usd == pytest.approx(0.5)
    assert len(sim.requests()) == live_calls  # the batch job made no live call
    assert len(sim.batch_lines()) == 30
    assert records.pending_provider_results(job_id=batch_job.pk) is False


def test_a_cancel_mid_batch_answers_at_once_and_imports_the_completed_lines_once(
    start_worker, sim, api, user, airline_rows
):
    # Lines answered 4 a second, and a cancel that takes 1.5 s to take
    # effect: lines go on being answered while the batch is cancelling.
    sim.configure(batch_lines_per_second=4, batch_cancel_seconds=1.5, batch_validating_seconds=0)
    start_worker("batch", **BATCH_WORKER)
    job = start(airline_rows[:40], owner=user, mode="batch")
    wait_for(
        lambda: (
            (b := ProviderBatch.objects.filter(job=job).first()) and b.request_counts.get("completed", 0) >= 3
        )
    )

    sent = time.monotonic()
    response = api.post("/extract/jobs/cancel", {"job_id": str(job.pk)}, format="json")
    answered_in = time.monotonic() - sent

    assert response.status_code == 200
    assert (response.json()["state"], response.json()["message"]) == ("cancelled", "job cancelled")
    assert answered_in < 5.0
    wait_for(lambda: not records.pending_provider_results(job_id=job.pk))
    batch = ProviderBatch.objects.get(job=job)
    final = ExtractJob.objects.get(pk=job.pk)
    answered = {row_of(line["custom_id"]) for line in sim.batch_lines() if line["status"] == 200}
    assert (batch.provider_status, batch.state, final.state) == ("cancelled", "imported", JobState.CANCELLED)
    assert 3 <= len(answered) < 40
    done = set(ExtractRow.objects.filter(job=job, status=RowStatus.DONE).values_list("index", flat=True))
    assert done == answered  # every completed line imported, none lost
    assert ExtractRow.objects.filter(job=job, status=RowStatus.CANCELLED).count() == 40 - len(answered)
    assert (final.count_done, final.properties_count) == (
        len(answered),
        Property.objects.filter(job=job).count(),
    )
    assert set(Property.objects.filter(job=job).values_list("row_index", flat=True)) == answered


def test_failed_and_expired_lines_are_sent_again_once_and_only_they(
    start_worker, sim, here_too, airline_rows
):
    # A window of 1 s at 10 lines a second: each batch expires with lines
    # unanswered; a fifth of the answered lines fail. STRINGSIGHT_MAX_ATTEMPTS
    # is 2, so a row is sent at most twice.
    sim.configure(
        batch_lines_per_second=10, batch_expiry_seconds=1.0, batch_validating_seconds=0, batch_rate_failed=0.2
    )
    start_worker("batch", **BATCH_WORKER)
    job = start(airline_rows[:30], mode="batch")
    final = wait_for(lambda: ended(job))

    first, second = ProviderBatch.objects.filter(job=job).order_by("created_at")
    answered = {(line["custom_id"], line["status"]) for line in sim.batch_lines()}
    ok_first = {row_of(cid) for cid, status in answered if cid.endswith(":1") and status == 200}
    ok_second = {row_of(cid) for cid, status in answered if cid.endswith(":2") and status == 200}
    assert (first.attempt, first.provider_status, second.attempt) == (1, "expired", 2)
    assert {row_of(cid) for cid in input_custom_ids(here_too, second)} == set(range(30)) - ok_first
    assert all(cid.endswith(":2") for cid in input_custom_ids(here_too, second))
    assert ProviderBatch.objects.filter(job=job).count() == 2
    done = set(ExtractRow.objects.filter(job=job, status=RowStatus.DONE).values_list("index", flat=True))
    assert done == ok_first | ok_second
    failed = ExtractRow.objects.filter(job=job, status=RowStatus.FAILED)
    assert set(failed.values_list("index", flat=True)) == set(range(30)) - done
    assert {row.attempts for row in failed} <= {2}
    assert (final.state, final.count_done, final.count_failed) == (JobState.DONE, len(done), 30 - len(done))


def test_a_worker_killed_between_upload_and_create_leaves_one_batch_and_every_row_once(
    start_worker, sim, here_too, airline_rows
):
    """The kill is played in this process: the submit's steps run here up to
    the upload (record `uploaded`, file at the provider, no batch), the
    job's task is dropped from the broker as a killed worker's would be,
    and the clock is moved past the time its create call could still be
    under way. A real worker then finds the record (its poll enqueues the
    submission again) and creates the batch once. Here the create never
    reached the provider; the real SIGKILL below covers a batch created
    whose answer was lost."""
    job = start(airline_rows[:12], mode="batch")
    OrmQ.objects.all().delete()
    lifecycle.job_mark_running(job_id=job.pk)
    with submit.tempfile.TemporaryFile() as file:
        record, _, _ = submit.Submitter(ExtractJob.objects.get(pk=job.pk), here_too).fill(file)
        file.seek(0)
        file_id = here_too.upload("killed.jsonl", file)
    long_ago = timezone.now() - timedelta(hours=1)
    ProviderBatch.objects.filter(pk=record.pk).update(
        state="uploaded", input_file_id=file_id, updated_at=long_ago
    )
    ExtractJob.objects.filter(pk=job.pk).update(work_enqueued_at=long_ago)

    start_worker("batch", **BATCH_WORKER)
    final = wait_for(lambda: ended(job))

    ours = [
        b.id
        for b in here_too.client.batches.list(limit=100)
        if b.metadata.get("stringsight_batch") == str(record.pk)
    ]
    assert ours == [ProviderBatch.objects.get(pk=record.pk).batch_id]
    assert ProviderBatch.objects.filter(job=job).count() == 1
    assert (final.state, final.count_done) == (JobState.DONE, 12)
    assert sorted(row_of(line["custom_id"]) for line in sim.batch_lines()) == list(range(12))
    assert final.properties_count == Property.objects.filter(job=job).count()


def test_a_worker_sigkilled_while_its_create_is_unanswered_leaves_one_batch_and_every_row_once(
    start_worker, sim, here_too, airline_rows
):
    """A real SIGKILL between upload and the create's answer: the simulator
    creates the batch and holds its answer 30 s, longer than the workers'
    LLM timeout (10 s), so the killed worker never learnt the batch's id.
    A new cluster waits that timeout and a lease for the dead worker's
    call, then finds the batch by its metadata instead of creating another."""
    worker_settings = {**BATCH_WORKER, "STRINGSIGHT_LLM_TIMEOUT": "10", "STRINGSIGHT_LEASE_SECONDS": "2"}
    sim.configure(batch_create_delay_seconds=30)
    killed = start_worker("killed", **worker_settings)
    job = start(airline_rows[:12], mode="batch")

    def create_unanswered():
        record = ProviderBatch.objects.filter(job=job, state="uploaded", batch_id="").first()
        listed = here_too.client.batches.list(limit=100).data
        return record and [b for b in listed if (b.metadata or {}).get("stringsight_batch") == str(record.pk)]

    wait_for(create_unanswered)
    killed.kill()
    sim.configure(batch_create_delay_seconds=0)
    start_worker("again", **worker_settings)
    final = wait_for(lambda: ended(job))

    record = ProviderBatch.objects.get(job=job)
    at_provider = [(b.id, b.metadata) for b in here_too.client.batches.list(limit=100)]
    # The worker died inside its create call, not after the call timed out.
    assert "left to the recovery" not in killed.log_path.read_text()
    assert at_provider == [(record.batch_id, {"stringsight_batch": str(record.pk)})]
    assert (record.state, record.attempt) == ("imported", 1)
    assert (final.state, final.count_done, final.count_failed) == (JobState.DONE, 12, 0)
    assert sorted(row_of(line["custom_id"]) for line in sim.batch_lines()) == list(range(12))
    assert set(ExtractRow.objects.filter(job=job).values_list("attempts", flat=True)) == {1}
    assert final.properties_count == Property.objects.filter(job=job).count()


def test_a_worker_killed_between_completion_and_import_imports_every_line_once(
    start_worker, sim, here_too, airline_rows, monkeypatch
):
    """The kill is played in this process: the batch is submitted and, once
    the provider completed it, its first 5 lines are imported here and the
    import stops, as a worker killed mid-import would leave it (the record
    still `submitted`, its last touch long ago). A real worker's poll then
    imports the batch again: the 5 lines are skipped, the others recorded."""
    job = start(airline_rows[:12], mode="batch")
    OrmQ.objects.all().delete()
    submit.submit_batches(job_id=job.pk)
    record = ProviderBatch.objects.get(job=job)
    wait_for(lambda: here_too.retrieve(record.batch_id).status == "completed")
    found = here_too.retrieve(record.batch_id)
    ProviderBatch.objects.filter(pk=record.pk).update(
        provider_status="completed", output_file_id=found.output_file_id
    )
    record.refresh_from_db()
    importer = importing.Importer(record, ExtractJob.objects.get(pk=job.pk), here_too)
    first_five = list(here_too.lines(record.output_file_id))[:5]
    importer.record([lines.read_result_line(raw, job_id=job.pk, api_key="sim-key") for raw in first_five])
    ProviderBatch.objects.filter(pk=record.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    halfway = ExtractJob.objects.get(pk=job.pk)

    start_worker("batch", **BATCH_WORKER)
    final = wait_for(lambda: ended(job))

    assert (halfway.count_done, halfway.state) == (5, JobState.RUNNING)
    assert (final.state, final.count_done, final.count_failed) == (JobState.DONE, 12, 0)
    assert final.properties_count == Property.objects.filter(job=job).count()
    assert ProviderBatch.objects.get(pk=record.pk).state == "imported"
    assert len(sim.batch_lines()) == 12  # nothing sent again


def test_a_worker_sigkilled_mid_import_leaves_every_row_imported_once(start_worker, sim):
    """A real SIGKILL: 3,000 rows come back in one output file, imported 500
    lines a transaction; the cluster is killed once the first lines are
    recorded and before the last, and a new cluster imports the batch again
    (STRINGSIGHT_LEASE_SECONDS=2: it waits that long for the dead import)."""
    rows = simple_rows(3000)
    worker = start_worker("killed", **BATCH_WORKER, STRINGSIGHT_LEASE_SECONDS="2")
    job = start(rows, mode="batch")
    wait_for(lambda: ExtractJob.objects.get(pk=job.pk).count_done > 0, interval=0.02)
    worker.kill()
    at_kill = ExtractJob.objects.get(pk=job.pk)

    start_worker("again", **BATCH_WORKER, STRINGSIGHT_LEASE_SECONDS="2")
    final = wait_for(lambda: ended(job))

    assert 0 < at_kill.count_done < 3000, "the kill should land mid-import"
    assert (final.state, final.count_done, final.count_failed) == (JobState.DONE, 3000, 0)
    assert final.properties_count == Property.objects.filter(job=job).count()
    assert set(ExtractRow.objects.filter(job=job).values_list("attempts", flat=True)) == {1}
    assert len(sim.batch_lines()) == 3000  # nothing sent again
    assert ProviderBatch.objects.get(job=job).state == "imported"
