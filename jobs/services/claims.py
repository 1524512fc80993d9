"""The worker protocol: claim rows, keep their leases, record results.

Only the worker (jobs.worker) and the sweep call this module. A claimed row
is leased to its worker; a lease that runs out (the worker died) puts the
row back to pending; a result is recorded only while the job runs and the
row is still the worker's.
"""

import logging
from dataclasses import dataclass, replace
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import Count, F, Sum
from django.utils import timezone

from extraction.extract import RowOutcome

from ..events import log_event
from ..models import (
    ExtractJob,
    ExtractRow,
    JobState,
    RowStatus,
    WorkerSlots,
)
from .budgets import Reservation, end_over_budget, held_by_other_jobs, spent_today, within_budget
from .cache import remember_answers
from .sql import ClaimedRow, finish_rows, insert_properties, lock_if_running, take_pending_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    rows: list[ClaimedRow]
    job_running: bool
    pending_left: bool


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
    "model_name",
    "resolved_system_prompt",
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
            picked = take_pending_rows(job_id, worker_id=worker_id, limit=limit, now=now)
            return Claim(rows=picked, job_running=True, pending_left=len(picked) == limit)
        # With a budget the rows are read first: whether each is affordable
        # depends on its size. The calls in flight count at what their rows
        # reserved, and each row taken reserves its own.
        job_rows = ExtractRow.objects.filter(job_id=job_id)
        held = job_rows.filter(status=RowStatus.RUNNING).aggregate(
            running=Count("id"),
            prompt=Sum("reserved_prompt_tokens"),
            completion=Sum("reserved_completion_tokens"),
        )
        running = held["running"]
        pending = job_rows.filter(status=RowStatus.PENDING).order_by("index")
        picked = list(
            pending.select_for_update(skip_locked=True).values(
                "id", "index", "question_id", "data", "input_index"
            )[:limit]
        )
        daily_left, held_elsewhere = None, 0.0
        if daily is not None and job.has_prices:
            # The owner's spend today includes this job's; its calls in
            # flight are counted by within_budget, their other jobs' here.
            held_elsewhere = held_by_other_jobs(owner_id=job.owner_id, job_id=job_id)
            daily_left = daily - spent_today(owner_id=job.owner_id) - held_elsewhere
        reserved = Reservation(held["prompt"] or 0, held["completion"] or 0)
        affordable = within_budget(job, picked, reserved, daily_left=daily_left)
        if picked and not affordable and not running:
            end_over_budget(job, now=now, daily_left=daily_left, held_elsewhere=held_elsewhere)
            return Claim(rows=[], job_running=False, pending_left=False)
        ExtractRow.objects.filter(pk__in=[row["id"] for row, _ in affordable]).update(
            status=RowStatus.RUNNING,
            claimed_by=worker_id,
            lease_expires_at=now + timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS),
            started_at=now,
        )
        ExtractRow.objects.bulk_update(
            [
                ExtractRow(
                    id=row["id"],
                    reserved_prompt_tokens=reservation.prompt_tokens,
                    reserved_completion_tokens=reservation.completion_tokens,
                )
                for row, reservation in affordable
            ],
            ["reserved_prompt_tokens", "reserved_completion_tokens"],
        )
        affordable = [row for row, _ in affordable]
    pending_left = len(picked) == limit or len(affordable) < len(picked)
    return Claim(rows=[ClaimedRow(**row) for row in affordable], job_running=True, pending_left=pending_left)


# A living worker renews its leases this many times a lease period, on a
# clock of its own rather than when calls end: a call may outlast a lease,
# and a worker stalled for up to three quarters of a lease keeps its rows.
RENEWALS_PER_LEASE = 4


def renew_leases(*, worker_id: str, in_flight: dict) -> int:
    """Keep the worker's rows and slot grants, in every job, for another
    lease period, and note each job's calls in flight on its grant (job id:
    calls). Returns the rows renewed."""
    now = timezone.now()
    with transaction.atomic():
        for job_id, calls in in_flight.items():
            WorkerSlots.objects.filter(job_id=job_id, worker_id=worker_id).update(
                renewed_at=now, in_flight=calls
            )
        WorkerSlots.objects.filter(worker_id=worker_id).exclude(job_id__in=list(in_flight)).update(
            renewed_at=now, in_flight=0
        )
        return ExtractRow.objects.filter(status=RowStatus.RUNNING, claimed_by=worker_id).update(
            lease_expires_at=now + timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)
        )


def give_back_rows(*, worker_id: str, job_id=None) -> int:
    """Rows the worker claimed but will not call (it is leaving) are
    pending again at once, for any worker, instead of after their lease."""
    rows = ExtractRow.objects.filter(status=RowStatus.RUNNING, claimed_by=worker_id)
    if job_id is not None:
        rows = rows.filter(job_id=job_id)
    return rows.update(status=RowStatus.PENDING, claimed_by="", lease_expires_at=None, started_at=None)


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
        job = lock_if_running(job_id)
        if job is None:
            return Recorded(stored=0, job_running=False)
        mine = finish_rows(results, worker_id=worker_id, now=now)
        if not mine:
            return Recorded(stored=0, job_running=True)
        insert_properties(job_id, mine)
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
