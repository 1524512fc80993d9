"""Submission: a batch job's rows answered from the completion cache at
once, the rest (as far as the budget reaches) sent in provider batches of
at most 50,000 lines and 200 MB.

Each batch is recorded before each provider call that creates something:
the ProviderBatch and its rows (preparing), then the input file's id
(uploaded), then the batch's id (submitted). A worker killed between two
steps leaves a record that the next submit task finishes
(resume_stale_batches): nothing is sent twice and nothing is orphaned.
"""

import logging
import tempfile
import time
import uuid
from datetime import timedelta

import openai
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django_q.tasks import async_task

from extraction.extract import CacheKeys, build_messages, outcome_from_answer
from extraction.llm import fatal_message

from ..events import log_event
from ..models import (
    ACTIVE_STATES,
    ExtractJob,
    ExtractRow,
    JobMode,
    ProviderBatch,
    ProviderBatchState,
    RowStatus,
)
from ..services import cache, claims, lifecycle
from ..services.sql import ClaimedRow
from ..worker.engine import WorkerSettings, extraction_spec
from .lines import request_line
from .provider import UPLOAD_TIMEOUT_FACTOR, BatchProvider, NoBatchApi
from .records import worker_id_for

log = logging.getLogger(__name__)

# The provider's limits per batch (OpenAI's Batch API).
MAX_LINES = 50_000
MAX_BYTES = 200 * 1024 * 1024
# Rows taken per claim while a batch fills: a row may be 2 MB, so this
# bounds what a claim holds in memory.
ROWS_PER_CLAIM = 200


def submit_batches(*, job_id) -> str:
    """The task (jobs.tasks.submit_batches): finish the steps a killed
    worker left, then send the job's pending rows. Safe to run any number
    of times at once: rows are claimed, and a half-made batch is taken over
    only by one task, once its maker can no longer be working on it."""
    job = ExtractJob.objects.filter(pk=job_id, mode=JobMode.BATCH).first()
    if job is None:
        return "no such batch job"
    ExtractJob.objects.filter(pk=job_id).update(work_enqueued_at=timezone.now())
    provider = BatchProvider.from_django()
    try:
        resumed = resume_stale_batches(job=job, provider=provider)
        sent = send_pending_rows(job=job, provider=provider)
    except NoBatchApi as exc:
        return end_job(job, error=str(exc))
    except openai.APIError as exc:
        # What every batch would get too (a refused key, a spent quota) ends
        # the job; anything else is retried by the recovery.
        fatal = fatal_message(exc, job.model_name, provider.api_key)
        if fatal is None:
            raise
        return end_job(job, error=fatal)
    finally:
        provider.close()
    return f"sent {sent} batches; finished {resumed} left by a stopped worker"


def end_job(job: ExtractJob, *, error: str) -> str:
    """The job cannot be sent: its batches not yet created are abandoned
    (their rows with the job's), and the job ends in error."""
    for batch in ProviderBatch.objects.filter(
        job_id=job.pk, state__in=(ProviderBatchState.PREPARING, ProviderBatchState.UPLOADED)
    ):
        abandon(batch)
    lifecycle.job_fail(job_id=job.pk, error=error)
    return error


class Submitter:
    """Fills and sends one job's batches."""

    def __init__(self, job: ExtractJob, provider: BatchProvider):
        self.job = job
        self.provider = provider
        config = WorkerSettings.from_django()
        self.spec = extraction_spec(job, config)
        self.keys = CacheKeys(self.spec, base_url=config.base_url)
        # Rows taken but not yet in a batch are this submitter's, on a lease
        # like a worker's: if it dies they come back to pending.
        self.worker_id = f"submit:{uuid.uuid4().hex[:12]}"

    def line(self, row: ClaimedRow, attempt: int) -> bytes:
        return request_line(
            job_id=self.job.pk,
            row_index=row.index,
            attempt=attempt,
            messages=build_messages(row.data, self.spec),
            spec=self.spec,
        )

    def answer_from_cache(self, rows: list[ClaimedRow]) -> list[ClaimedRow]:
        """Record the rows whose answer is cached, as the online engine does
        (same key, same recording); return the others."""
        if not self.job.use_cache or not rows:
            return rows
        keys = {row.id: self.keys.key(build_messages(row.data, self.spec)) for row in rows}
        hits = cache.cached_answers(keys=list(keys.values()))
        answered = [
            (
                row,
                outcome_from_answer(
                    hits[keys[row.id]], row.data, question_id=row.question_id, spec=self.spec
                ),
            )
            for row in rows
            if keys[row.id] in hits
        ]
        if answered:
            claims.record_row_results(
                job_id=self.job.pk, worker_id=self.worker_id, results=answered, model_name=self.job.model_name
            )
        return [row for row in rows if keys[row.id] not in hits]

    def fill(self, file) -> tuple[ProviderBatch | None, int, bool]:
        """Claim pending rows into a new batch, writing their lines to
        `file`, until it is full or none is left. Returns the batch (None
        if no row was left to send), its lines, and whether rows are left."""
        batch, lines, size = None, 0, 0
        while lines < MAX_LINES:
            claim = claims.claim_rows(
                job_id=self.job.pk, worker_id=self.worker_id, limit=min(ROWS_PER_CLAIM, MAX_LINES - lines)
            )
            if not claim.rows:
                # None pending, or none the budget can pay for until the
                # batches in flight are imported (which submits again).
                return batch, lines, False
            rows = self.answer_from_cache(claim.rows)
            attempts = dict(
                ExtractRow.objects.filter(pk__in=[row.id for row in rows]).values_list("pk", "attempts")
            )
            fitting, encoded = [], []
            for row in rows:
                line = self.line(row, attempt=attempts[row.id] + 1)
                if size + len(line) > MAX_BYTES:
                    break
                size += len(line)
                fitting.append(row)
                encoded.append(line)
            if fitting and batch is None:
                # The record first: rows are linked to it before anything is sent.
                batch = ProviderBatch.objects.create(job_id=self.job.pk, state=ProviderBatchState.PREPARING)
            linked = link_rows(batch, fitting, taken_by=self.worker_id)
            file.writelines(line for row, line in zip(fitting, encoded, strict=True) if row.id in linked)
            lines += len(linked)
            claims.give_back_rows(worker_id=self.worker_id, job_id=self.job.pk)  # those that did not fit
            if len(fitting) < len(rows):
                return batch, lines, True
            if not claim.job_running or not claim.pending_left:
                return batch, lines, False
        return batch, lines, True


def send_pending_rows(*, job: ExtractJob, provider: BatchProvider) -> int:
    """Send the job's pending rows in as many batches as they need; the
    batches sent. Stops when the job stops running, the budget holds no
    more rows, or half the task's time is spent (another task goes on)."""
    if job.state not in ACTIVE_STATES:
        return 0
    lifecycle.job_mark_running(job_id=job.pk)
    submitter = Submitter(job, provider)
    deadline = time.monotonic() + settings.Q_TASK_TIMEOUT / 2
    sent = 0
    more = True
    while more:
        if time.monotonic() > deadline:
            async_task("jobs.tasks.submit_batches", str(job.pk))
            break
        with tempfile.TemporaryFile() as file:
            batch, lines, more = submitter.fill(file)
            if batch is None:
                break
            if not lines:
                abandon(batch)  # a cancel closed every row it took
                break
            _set_attempt(batch)
            file.seek(0)
            sent += send(batch, provider, file)
        ExtractJob.objects.filter(pk=job.pk).update(work_enqueued_at=timezone.now())
    return sent


def send(batch: ProviderBatch, provider: BatchProvider, file) -> int:
    """Upload the batch's input file and create the batch, storing each
    step's result before the next. Returns 1 when the batch was created."""
    if not _still_wanted(batch):
        abandon(batch)
        return 0
    try:
        file_id = provider.upload(f"stringsight-{batch.job_id}-{batch.pk}.jsonl", file)
    except openai.APIError:
        # Nothing that needs a record was made (a file without a batch is
        # harmless): the rows go back to pending, and the poll enqueues
        # their submission again after a lease (poll.enqueue_submit_work).
        abandon(batch)
        raise
    if not ProviderBatch.objects.filter(pk=batch.pk, state=ProviderBatchState.PREPARING).update(
        state=ProviderBatchState.UPLOADED, input_file_id=file_id, updated_at=timezone.now()
    ):
        return 0  # another task took the batch over (we were too slow); its file is its own
    batch.refresh_from_db()
    return create(batch, provider)


def create(batch: ProviderBatch, provider: BatchProvider) -> int:
    if not _still_wanted(batch):
        abandon(batch)
        return 0
    try:
        created = provider.create(input_file_id=batch.input_file_id, record_id=str(batch.pk))
    except openai.APIError as exc:
        if fatal_message(exc, "", provider.api_key) is not None:
            raise
        # The batch may or may not exist: the recovery finds out by its
        # metadata once this call can no longer be under way.
        log.warning(
            "batch %s of job %s: create failed (%s); left to the recovery", batch.pk, batch.job_id, exc
        )
        return 0
    store_created(batch, created)
    return 1


def store_created(batch: ProviderBatch, created) -> None:
    ProviderBatch.objects.filter(pk=batch.pk, state=ProviderBatchState.UPLOADED).update(
        state=ProviderBatchState.SUBMITTED,
        batch_id=created.id,
        provider_status=created.status,
        request_counts=_counts(created),
        updated_at=timezone.now(),
    )
    log_event("batch_submitted", job_id=batch.job_id, batch=str(batch.pk), batch_id=created.id)


def link_rows(batch: ProviderBatch, rows: list[ClaimedRow], *, taken_by: str) -> set[int]:
    """Hand the claimed rows to the batch: they stay running, now the
    batch's, with no lease (the provider holds them, not a worker). Rows a
    cancel closed meanwhile are not linked. Returns the ids linked."""
    if not rows:
        return set()
    ids = [row.id for row in rows]
    mine = ExtractRow.objects.filter(pk__in=ids, status=RowStatus.RUNNING, claimed_by=taken_by)
    linked = mine.update(claimed_by=worker_id_for(batch), provider_batch=batch, lease_expires_at=None)
    ProviderBatch.objects.filter(pk=batch.pk).update(updated_at=timezone.now())
    if linked == len(ids):
        return set(ids)
    return set(
        ExtractRow.objects.filter(pk__in=ids, claimed_by=worker_id_for(batch)).values_list("pk", flat=True)
    )


def abandon(batch: ProviderBatch) -> None:
    """A batch not created at the provider will not be: its rows go back to
    pending if the job still runs, else they are cancelled with it."""
    now = timezone.now()
    with transaction.atomic():
        if not ProviderBatch.objects.filter(
            pk=batch.pk, state__in=(ProviderBatchState.PREPARING, ProviderBatchState.UPLOADED)
        ).update(state=ProviderBatchState.ABANDONED, updated_at=now):
            return
        active = ExtractJob.objects.filter(pk=batch.job_id, state__in=ACTIVE_STATES).exists()
        rows = ExtractRow.objects.filter(
            provider_batch=batch, status=RowStatus.RUNNING, claimed_by=worker_id_for(batch)
        )
        if active:
            rows.update(status=RowStatus.PENDING, claimed_by="", started_at=None)
        else:
            rows.update(status=RowStatus.CANCELLED, finished_at=now)
    log_event("batch_abandoned", job_id=batch.job_id, batch=str(batch.pk))


def resume_stale_batches(*, job: ExtractJob, provider: BatchProvider) -> int:
    """Finish the batches a killed worker left half made: preparing (its
    rows linked, nothing created) is uploaded again from its rows; uploaded
    is looked for at the provider by its metadata, stored if found, else
    created now. A batch is taken over only once its maker's calls must
    have ended (stale_since), and by one task (the conditional update)."""
    now = timezone.now()
    resumed = 0
    for batch in ProviderBatch.objects.filter(
        job_id=job.pk, state__in=(ProviderBatchState.PREPARING, ProviderBatchState.UPLOADED)
    ):
        if batch.updated_at >= stale_since(batch.state, now):
            continue
        if not ProviderBatch.objects.filter(
            pk=batch.pk, state=batch.state, updated_at=batch.updated_at
        ).update(updated_at=now):
            continue  # another task took it
        batch.refresh_from_db()
        log_event("batch_resumed", job_id=job.pk, batch=str(batch.pk), state=batch.state)
        if batch.state == ProviderBatchState.PREPARING:
            resumed += _upload_again(batch, job, provider)
            continue
        found = provider.find(record_id=str(batch.pk), created_after=batch.created_at.timestamp())
        if found is not None:
            store_created(batch, found)
            resumed += 1
        else:
            resumed += create(batch, provider)
    return resumed


def stale_since(state: str, now):
    """Before this, a batch in `state` cannot have a living maker: its
    upload or create call would have timed out, with a lease to spare."""
    timeout = settings.STRINGSIGHT_LLM_TIMEOUT
    if state == ProviderBatchState.PREPARING:
        timeout *= UPLOAD_TIMEOUT_FACTOR
    return now - timedelta(seconds=timeout + settings.STRINGSIGHT_LEASE_SECONDS)


def _upload_again(batch: ProviderBatch, job: ExtractJob, provider: BatchProvider) -> int:
    submitter = Submitter(job, provider)
    rows = ExtractRow.objects.filter(
        provider_batch=batch, status=RowStatus.RUNNING, claimed_by=worker_id_for(batch)
    ).order_by("index")
    with tempfile.TemporaryFile() as file:
        count = 0
        for row in rows.only("id", "index", "question_id", "data", "input_index", "attempts").iterator(500):
            claimed = ClaimedRow(row.id, row.index, row.question_id, row.data, row.input_index)
            file.write(submitter.line(claimed, attempt=row.attempts + 1))
            count += 1
        if not count:
            abandon(batch)
            return 0
        file.seek(0)
        return send(batch, provider, file)


def _set_attempt(batch: ProviderBatch) -> None:
    """A batch's attempt: 1 for rows sent the first time, n + 1 for rows
    whose lines failed n times."""
    attempts = ExtractRow.objects.filter(provider_batch=batch).values_list("attempts", flat=True)
    ProviderBatch.objects.filter(pk=batch.pk).update(attempt=max(attempts, default=0) + 1)


def _still_wanted(batch: ProviderBatch) -> bool:
    batch.refresh_from_db(fields=["cancel_requested", "state"])
    if batch.cancel_requested:
        return False
    return ExtractJob.objects.filter(pk=batch.job_id, state__in=ACTIVE_STATES).exists()


def _counts(batch) -> dict:
    counts = getattr(batch, "request_counts", None)
    if counts is None:
        return {}
    return {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
