"""The rules of a job's life: start, claim rows, record a row's result,
cancel, fail, finish. The API, admin, CLI and tasks call these and hold no
rules of their own.

Every state change is a conditional UPDATE whose row count says who won a
race. Transactions that touch a job lock the job row first and its rows
second, so they never deadlock each other; on SQLite, IMMEDIATE
transactions serialise them outright.
"""

import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import F, FloatField, Q, Sum, Value
from django.db.models.functions import Greatest
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.tasks import async_task

from extraction.extract import RowOutcome
from extraction.render import render_row
from extraction.rows import encode_row, input_index_for, question_id_for, sample_indexes

from .events import log_event
from .models import (
    ACTIVE_STATES,
    PROPERTY_CONTENT,
    CompletionCache,
    ExtractJob,
    ExtractRow,
    Heartbeat,
    IdempotencyKey,
    JobKind,
    JobState,
    Property,
    RowStatus,
    ThrottleBucket,
    WorkerSlots,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobParams:
    method: str
    system_prompt: str
    resolved_system_prompt: str
    task_description: str
    model_name: str
    temperature: float
    top_p: float
    max_tokens: int
    max_workers: int
    include_scores_in_prompt: bool = False
    sample_size: int | None = None
    use_cache: bool = True
    max_cost_usd: float | None = None
    max_total_tokens: int | None = None


def price_for(model_name: str) -> tuple[float, float] | None:
    """(input, output) USD per million tokens, or None when unknown."""
    return settings.STRINGSIGHT_PRICES.get(model_name)


def model_allowed(model_name: str) -> bool:
    """Whether the operator lets jobs use this model (STRINGSIGHT_ALLOWED_MODELS)."""
    allowed = settings.STRINGSIGHT_ALLOWED_MODELS
    return "*" in allowed or model_name in allowed


class DailyBudgetExceeded(Exception):
    pass


@dataclass(frozen=True)
class IdempotentStart:
    """A start sent with an Idempotency-Key. `request_hash` identifies its
    request; `answer` renders the start's response body (JSON text) from
    the new job, and every replay of the key gives that same text."""

    key: str
    request_hash: str
    answer: Callable[[ExtractJob], str]


@dataclass(frozen=True)
class StartOutcome:
    job_id: uuid.UUID
    answer: str
    replayed: bool


class IdempotencyKeyReused(Exception):
    pass


IDEMPOTENCY_KEY_LIFETIME = timedelta(hours=24)


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
    them already (the API measured each row's size with them). Raises
    DailyBudgetExceeded when the owner's daily budget cannot pay for it.
    With `idempotency`, an IntegrityError means another start took the key
    first (see job_start_once)."""
    picked = sample_indexes(len(rows), params.sample_size)
    texts = [encoded_rows[at] if encoded_rows else encode_row(rows[at]) for at in picked]
    estimate = estimate_cost(params, texts)
    with transaction.atomic():
        check_daily_budget(owner=owner, model_name=params.model_name, estimate=estimate)
        job = _create_job(owner=owner, params=params, count_total=len(picked), estimated_cost_usd=estimate)
        if idempotency is not None:
            # Before the rows: a concurrent start with the same key waits
            # here for this one to commit (PostgreSQL) or runs after it
            # (SQLite), then fails on the unique constraint, having stored
            # nothing.
            key = _take_idempotency_key(owner=owner, idempotency=idempotency, job=job)
        _insert_rows(
            job,
            [
                (index, question_id_for(rows[at], index), texts[index], input_index_for(rows[at], at))
                for index, at in enumerate(picked)
            ],
        )
        if idempotency is not None:
            IdempotencyKey.objects.filter(pk=key.pk).update(answer=idempotency.answer(job))
        transaction.on_commit(lambda: enqueue_job_work(job_id=job.id, row_count=len(picked)))
    log_event("job_started", job_id=job.id, rows=len(picked), model=params.model_name, method=params.method)
    return job


def _create_job(*, owner, params: JobParams, count_total: int, **fields) -> ExtractJob:
    price_input, price_output = price_for(params.model_name) or (None, None)
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
    not pay for the call). Raises DailyBudgetExceeded as job_start does."""
    estimate = estimate_cost(params, [encoded_row])
    with transaction.atomic():
        check_daily_budget(owner=owner, model_name=params.model_name, estimate=estimate)
        job = _create_job(
            owner=owner, params=params, count_total=1, kind=JobKind.SINGLE, estimated_cost_usd=estimate
        )
        _insert_rows(job, [(0, question_id_for(row, 0), encoded_row, input_index_for(row, 0))])
    log_event(
        "job_started", job_id=job.id, rows=1, model=params.model_name, method=params.method, kind=job.kind
    )
    job_mark_running(job_id=job.id)
    claim = claim_rows(job_id=job.id, worker_id=worker_id, limit=1)
    job.refresh_from_db()
    return job, (claim.rows[0] if claim.rows else None)


def estimate_cost(params: JobParams, texts: list[str]) -> float | None:
    """The most a job of these rows (their JSON texts) may cost, or None
    without a price: a row's prompt is about its JSON text (a little more
    than what is rendered), four characters a token; its answer at most
    max_tokens."""
    price_input, price_output = price_for(params.model_name) or (None, None)
    if price_input is None:
        return None
    prompt_chars = len(texts) * len(params.resolved_system_prompt) + sum(map(len, texts))
    prompt_tokens = prompt_chars / 4 + len(texts)
    return (prompt_tokens * price_input + len(texts) * params.max_tokens * price_output) / 1e6


def _start_of_day(now=None):
    return (now or timezone.now()).replace(hour=0, minute=0, second=0, microsecond=0)


def _jobs_of_today(owner_id):
    jobs = ExtractJob.objects.filter(created_at__gte=_start_of_day())
    return jobs.filter(owner_id=owner_id) if owner_id is not None else jobs.filter(owner__isnull=True)


_COST = (
    F("prompt_tokens") * F("price_input_per_mtok") + F("completion_tokens") * F("price_output_per_mtok")
) / 1e6


def spent_today(*, owner_id) -> float:
    """What the owner's jobs started today (UTC) have cost so far; anonymous
    callers share one budget."""
    return _jobs_of_today(owner_id).aggregate(spent=Sum(_COST, output_field=FloatField()))["spent"] or 0.0


def check_daily_budget(*, owner, model_name: str, estimate: float | None) -> None:
    """At start: the owner's spend today, plus what their running jobs may
    still spend (their estimates less their cost so far), plus this job's
    estimate, must stay within STRINGSIGHT_USER_DAILY_BUDGET_USD. The owner's
    row is locked meanwhile, so two starts cannot both take the last of it."""
    limit = settings.STRINGSIGHT_USER_DAILY_BUDGET_USD
    if limit is None:
        return
    if estimate is None:
        raise DailyBudgetExceeded(
            f"no price is known for model {model_name!r}, so STRINGSIGHT_USER_DAILY_BUDGET_USD "
            "cannot be kept; add it to STRINGSIGHT_PRICES"
        )
    owner_id = owner.pk if owner is not None else None
    if owner is not None:
        type(owner).objects.select_for_update().filter(pk=owner_id).exists()
    jobs = _jobs_of_today(owner_id)
    reserved = sum(
        max(0.0, (job.estimated_cost_usd or 0.0) - (job.cost_usd or 0.0))
        for job in jobs.filter(state__in=ACTIVE_STATES).only(
            "estimated_cost_usd",
            "prompt_tokens",
            "completion_tokens",
            "price_input_per_mtok",
            "price_output_per_mtok",
        )
    )
    spent = spent_today(owner_id=owner_id)
    if spent + reserved + estimate > limit:
        raise DailyBudgetExceeded(
            f"daily budget exceeded: ${spent:.4f} spent today and ${reserved:.4f} held by running jobs, "
            f"and this job may cost up to ${estimate:.4f}, more than the ${limit:.4f} a user may spend "
            "a day (STRINGSIGHT_USER_DAILY_BUDGET_USD)"
        )


def _take_idempotency_key(*, owner, idempotency: IdempotentStart, job: ExtractJob) -> IdempotencyKey:
    now = timezone.now()
    # An expired key is free again, even before the sweep deletes it.
    IdempotencyKey.objects.filter(
        owner=owner, key=idempotency.key, created_at__lt=now - IDEMPOTENCY_KEY_LIFETIME
    ).delete()
    return IdempotencyKey.objects.create(
        owner=owner, key=idempotency.key, request_hash=idempotency.request_hash, job=job, created_at=now
    )


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


def start_replay(*, owner, idempotency: IdempotentStart) -> StartOutcome | None:
    """The start its owner made with this key in the last 24 hours
    (anonymous callers share one scope, as they share jobs), or None.
    Raises IdempotencyKeyReused if that start's request was another."""
    earlier = (
        IdempotencyKey.objects.filter(
            owner=owner,
            key=idempotency.key,
            created_at__gte=timezone.now() - IDEMPOTENCY_KEY_LIFETIME,
        )
        .only("request_hash", "job_id", "answer")
        .first()
    )
    if earlier is None:
        return None
    if earlier.request_hash != idempotency.request_hash:
        raise IdempotencyKeyReused(
            "Idempotency-Key: this key started a job with a different request in the last 24 hours; "
            "send a new key to start another job"
        )
    return StartOutcome(job_id=earlier.job_id, answer=earlier.answer, replayed=True)


def forget_idempotency_keys(*, now) -> int:
    return IdempotencyKey.objects.filter(created_at__lt=now - IDEMPOTENCY_KEY_LIFETIME).delete()[0]


_STORED_ROW_FIELDS = (
    "job", "index", "question_id", "data", "input_index", "status", "attempts", "error", "raw_answer",
    "properties_dropped", "cached", "prompt_tokens", "completion_tokens", "claimed_by", "lease_expiries",
)  # fmt: skip


def _insert_rows(job: ExtractJob, rows: list[tuple[int, str, str, int]]) -> None:
    """A job's rows as their JSON text, in as few round trips as the
    database allows: a 5,000-row start spent more time in bulk_create's
    per-field Python and a second JSON encoding than in the database."""
    fields = [ExtractRow._meta.get_field(name) for name in _STORED_ROW_FIELDS]
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    table = connection.ops.quote_name(ExtractRow._meta.db_table)
    pending = RowStatus.PENDING
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # Binary COPY: 107 MB of transcripts in 0.35 s (text COPY 0.55 s,
            # executemany 1.5 s): the server copies text without unescaping it.
            with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types([field.db_type(connection).partition("(")[0] for field in fields])
                # attempts, error, raw_answer, dropped, cached, tokens, claimed_by, lease_expiries
                fresh = (0, "", "", 0, False, 0, 0, "", 0)
                for index, question_id, encoded, input_index in rows:
                    copy.write_row((job.pk, index, question_id, encoded, input_index, pending, *fresh))
            return
        job_value = fields[0].get_db_prep_value(job.pk, connection)
        sql = (
            f"INSERT INTO {table} ({columns}) VALUES (%s, %s, %s, %s, %s, %s, 0, '', '', 0, %s, 0, 0, '', 0)"
        )
        for start in range(0, len(rows), 1000):
            cursor.executemany(
                sql,
                [
                    (job_value, index, question_id, encoded, input_index, pending, False)
                    for index, question_id, encoded, input_index in rows[start : start + 1000]
                ],
            )


def enqueue_job_work(*, job_id, row_count: int) -> int:
    """One task per chunk of rows. A task only says "work on this job"; which
    rows it takes is decided by claims against the database."""
    tasks = math.ceil(row_count / settings.STRINGSIGHT_CHUNK_SIZE)
    ExtractJob.objects.filter(pk=job_id).update(work_enqueued_at=timezone.now())
    for _ in range(tasks):
        async_task("jobs.tasks.process_job_chunk", str(job_id), group=str(job_id))
    return tasks


def job_mark_running(*, job_id) -> None:
    if ExtractJob.objects.filter(pk=job_id, state=JobState.QUEUED).update(
        state=JobState.RUNNING, started_at=timezone.now()
    ):
        log_event("job_running", job_id=job_id)


@dataclass(frozen=True)
class CancelOutcome:
    job: ExtractJob
    cancelled_now: bool


def job_cancel(*, job: ExtractJob) -> CancelOutcome:
    """Cancel at once and for good: the job and its unfinished rows become
    `cancelled` together. A row result racing with this either commits
    before it (and is counted in the reported properties_count) or finds the
    job no longer running and is discarded, so the count never changes."""
    now = timezone.now()
    with transaction.atomic():
        won = ExtractJob.objects.filter(pk=job.pk, state__in=ACTIVE_STATES).update(
            state=JobState.CANCELLED, cancelled_at=now, finished_at=now
        )
        if won:
            _close_unfinished_rows(job_id=job.pk, status=RowStatus.CANCELLED, now=now)
        job.refresh_from_db()
    if won:
        log_event("job_cancelled", job_id=job.pk, properties_count=job.properties_count)
    return CancelOutcome(job=job, cancelled_now=bool(won))


class JobNotResumable(Exception):
    pass


def job_resume(
    *,
    job: ExtractJob,
    retry_failed: bool = False,
    max_cost_usd: float | None = None,
    max_total_tokens: int | None = None,
) -> ExtractJob:
    """Run a cancelled, failed or done job's unfinished rows again (and its
    failed rows, with retry_failed). Done rows are never sent again. A new
    budget may be given, since a job stopped by its budget needs a larger one."""
    resumable = [JobState.CANCELLED, JobState.ERROR] + ([JobState.DONE] if retry_failed else [])
    statuses = [RowStatus.PENDING, RowStatus.RUNNING, RowStatus.CANCELLED]
    if retry_failed:
        statuses.append(RowStatus.FAILED)
    with transaction.atomic():
        locked = ExtractJob.objects.select_for_update().filter(pk=job.pk, state__in=resumable).first()
        if locked is None:
            raise JobNotResumable(_not_resumable_reason(job, retry_failed))
        rows = ExtractRow.objects.filter(job_id=job.pk, status__in=statuses)
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
            raise JobNotResumable(f"job has no rows to run again (state: {locked.state})")
        changes = {
            "state": JobState.QUEUED,
            "error": "",
            "finished_at": None,
            "cancelled_at": None,
            "count_failed": F("count_failed") - retried_failures,
        }
        if max_cost_usd is not None:
            changes["max_cost_usd"] = max_cost_usd
        if max_total_tokens is not None:
            changes["max_total_tokens"] = max_total_tokens
        ExtractJob.objects.filter(pk=job.pk).update(**changes)
        transaction.on_commit(lambda: enqueue_job_work(job_id=job.pk, row_count=reopened))
    log_event("job_resumed", job_id=job.pk, rows=reopened, retry_failed=retry_failed)
    job.refresh_from_db()
    return job


def _not_resumable_reason(job: ExtractJob, retry_failed: bool) -> str:
    job.refresh_from_db(fields=["state"])
    if job.state in ACTIVE_STATES:
        return f"job is still {job.state}; cancel it before resuming"
    return f"job already finished (state: {job.state}); only retry_failed can run its failed rows again"


class JobStillActive(Exception):
    pass


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
            raise JobStillActive(f"job is still {job.state}; cancel it before deleting it")
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
            _close_unfinished_rows(job_id=job_id, status=RowStatus.CANCELLED, now=now)
    if won:
        log_event("job_failed", job_id=job_id, error=error)
    return bool(won)


def _close_unfinished_rows(*, job_id, status: str, now) -> None:
    ExtractRow.objects.filter(job_id=job_id, status__in=(RowStatus.PENDING, RowStatus.RUNNING)).update(
        status=status, finished_at=now, lease_expires_at=None
    )


@dataclass(frozen=True)
class ClaimedRow:
    id: int
    index: int
    question_id: str
    data: dict[str, Any]
    # The caller's index of the row (see ExtractRow.input_index).
    input_index: int | None = None


@dataclass(frozen=True)
class Claim:
    rows: list[ClaimedRow]
    job_running: bool
    pending_left: bool


def _lock_if_running(job_id) -> dict | None:
    """Lock the job row (PostgreSQL; SQLite's IMMEDIATE transaction already
    holds the database) and read its counters, or None if it is not running."""
    running = ExtractJob.objects.select_for_update().filter(pk=job_id, state=JobState.RUNNING).order_by()
    return running.values("count_total", "count_done", "count_failed").first()


# What a claim reads of the job: its state and what its budget needs.
CLAIM_FIELDS = (
    "state",
    "owner_id",
    "max_tokens",
    "max_total_tokens",
    "max_cost_usd",
    "price_input_per_mtok",
    "price_output_per_mtok",
    "prompt_tokens",
    "completion_tokens",
    "count_done",
    "count_failed",
    "count_total",
    "cache_hits",
    "method",
    "include_scores_in_prompt",
)


def claim_rows(*, job_id, worker_id: str, limit: int) -> Claim:
    """Take up to `limit` pending rows, lowest index first, leased to the
    worker; rows whose lease ran out (their worker died) are pending again
    first. How many calls it may run at once is its slot grant
    (`set_slots`), not what it holds: a worker keeps a few rows ready so
    that a call starts the moment another ends. With a budget it takes only
    the rows the budget can pay for, counting every held row as a call in
    flight; a job whose budget cannot pay for another call ends here."""
    now = timezone.now()
    with transaction.atomic():
        job = ExtractJob.objects.select_for_update().filter(pk=job_id).only(*CLAIM_FIELDS).first()
        if job is None or job.state != JobState.RUNNING:
            return Claim(rows=[], job_running=False, pending_left=False)
        # A dead worker's rows come back with the next claim of any worker
        # on the job, not only at the next sweep.
        _, poisoned = release_expired_rows(job_id=job_id, now=now, noticed_by=worker_id)
        if poisoned and job.count_done + job.count_failed + poisoned >= job.count_total:
            return Claim(rows=[], job_running=False, pending_left=False)
        # The grant is renewed with every claim, so it never goes stale
        # before the rows it holds: a stale grant means a dead worker whose
        # leases have all run out (see jobs_with_dead_workers).
        WorkerSlots.objects.filter(job_id=job_id, worker_id=worker_id).update(renewed_at=now)
        daily = settings.STRINGSIGHT_USER_DAILY_BUDGET_USD
        if job.max_total_tokens is None and job.max_cost_usd is None and daily is None:
            picked = _take_pending(job_id, worker_id=worker_id, limit=limit, now=now)
            return Claim(rows=picked, job_running=True, pending_left=len(picked) == limit)
        # With a budget the rows are read first: whether each is affordable
        # depends on its size.
        job_rows = ExtractRow.objects.filter(job_id=job_id)
        running = job_rows.filter(status=RowStatus.RUNNING).count()
        pending = job_rows.filter(status=RowStatus.PENDING).order_by("index")
        picked = list(
            pending.select_for_update(skip_locked=True).values(
                "id", "index", "question_id", "data", "input_index"
            )[:limit]
        )
        daily_left = None
        if daily is not None and job.has_prices:
            # The owner's spend today includes this job's; its calls in
            # flight are counted by within_budget.
            daily_left = daily - spent_today(owner_id=job.owner_id)
        affordable = within_budget(job, picked, running, daily_left=daily_left)
        if picked and not affordable and not running:
            _end_over_budget(job, now=now, daily_left=daily_left)
            return Claim(rows=[], job_running=False, pending_left=False)
        ExtractRow.objects.filter(pk__in=[row["id"] for row in affordable]).update(
            status=RowStatus.RUNNING,
            claimed_by=worker_id,
            lease_expires_at=now + timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS),
            started_at=now,
        )
    pending_left = len(picked) == limit or len(affordable) < len(picked)
    return Claim(rows=[ClaimedRow(**row) for row in affordable], job_running=True, pending_left=pending_left)


@dataclass(frozen=True)
class SlotView:
    """A running job's max_workers and its workers' live grants
    (worker id: (slots, wants))."""

    max_workers: int
    grants: dict[str, tuple[int, bool]]

    def fair_share(self, worker_id: str, *, wants: bool) -> int:
        """An equal part of max_workers among the workers that want slots,
        the remainder to the first by id, so the shares add up to exactly
        max_workers. Without sharing, the first worker on a job kept every
        slot and a second one (another process, another core) stayed idle."""
        if not wants:
            return 0
        workers = sorted({worker for worker, (_, wanting) in self.grants.items() if wanting} | {worker_id})
        base, extra = divmod(self.max_workers, len(workers))
        return base + (workers.index(worker_id) < extra)


def slot_view(*, job_id) -> SlotView | None:
    """What a worker reads every poll interval, in one query: None once the
    job has stopped running (cancelled, failed or done), else its live slot
    grants."""
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT j.max_workers, g.worker_id, g.slots, g.wants FROM {quote(ExtractJob._meta.db_table)} j "
            f"LEFT JOIN {quote(WorkerSlots._meta.db_table)} g ON g.job_id = j.id AND g.renewed_at >= %s "
            "WHERE j.id = %s AND j.state = %s",
            [
                connection.ops.adapt_datetimefield_value(_grants_alive_since(timezone.now())),
                ExtractJob._meta.pk.get_db_prep_value(job_id, connection),
                JobState.RUNNING,
            ],
        )
        found = cursor.fetchall()
    if not found:
        return None
    grants = {worker: (slots, bool(wants)) for _, worker, slots, wants in found if worker is not None}
    return SlotView(max_workers=found[0][0], grants=grants)


def set_slots(*, job_id, worker_id: str, slots: int, in_flight: int, wants: bool) -> int | None:
    """Ask for `slots` LLM calls in flight for this worker. The grant is
    `slots`, or less while other workers still hold the rest, and never
    below `in_flight` (calls already running; the worker has stopped
    starting new ones beyond `slots`). With the job row locked, so the
    grants never add up to more than max_workers. None if the job is not
    running."""
    now = timezone.now()
    with transaction.atomic():
        job = ExtractJob.objects.select_for_update().filter(pk=job_id, state=JobState.RUNNING).order_by()
        max_workers = job.values_list("max_workers", flat=True).first()
        if max_workers is None:
            return None
        # Dead workers' grants do not count; the sweep removes them once it
        # has acted on them (requeue_abandoned_jobs).
        live = WorkerSlots.objects.filter(job_id=job_id, renewed_at__gte=_grants_alive_since(now))
        held_by_others = live.exclude(worker_id=worker_id).aggregate(held=Sum("slots"))["held"] or 0
        granted = max(in_flight, min(slots, max_workers - held_by_others))
        WorkerSlots.objects.update_or_create(
            job_id=job_id, worker_id=worker_id, defaults={"slots": granted, "wants": wants, "renewed_at": now}
        )
    return granted


def release_slots(*, job_id, worker_id: str) -> None:
    """The worker has no calls in flight and leaves the job."""
    WorkerSlots.objects.filter(job_id=job_id, worker_id=worker_id).delete()


def _grants_alive_since(now):
    """A grant not renewed within a lease period is a dead worker's, like
    its rows."""
    return now - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)


def _take_pending(job_id, *, worker_id: str, limit: int, now) -> list[ClaimedRow]:
    """Claim the lowest pending rows and read them back in one statement
    (UPDATE ... RETURNING, on PostgreSQL and SQLite alike)."""
    quote = connection.ops.quote_name
    table = quote(ExtractRow._meta.db_table)
    skip_locked = " FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    data_field = ExtractRow._meta.get_field("data")
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET status = %s, claimed_by = %s, lease_expires_at = %s, started_at = %s "
            f"WHERE id IN (SELECT id FROM {table} WHERE job_id = %s AND status = %s "
            f"ORDER BY {quote('index')} LIMIT %s{skip_locked}) "
            f"RETURNING id, {quote('index')}, question_id, data, input_index",
            [
                RowStatus.RUNNING,
                worker_id,
                connection.ops.adapt_datetimefield_value(
                    now + timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)
                ),
                connection.ops.adapt_datetimefield_value(now),
                ExtractRow._meta.get_field("job").get_db_prep_value(job_id, connection),
                RowStatus.PENDING,
                limit,
            ],
        )
        returned = cursor.fetchall()
    rows = [
        ClaimedRow(
            id=row_id,
            index=index,
            question_id=question_id,
            data=data_field.to_python(data),
            input_index=input_index,
        )
        for row_id, index, question_id, data, input_index in returned
    ]
    return sorted(rows, key=lambda row: row.index)


def within_budget(
    job: ExtractJob, rows: list[dict], running: int, daily_left: float | None = None
) -> list[dict]:
    """The leading rows whose calls the budget can still pay for, counting
    the calls already in flight. A call's cost is estimated: its prompt from
    the rendered messages (about four characters a token), its answer from
    the average so far, or max_tokens before any answer is in. `daily_left`
    is what the owner's daily budget has left beyond this job's cost so far."""
    calls = job.count_done + job.count_failed - job.cache_hits
    answer_tokens = job.completion_tokens / calls if calls > 0 else job.max_tokens
    estimates = [(estimate_prompt_tokens(job, row["data"]), answer_tokens) for row in rows]
    if calls > 0:
        in_flight = (job.prompt_tokens / calls, answer_tokens)
    else:
        in_flight = estimates[0] if estimates else (0, answer_tokens)
    tokens_left = cost_left = float("inf")
    if job.max_total_tokens is not None:
        tokens_left = job.max_total_tokens - job.total_tokens - running * sum(in_flight)
    if job.max_cost_usd is not None:
        cost_left = job.max_cost_usd - job.cost_usd - running * job.cost_of(*in_flight)
    if daily_left is not None:
        cost_left = min(cost_left, daily_left - running * job.cost_of(*in_flight))
    affordable = []
    for row, (prompt, answer) in zip(rows, estimates, strict=True):
        tokens_left -= prompt + answer
        if job.max_cost_usd is not None or daily_left is not None:
            cost_left -= job.cost_of(prompt, answer)
        if tokens_left < 0 or cost_left < 0:
            break
        affordable.append(row)
    return affordable


def estimate_prompt_tokens(job: ExtractJob, row: dict[str, Any]) -> int:
    rendered = render_row(row, job.method, include_scores=job.include_scores_in_prompt)
    return (len(job.resolved_system_prompt) + len(rendered)) // 4 + 1


def _end_over_budget(job: ExtractJob, *, now, daily_left: float | None = None) -> None:
    unfinished = job.count_total - job.count_done - job.count_failed
    daily = settings.STRINGSIGHT_USER_DAILY_BUDGET_USD
    job_budget_left = job.max_cost_usd - job.cost_usd if job.max_cost_usd is not None else float("inf")
    if daily_left is not None and daily_left < job_budget_left:
        error = (
            f"daily budget exceeded: ${daily - daily_left:.4f} of STRINGSIGHT_USER_DAILY_BUDGET_USD "
            f"${daily:.4f} spent today; the next call would go over it, so {unfinished} rows were not run"
        )
        _end_job(job, error=error, now=now)
        return
    spent = []
    if job.max_cost_usd is not None:
        spent.append(f"${job.cost_usd:.4f} of max_cost_usd ${job.max_cost_usd:.4f} spent")
    if job.max_total_tokens is not None:
        spent.append(f"{job.total_tokens:,} of max_total_tokens {job.max_total_tokens:,} tokens used")
    error = (
        f"budget exceeded: {' and '.join(spent)}; the next call would go over it, "
        f"so {unfinished} rows were not run"
    )
    _end_job(job, error=error, now=now)


def _end_job(job: ExtractJob, *, error: str, now) -> None:
    ExtractJob.objects.filter(pk=job.pk, state=JobState.RUNNING).update(
        state=JobState.ERROR, error=error, finished_at=now
    )
    _close_unfinished_rows(job_id=job.pk, status=RowStatus.CANCELLED, now=now)
    log_event("job_failed", job_id=job.pk, error=error)


# A living worker renews its leases this many times a lease period, on a
# clock of its own rather than when calls end: a call may outlast a lease,
# and a worker stalled for up to three quarters of a lease keeps its rows.
RENEWALS_PER_LEASE = 4


def renew_leases(*, job_id, worker_id: str) -> int:
    """Keep the worker's rows and its slot grant for another lease period."""
    now = timezone.now()
    WorkerSlots.objects.filter(job_id=job_id, worker_id=worker_id).update(renewed_at=now)
    return ExtractRow.objects.filter(job_id=job_id, status=RowStatus.RUNNING, claimed_by=worker_id).update(
        lease_expires_at=now + timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)
    )


@dataclass(frozen=True)
class Recorded:
    stored: int
    job_running: bool


def record_row_results(
    *, job_id, worker_id: str, results: list[tuple[ClaimedRow, RowOutcome]], model_name: str = ""
) -> Recorded:
    """Store the outcomes that have arrived, their properties and the job's
    counters in one short transaction, only while the job is still running
    and only for rows that are still ours. Results that arrive together
    commit together, in four statements whatever their number: one
    transaction per row, and one round trip per statement, were what bounded
    a worker at high throughput.

    A database error in the batch is one row's (a value its column refuses,
    say) or the database's: the rows are then recorded one by one, and a
    row that still fails alone is recorded as failed with the reason, so the
    other rows are kept and the worker goes on."""
    results = [(row, storable(outcome)) for row, outcome in results]
    try:
        return _record_batch(job_id=job_id, worker_id=worker_id, results=results, model_name=model_name)
    except DatabaseError as exc:
        if len(results) == 1:
            return _record_refused(job_id, worker_id, *results[0], exc)
        log.warning("job %s: recording %d results failed (%s); one by one now", job_id, len(results), exc)
    stored, running = 0, True
    for row, outcome in results:
        try:
            recorded = _record_batch(
                job_id=job_id, worker_id=worker_id, results=[(row, outcome)], model_name=model_name
            )
        except DatabaseError as exc:
            recorded = _record_refused(job_id, worker_id, row, outcome, exc)
        stored += recorded.stored
        running = running and recorded.job_running
    return Recorded(stored=stored, job_running=running)


def _record_refused(job_id, worker_id: str, row: ClaimedRow, outcome: RowOutcome, exc) -> Recorded:
    """Record a row whose result the database refused as failed, saying why,
    with its raw answer and tokens (spent all the same), or without them if
    they were what it refused. If even that fails, the database itself is at
    fault: the error goes up, and the row's lease brings the row back."""
    lines = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    log.error("job %s row %d: the database refused its result: %s", job_id, row.index, reason)
    failed = RowOutcome(
        raw_answer=outcome.raw_answer,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        attempts=outcome.attempts,
        dropped=outcome.dropped + len(outcome.properties),
        error=f"the result could not be stored: {reason}"[:500],
    )
    try:
        return _record_batch(job_id=job_id, worker_id=worker_id, results=[(row, failed)])
    except DatabaseError:
        bare = RowOutcome(attempts=outcome.attempts, error=failed.error)
        return _record_batch(job_id=job_id, worker_id=worker_id, results=[(row, bare)])


# Text columns of 200 characters that an LLM's answer fills.
_PROPERTY_CHARS = {"category": 200, "model": 200, "question_id": 200}


def storable(outcome: RowOutcome) -> RowOutcome:
    """The outcome as the database can store it: PostgreSQL refuses NUL in
    text (and \\u0000 in jsonb), so an answer quoting one has it replaced by
    U+FFFD; names longer than their columns are cut to fit."""
    properties = [
        {
            name: _clean(value)[: _PROPERTY_CHARS[name]] if name in _PROPERTY_CHARS else _clean(value)
            for name, value in prop.items()
        }
        for prop in outcome.properties
    ]
    return replace(
        outcome,
        properties=properties,
        raw_answer=_clean(outcome.raw_answer),
        error=None if outcome.error is None else _clean(outcome.error),
    )


def _clean(value):
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


def _record_batch(
    *, job_id, worker_id: str, results: list[tuple[ClaimedRow, RowOutcome]], model_name: str = ""
) -> Recorded:
    now = timezone.now()
    with transaction.atomic():
        # The job row first: this takes its lock, so a cancel (or a claim, or
        # the sweep) either waits for this commit or has already happened.
        job = _lock_if_running(job_id)
        if job is None:
            return Recorded(stored=0, job_running=False)
        mine = _finish_rows(results, worker_id=worker_id, now=now)
        if not mine:
            return Recorded(stored=0, job_running=True)
        _insert_properties(job_id, mine)
        outcomes = [outcome for _, outcome in mine]
        failed = sum(outcome.error is not None for outcome in outcomes)
        finished_job = job["count_done"] + job["count_failed"] + len(outcomes) >= job["count_total"]
        ExtractJob.objects.filter(pk=job_id).update(
            count_done=F("count_done") + len(outcomes) - failed,
            count_failed=F("count_failed") + failed,
            properties_count=F("properties_count") + sum(len(outcome.properties) for outcome in outcomes),
            prompt_tokens=F("prompt_tokens") + sum(outcome.prompt_tokens for outcome in outcomes),
            completion_tokens=F("completion_tokens") + sum(outcome.completion_tokens for outcome in outcomes),
            cache_hits=F("cache_hits") + sum(outcome.cached for outcome in outcomes),
            **({"state": JobState.DONE, "finished_at": now} if finished_job else {}),
        )
        # In the same transaction: a commit of its own cost more than the insert.
        remember_answers(
            model_name=model_name, outcomes=[outcome for outcome in outcomes if outcome.cache_key]
        )
    for row, outcome in mine:
        log_row_event(job_id, row.index, outcome)
    if finished_job:
        log_event("job_done", job_id=job_id)
    return Recorded(stored=len(mine), job_running=True)


def _finish_rows(
    results: list[tuple[ClaimedRow, RowOutcome]], *, worker_id: str, now
) -> list[tuple[ClaimedRow, RowOutcome]]:
    """Mark the rows done or failed, one UPDATE per row sent as one
    executemany, each only if the row is still running and still ours (a
    row another worker took after our lease ran out is not ours to record).
    Returns the results that were ours: all of them, unless the count says
    otherwise."""
    quote = connection.ops.quote_name
    sql = (
        f"UPDATE {quote(ExtractRow._meta.db_table)} SET status = %s, error = %s, raw_answer = %s, "
        "attempts = attempts + %s, properties_dropped = %s, cached = %s, prompt_tokens = %s, "
        "completion_tokens = %s, lease_expires_at = NULL, finished_at = %s "
        "WHERE id = %s AND status = %s AND claimed_by = %s"
    )
    finished_at = connection.ops.adapt_datetimefield_value(now)
    with connection.cursor() as cursor:
        cursor.executemany(
            sql,
            [
                (
                    RowStatus.FAILED if outcome.error is not None else RowStatus.DONE,
                    outcome.error or "",
                    outcome.raw_answer,
                    outcome.attempts,
                    outcome.dropped,
                    outcome.cached,
                    outcome.prompt_tokens,
                    outcome.completion_tokens,
                    finished_at,
                    row.id,
                    RowStatus.RUNNING,
                    worker_id,
                )
                for row, outcome in results
            ],
        )
        changed = cursor.rowcount
    if changed == len(results):
        return results
    ours = set(
        ExtractRow.objects.filter(
            pk__in=[row.id for row, _ in results], claimed_by=worker_id, finished_at=now
        ).values_list("id", flat=True)
    )
    return [(row, outcome) for row, outcome in results if row.id in ours]


PROPERTY_COLUMNS = ("id", "job_id", "row_id", "row_index", "input_index", "position", *PROPERTY_CONTENT)


def _insert_properties(job_id, results: list[tuple[ClaimedRow, RowOutcome]]) -> None:
    """All the properties of a batch as one executemany. bulk_create
    compiled every field of every property in Python, a quarter of a
    worker's time per row."""
    fields = {
        name: Property._meta.get_field(name.removesuffix("_id")) for name in ("id", "job_id", "evidence")
    }
    job_value = fields["job_id"].get_db_prep_value(job_id, connection)
    values = []
    for row, outcome in results:
        for position, prop in enumerate(outcome.properties):
            values.append(
                (
                    fields["id"].get_db_prep_value(uuid.uuid4(), connection),
                    job_value,
                    row.id,
                    row.index,
                    row.input_index,
                    position,
                    *(prop[name] for name in PROPERTY_CONTENT[:-1]),
                    fields["evidence"].get_db_prep_value(prop["evidence"], connection),
                )
            )
    if not values:
        return
    quote = connection.ops.quote_name
    columns = ", ".join(quote(column) for column in PROPERTY_COLUMNS)
    placeholders = ", ".join(["%s"] * len(PROPERTY_COLUMNS))
    with connection.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {quote(Property._meta.db_table)} ({columns}) VALUES ({placeholders})", values
        )


def record_row_result(
    *, job_id, row_id: int, row_index: int, worker_id: str, outcome: RowOutcome, model_name: str = ""
) -> bool:
    """One row's outcome; False when it was discarded."""
    row = ClaimedRow(id=row_id, index=row_index, question_id="", data={})
    recorded = record_row_results(
        job_id=job_id, worker_id=worker_id, results=[(row, outcome)], model_name=model_name
    )
    return recorded.stored == 1


def log_row_event(job_id, row_index: int, outcome: RowOutcome) -> None:
    failed = outcome.error is not None
    log_event(
        "row_failed" if failed else "row_done",
        job_id=job_id,
        row_index=row_index,
        properties=len(outcome.properties),
        dropped=outcome.dropped,
        attempts=outcome.attempts,
        cached=outcome.cached,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        **({"error": outcome.error} if failed else {}),
    )


def remember_answers(*, model_name: str, outcomes: list[RowOutcome]) -> None:
    if not outcomes:
        return
    CompletionCache.objects.bulk_create(
        [
            CompletionCache(
                key=outcome.cache_key,
                model_name=model_name,
                answer=outcome.raw_answer,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
            )
            # One entry per key, even when identical rows answered together.
            for outcome in {outcome.cache_key: outcome for outcome in outcomes}.values()
        ],
        update_conflicts=True,
        unique_fields=["key"],
        update_fields=["answer", "prompt_tokens", "completion_tokens", "created_at"],
    )


def cached_answers(*, keys: list[str]) -> dict[str, str]:
    return dict(CompletionCache.objects.filter(key__in=keys).values_list("key", "answer"))


@dataclass(frozen=True)
class Rate:
    """`count` requests per `seconds`, as a burst or spread out."""

    count: int
    seconds: float

    @classmethod
    def parse(cls, text: str) -> "Rate":
        """ "120/min", "5/h", "10/15min": a count over a period of s, min, h or d."""
        count, _, period = text.strip().partition("/")
        digits = "".join(itertools.takewhile(str.isdigit, period))
        unit = period[len(digits) :].strip().lower()
        seconds = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
        if not count.strip().isdigit() or int(count) < 1 or unit not in seconds or digits in ("0",):
            raise ValueError(f"{text!r} is not a rate such as 120/min, 5/h or 10/15min")
        return cls(count=int(count), seconds=int(digits or 1) * seconds[unit])


def throttle_take(*, scope: str, ident: str, rate: Rate, now: float | None = None) -> float | None:
    """Take one request from the caller's allowance: None when it is taken,
    else the seconds until one is free. A burst of up to `rate.count` passes
    at once, then one per `rate.seconds / rate.count`. One conditional
    UPDATE decides (the database serialises updates of the row), so the
    rate holds however many web processes take at once."""
    now = time.time() if now is None else now
    interval = rate.seconds / rate.count
    slack = rate.seconds - interval
    bucket = ThrottleBucket.objects.filter(scope=scope, ident=ident)
    for _ in range(5):
        taken = bucket.filter(tat__lte=now + slack + 1e-6).update(
            tat=Greatest(F("tat"), Value(now, output_field=FloatField())) + interval
        )
        if taken:
            return None
        tat = bucket.values_list("tat", flat=True).first()
        if tat is not None and tat > now + slack + 1e-6:
            return float(math.ceil(tat - slack - now))  # whole seconds: Retry-After rounds down
        if tat is None:
            # A new caller (or one forgotten): their allowance starts whole.
            # Callers whose allowance has been whole for an hour are forgotten.
            ThrottleBucket.objects.filter(scope=scope, tat__lt=now - 3600).delete()
            ThrottleBucket.objects.bulk_create(
                [ThrottleBucket(scope=scope, ident=ident, tat=now)], ignore_conflicts=True
            )
        # Else the bucket was created after the UPDATE began (PostgreSQL's
        # UPDATE sees only rows committed before it): take again.
    raise AssertionError(f"throttle bucket {scope} {ident} could not be taken from")  # pragma: no cover


def throttle_wait(*, scope: str, ident: str, rate: Rate, now: float | None = None) -> float | None:
    """Seconds until the caller's allowance has room, or None if it has now
    (nothing is taken)."""
    now = time.time() if now is None else now
    tat = ThrottleBucket.objects.filter(scope=scope, ident=ident).values_list("tat", flat=True).first()
    slack = rate.seconds - rate.seconds / rate.count
    if tat is None or tat <= now + slack + 1e-6:
        return None
    return tat - slack - now


def jobs_visible_to(user):
    """A user reaches only their own jobs; staff with the view permission
    reach everyone's. Anonymous callers (only in anonymous mode) share the
    jobs that have no owner."""
    if not user.is_authenticated:
        return ExtractJob.objects.filter(owner__isnull=True)
    if user.is_staff and user.has_perm("jobs.view_extractjob"):
        return ExtractJob.objects.all()
    return ExtractJob.objects.filter(owner=user)


def _owns(user, job: ExtractJob) -> bool:
    if not user.is_authenticated:
        return job.owner_id is None  # anonymous mode: ownerless jobs are shared
    return job.owner_id == user.pk


def may_change(user, job: ExtractJob) -> bool:
    """Owners cancel and resume their own jobs; doing so to someone else's
    needs staff with the change permission."""
    return _owns(user, job) or (user.is_staff and user.has_perm("jobs.change_extractjob"))


def may_delete(user, job: ExtractJob) -> bool:
    return _owns(user, job) or (user.is_staff and user.has_perm("jobs.delete_extractjob"))


def job_state(*, job_id) -> str | None:
    return ExtractJob.objects.filter(pk=job_id).values_list("state", flat=True).first()


@dataclass(frozen=True)
class SweepReport:
    released: int
    failed: int
    finished: int
    requeued_jobs: int

    def __str__(self) -> str:
        return (
            f"released {self.released} rows, failed {self.failed} rows, finished {self.finished} jobs, "
            f"re-enqueued work for {self.requeued_jobs} jobs"
        )


def sweep(*, now=None) -> SweepReport:
    """Repair what dead workers leave behind. Safe to run anywhere, any
    number of times at once; workers run it every few seconds
    (sweep_if_due)."""
    now = now or timezone.now()
    abandoned = jobs_with_dead_workers(now=now)
    released, failed = release_expired_leases(now=now)
    WorkerSlots.objects.filter(
        Q(renewed_at__lt=_grants_alive_since(now)) | ~Q(job__state=JobState.RUNNING)
    ).delete()
    finished = ExtractJob.objects.filter(
        state=JobState.RUNNING, count_total=F("count_done") + F("count_failed")
    ).update(state=JobState.DONE, finished_at=now)
    requeued = requeue_abandoned_jobs(job_ids=abandoned, now=now) + requeue_stalled_jobs(now=now)
    report = SweepReport(released, failed, finished, requeued)
    forget_idempotency_keys(now=now)
    Heartbeat.objects.update_or_create(name="sweep", defaults={"at": now})
    if report.released or report.failed or report.finished or report.requeued_jobs:
        log_event("sweep", **vars(report))
    return report


def sweep_if_due(*, now=None) -> SweepReport | None:
    """Sweep unless some worker did within STRINGSIGHT_SWEEP_SECONDS. Every
    worker process calls this every few seconds (jobs.sweeper); the
    conditional UPDATE of the sweep's heartbeat lets one of them through
    per interval, on whichever machine. django-q2's own schedules cannot
    run more often than once a minute."""
    now = now or timezone.now()
    due = now - timedelta(seconds=settings.STRINGSIGHT_SWEEP_SECONDS)
    beats = Heartbeat.objects.filter(name="sweep")
    # A read first: on SQLite it never waits for the write lock.
    if beats.filter(at__gt=due).exists():
        return None
    if not beats.filter(at__lte=due).update(at=now):
        try:
            with transaction.atomic():
                Heartbeat.objects.create(name="sweep", at=now)
        except IntegrityError:
            return None  # another worker swept just now
    return sweep(now=now)


def release_expired_leases(*, now) -> tuple[int, int]:
    """Every running job's rows whose lease ran out (release_expired_rows)."""
    released = failed = 0
    expired_rows = ExtractRow.objects.filter(status=RowStatus.RUNNING, lease_expires_at__lt=now)
    for job_id in set(expired_rows.values_list("job_id", flat=True)):
        with transaction.atomic():
            if not _lock_if_running(job_id):
                continue
            job_released, job_failed = release_expired_rows(job_id=job_id, now=now, noticed_by="sweep")
            released += job_released
            failed += job_failed
    return released, failed


def release_expired_rows(*, job_id, now, noticed_by: str) -> tuple[int, int]:
    """A job's rows whose worker stopped renewing their lease go back to
    pending, counted in lease_expiries; a row that has outlived
    STRINGSIGHT_MAX_LEASE_EXPIRIES workers is failed instead (it may be
    what kills them). The caller holds the job's lock."""
    expired = ExtractRow.objects.filter(job_id=job_id, status=RowStatus.RUNNING, lease_expires_at__lt=now)
    if not expired.exists():
        return 0, 0
    limit = settings.STRINGSIGHT_MAX_LEASE_EXPIRIES
    poisoned = expired.filter(lease_expiries__gte=limit - 1).update(
        status=RowStatus.FAILED,
        error=f"the worker extracting this row stopped responding {limit} times",
        lease_expires_at=None,
        lease_expiries=F("lease_expiries") + 1,
        finished_at=now,
    )
    released = expired.update(
        status=RowStatus.PENDING, lease_expires_at=None, lease_expiries=F("lease_expiries") + 1
    )
    if poisoned:
        ExtractJob.objects.filter(pk=job_id).update(count_failed=F("count_failed") + poisoned)
        ExtractJob.objects.filter(
            pk=job_id, state=JobState.RUNNING, count_total=F("count_done") + F("count_failed")
        ).update(state=JobState.DONE, finished_at=now)
    log_event("leases_expired", job_id=job_id, released=released, failed=poisoned, noticed_by=noticed_by)
    return released, poisoned


def jobs_with_dead_workers(*, now) -> set[uuid.UUID]:
    """Running jobs with a worker that has not renewed its slot grant for a
    lease period: it died (its process killed, its machine lost) and its
    task with it. A worker that ends normally gives its grant back, and
    renews it with every claim, so by then every row it held has expired."""
    dead = WorkerSlots.objects.filter(renewed_at__lt=_grants_alive_since(now), job__state=JobState.RUNNING)
    return set(dead.values_list("job_id", flat=True))


def requeue_abandoned_jobs(*, job_ids, now) -> int:
    """Enqueue work at once for a job whose worker died, unless a living
    worker on it still takes rows: django-q2 would deliver the dead
    worker's task again only after `retry` (over an hour), and the Redis
    broker not at all. Each death is acted on once (the sweep then removes
    the dead grant), so tasks never pile up behind a busy cluster."""
    requeued = 0
    for job_id in job_ids:
        taking_rows = WorkerSlots.objects.filter(
            job_id=job_id, wants=True, renewed_at__gte=_grants_alive_since(now)
        )
        if taking_rows.exists():
            continue
        pending = ExtractRow.objects.filter(job_id=job_id, status=RowStatus.PENDING).count()
        if pending and ExtractJob.objects.filter(pk=job_id, state=JobState.RUNNING).exists():
            enqueue_job_work(job_id=job_id, row_count=pending)
            log_event("job_requeued", job_id=job_id, rows=pending, reason="its worker died")
            requeued += 1
    return requeued


def requeue_stalled_jobs(*, now) -> int:
    """Enqueue work again for an active job that has pending rows but no
    worker and no progress for a lease period, where no worker's death
    says why: its tasks were lost before any worker took them (a crash
    right after start, or Redis losing its queue). While the broker still
    holds tasks, they may be this job's, so nothing is added."""
    quiet_since = now - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)
    stalled = (
        ExtractJob.objects.filter(state__in=ACTIVE_STATES)
        .filter(
            Q(work_enqueued_at__lt=quiet_since) | Q(work_enqueued_at__isnull=True, created_at__lt=quiet_since)
        )
        .exclude(worker_slots__renewed_at__gte=_grants_alive_since(now))  # being worked on
    )
    candidates = list(stalled.values_list("id", flat=True))
    if not candidates or get_broker().queue_size():
        return 0
    requeued = 0
    for job_id in candidates:
        rows = ExtractRow.objects.filter(job_id=job_id)
        if rows.filter(Q(status=RowStatus.RUNNING) | Q(finished_at__gte=quiet_since)).exists():
            continue
        pending = rows.filter(status=RowStatus.PENDING).count()
        if pending:
            enqueue_job_work(job_id=job_id, row_count=pending)
            log_event("job_requeued", job_id=job_id, rows=pending, reason="no worker and no progress")
            requeued += 1
    return requeued


SWEEP_SCHEDULE_NAME = "stringsight-sweep"


def ensure_sweep_schedule(schedule_model=None) -> None:
    """A backstop for the workers' background sweeps: django-q2 runs this
    schedule about once a minute on whichever cluster picks it up."""
    from django_q.models import Schedule

    model = schedule_model or Schedule
    model.objects.update_or_create(
        name=SWEEP_SCHEDULE_NAME,
        defaults={
            "func": "jobs.tasks.sweep",
            "schedule_type": Schedule.MINUTES,
            "minutes": 1,
            "repeats": -1,
            "next_run": timezone.now(),
        },
    )
