"""A job's life: start, cancel, resume, delete, fail. The API, admin and CLI
call these for every change to a job and hold no rules of their own; a
rule that refuses raises one of .errors (what a start may ask for is
accepted first, by .options)."""

import math
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.tasks import async_task

from extraction.rows import encode_row, input_index_for, question_id_for, sample_indexes

from ..batchmode.records import close_rows_not_at_provider, request_cancel, rows_at_provider
from ..events import log_event
from ..models import (
    ACTIVE_STATES,
    ExtractJob,
    ExtractRow,
    IdempotencyKey,
    JobKind,
    JobMode,
    JobState,
    Property,
    RowStatus,
)
from .budgets import (
    check_daily_budget,
    daily_budget_on_resume,
    estimate_cost,
    price_for,
    require_price,
)
from .claims import claim_rows
from .errors import JobConflict
from .idempotency import IdempotentStart, StartOutcome, start_replay, take_idempotency_key
from .limits import check_active_jobs
from .params import JobParams
from .sql import ClaimedRow, close_unfinished_rows, insert_rows


def job_start(
    *,
    owner,
    rows: list[dict[str, Any]],
    params: JobParams,
    encoded_rows: list[str] | None = None,
    idempotency: IdempotentStart | None = None,
) -> ExtractJob:
    """Store the job and its (sampled) rows in one transaction, then enqueue
    its work. `encoded_rows` are the rows' JSON texts when the caller has
    them already (options.accept_start measured each row's size with them).
    Raises LimitReached when the owner has as many active jobs as they may,
    or their daily budget cannot pay for it. With `idempotency`, an
    IntegrityError means another start took the key first (see
    job_start_once)."""
    picked = sample_indexes(len(rows), params.sample_size)
    texts = [encoded_rows[at] if encoded_rows else encode_row(rows[at]) for at in picked]
    estimate = estimate_cost(params, texts)
    with transaction.atomic():
        owner_id = owner.pk if owner is not None else None
        check_active_jobs(owner_id=owner_id)
        check_daily_budget(owner_id=owner_id, model_name=params.model_name, estimate=estimate)
        job = _create_job(owner=owner, params=params, count_total=len(picked), estimated_cost_usd=estimate)
        if idempotency is not None:
            # Before the rows: a concurrent start with the same key waits
            # here for this one to commit (PostgreSQL) or runs after it
            # (SQLite), then fails on the unique constraint, having stored
            # nothing.
            key = take_idempotency_key(owner=owner, idempotency=idempotency, job=job)
        insert_rows(
            job,
            [
                (index, question_id_for(rows[at], index), texts[index], input_index_for(rows[at], at))
                for index, at in enumerate(picked)
            ],
        )
        if idempotency is not None:
            IdempotencyKey.objects.filter(pk=key.pk).update(answer=idempotency.answer(job))
        transaction.on_commit(lambda: start_work(job=job))
    log_event("job_started", job_id=job.id, rows=len(picked), model=params.model_name, method=params.method)
    return job


def _create_job(*, owner, params: JobParams, count_total: int, **fields) -> ExtractJob:
    # The price of the job's mode: a batch job pays the provider's batch price.
    price_input, price_output = price_for(params.model_name, params.mode) or (None, None)
    return ExtractJob.objects.create(
        owner=owner,
        count_total=count_total,
        price_input_per_mtok=price_input,
        price_output_per_mtok=price_output,
        **vars(params),
        **fields,
    )


def single_row_start(
    *, owner, row: dict[str, Any], params: JobParams, encoded_row: str, worker_id: str
) -> tuple[ExtractJob, "ClaimedRow | None"]:
    """A one-row job that the web request extracts itself (/extract/single):
    no task is enqueued; it is marked running and its row is claimed by
    `worker_id`, as a worker would, so recording its result, a cancel and
    the sweep treat it like any other job. The row is None when the claim
    found nothing to take (the job was cancelled at once, or a budget could
    not pay for the call). Raises LimitReached as job_start does."""
    estimate = estimate_cost(params, [encoded_row])
    with transaction.atomic():
        owner_id = owner.pk if owner is not None else None
        check_active_jobs(owner_id=owner_id)
        check_daily_budget(owner_id=owner_id, model_name=params.model_name, estimate=estimate)
        job = _create_job(
            owner=owner, params=params, count_total=1, kind=JobKind.SINGLE, estimated_cost_usd=estimate
        )
        insert_rows(job, [(0, question_id_for(row, 0), encoded_row, input_index_for(row, 0))])
    log_event(
        "job_started", job_id=job.id, rows=1, model=params.model_name, method=params.method, kind=job.kind
    )
    job_mark_running(job_id=job.id)
    claim = claim_rows(job_id=job.id, worker_id=worker_id, limit=1)
    job.refresh_from_db()
    return job, (claim.rows[0] if claim.rows else None)


def job_start_once(
    *,
    owner,
    idempotency: IdempotentStart,
    rows: list[dict[str, Any]],
    params: JobParams,
    encoded_rows: list[str] | None = None,
) -> StartOutcome:
    """job_start for a start sent with an Idempotency-Key: of any number
    of starts with one key, sent one after another or all at once, the
    first creates the job and every other answers with it."""
    try:
        job = job_start(
            owner=owner, rows=rows, params=params, encoded_rows=encoded_rows, idempotency=idempotency
        )
    except IntegrityError:
        replay = start_replay(owner=owner, idempotency=idempotency)
        if replay is None:
            raise
        return replay
    return StartOutcome(job_id=job.id, answer=idempotency.answer(job), replayed=False)


def start_work(*, job: ExtractJob) -> None:
    """Enqueue the job's work: a batch job's submission (its rows go to the
    provider's Batch API; the online engine never serves it), else enough
    workers for its max_workers."""
    if job.mode == JobMode.BATCH:
        ExtractJob.objects.filter(pk=job.pk).update(work_enqueued_at=timezone.now())
        async_task("jobs.tasks.submit_batches", str(job.pk))
    else:
        wake_workers(job_id=job.pk, max_workers=job.max_workers)


def wake_workers(*, job_id, max_workers: int) -> int:
    """Make sure enough worker processes serve the jobs for this one's
    max_workers: a worker already serving takes the job up at its next
    poll, and each task waiting in the broker starts one more (which takes
    part in every job). Returns the tasks enqueued."""
    ExtractJob.objects.filter(pk=job_id).update(work_enqueued_at=timezone.now())
    wanted = min(
        settings.Q_CLUSTER["workers"], math.ceil(max_workers / settings.STRINGSIGHT_WORKER_CONCURRENCY)
    )
    tasks = max(1, wanted) - get_broker().queue_size()
    for _ in range(tasks):
        async_task("jobs.tasks.serve_jobs")
    return max(0, tasks)


def wake_a_worker() -> bool:
    """One more worker process (on any machine) for the running jobs,
    unless a task already waits in the broker for one."""
    if get_broker().queue_size():
        return False
    async_task("jobs.tasks.serve_jobs")
    return True


def job_mark_running(*, job_id) -> None:
    if ExtractJob.objects.filter(pk=job_id, state=JobState.QUEUED).update(
        state=JobState.RUNNING, started_at=timezone.now()
    ):
        log_event("job_running", job_id=job_id)


@dataclass(frozen=True)
class CancelOutcome:
    job: ExtractJob
    cancelled_now: bool

    @property
    def message(self) -> str:
        if self.job.state == JobState.CANCELLED:
            return "job cancelled" if self.cancelled_now else "job was already cancelled"
        return f"job had already finished (state: {self.job.state}); nothing was cancelled"


def job_cancel(*, job: ExtractJob, refuse_finished: bool = False) -> CancelOutcome:
    """Cancel at once and for good: the job and its unfinished rows become
    `cancelled` together. A row result racing with this either commits
    before it (and is counted in the reported properties_count) or finds the
    job no longer running and is discarded, so the count never changes.

    A job that had already ended is left as it is. Cancelling one that
    ended done or in error is a JobConflict with `refuse_finished` (the
    RESTful API); elsewhere the outcome says so (the seed path answers as
    upstream StringSight does, and its frontend shows any error as "Failed
    to cancel", also for a click that raced the job's last row)."""
    now = timezone.now()
    with transaction.atomic():
        won = ExtractJob.objects.filter(pk=job.pk, state__in=ACTIVE_STATES).update(
            state=JobState.CANCELLED, cancelled_at=now, finished_at=now
        )
        if won:
            _close_rows(job_id=job.pk, mode=job.mode, now=now)
        job.refresh_from_db()
    if won:
        log_event("job_cancelled", job_id=job.pk, properties_count=job.properties_count)
    elif refuse_finished and job.state != JobState.CANCELLED:
        raise JobConflict(f"job already finished (state: {job.state})")
    return CancelOutcome(job=job, cancelled_now=bool(won))


def _close_rows(*, job_id, mode: str, now) -> None:
    """An ended job's unfinished rows are cancelled, in the job's
    transaction. A batch job's rows at the provider stay running until
    their batch is imported (the provider may complete and bill them), and
    its open batches are cancelled at the provider after the commit."""
    if mode != JobMode.BATCH:
        close_unfinished_rows(job_id=job_id, status=RowStatus.CANCELLED, now=now)
        return
    close_rows_not_at_provider(job_id=job_id, status=RowStatus.CANCELLED, now=now)
    if request_cancel(job_id=job_id):
        transaction.on_commit(lambda: async_task("jobs.tasks.cancel_batches", str(job_id)))


def job_resume(
    *,
    job: ExtractJob,
    retry_failed: bool = False,
    max_cost_usd: float | None = None,
    max_total_tokens: int | None = None,
) -> ExtractJob:
    """Run a cancelled, failed or done job's unfinished rows again (and its
    failed rows, with retry_failed). Done rows are never sent again. A new
    budget may be given, since a job stopped by its budget needs a larger
    one. The job is active again, so it counts against its owner's active
    jobs (LimitReached). JobConflict when the job cannot be resumed."""
    if max_cost_usd is not None:
        require_price(job.model_name)
    resumable = [JobState.CANCELLED, JobState.ERROR] + ([JobState.DONE] if retry_failed else [])
    statuses = [RowStatus.PENDING, RowStatus.RUNNING, RowStatus.CANCELLED]
    if retry_failed:
        statuses.append(RowStatus.FAILED)
    with transaction.atomic():
        locked = ExtractJob.objects.select_for_update().filter(pk=job.pk, state__in=resumable).first()
        if locked is None:
            raise JobConflict(_not_resumable_reason(job, retry_failed))
        # After the job's lock: a worker's grant takes the job's, then the owner's.
        check_active_jobs(owner_id=locked.owner_id)
        rows = ExtractRow.objects.filter(job_id=job.pk, status__in=statuses)
        if locked.mode == JobMode.BATCH:
            # Rows a batch still holds come back with its import.
            rows = rows.exclude(pk__in=rows_at_provider(job.pk).values("pk"))
        budget_changes = daily_budget_on_resume(locked, rows, now=timezone.now())
        retried_failures = rows.filter(status=RowStatus.FAILED).count() if retry_failed else 0
        reopened = rows.update(
            status=RowStatus.PENDING,
            error="",
            claimed_by="",
            lease_expires_at=None,
            lease_expiries=0,
            finished_at=None,
        )
        if not reopened:
            raise JobConflict(f"job has no rows to run again (state: {locked.state})")
        changes = {
            "state": JobState.QUEUED,
            "error": "",
            "finished_at": None,
            "cancelled_at": None,
            "count_failed": F("count_failed") - retried_failures,
            **budget_changes,
        }
        if max_cost_usd is not None:
            changes["max_cost_usd"] = max_cost_usd
        if max_total_tokens is not None:
            changes["max_total_tokens"] = max_total_tokens
        ExtractJob.objects.filter(pk=job.pk).update(**changes)
        transaction.on_commit(lambda: start_work(job=locked))
    log_event("job_resumed", job_id=job.pk, rows=reopened, retry_failed=retry_failed)
    job.refresh_from_db()
    return job


def _not_resumable_reason(job: ExtractJob, retry_failed: bool) -> str:
    job.refresh_from_db(fields=["state"])
    if job.state in ACTIVE_STATES:
        return f"job is still {job.state}; cancel it before resuming"
    return f"job already finished (state: {job.state}); only retry_failed can run its failed rows again"


def job_delete(*, job: ExtractJob) -> None:
    """Delete a finished job with its rows and properties. The bulk deletes
    skip Django's object-by-object cascade, which would load every row."""
    with transaction.atomic():
        if (
            not ExtractJob.objects.select_for_update()
            .filter(pk=job.pk)
            .exclude(state__in=ACTIVE_STATES)
            .exists()
        ):
            raise JobConflict(f"job is still {job.state}; cancel it before deleting it")
        Property.objects.filter(job_id=job.pk).delete()
        job_column = ExtractRow._meta.get_field("job")
        with connection.cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {ExtractRow._meta.db_table} WHERE {job_column.column} = %s",
                [job_column.get_db_prep_value(job.pk, connection)],
            )
        ExtractJob.objects.filter(pk=job.pk).delete()
    log_event("job_deleted", job_id=job.pk)


def job_fail(*, job_id, error: str) -> bool:
    """End a job that cannot go on (the LLM refuses our credentials, say),
    keeping every row already done."""
    now = timezone.now()
    with transaction.atomic():
        won = ExtractJob.objects.filter(pk=job_id, state__in=ACTIVE_STATES).update(
            state=JobState.ERROR, error=error, finished_at=now
        )
        if won:
            mode = ExtractJob.objects.filter(pk=job_id).values_list("mode", flat=True).first()
            _close_rows(job_id=job_id, mode=mode, now=now)
    if won:
        log_event("job_failed", job_id=job_id, error=error)
    return bool(won)


def require_result_ready(job: ExtractJob) -> None:
    """A job's properties are its result once it has ended; before, they
    still change (JobConflict)."""
    if job.is_active:
        raise JobConflict(
            f"job is not finished (state: {job.state}); results are ready once it is done, cancelled or error"
        )


def job_state(*, job_id) -> str | None:
    return ExtractJob.objects.filter(pk=job_id).values_list("state", flat=True).first()
