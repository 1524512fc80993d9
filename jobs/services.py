"""The rules of a job's life: start, claim rows, record a row's result,
cancel, fail, finish. The API, admin, CLI and tasks call these and hold no
rules of their own.

Every state change is a conditional UPDATE whose row count says who won a
race. Transactions that touch a job lock the job row first and its rows
second, so they never deadlock each other; on SQLite, IMMEDIATE
transactions serialise them outright.
"""

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from django_q.tasks import async_task

from extraction.extract import RowOutcome
from extraction.rows import question_id_for

from .models import ACTIVE_STATES, ExtractJob, ExtractRow, JobState, Property, RowStatus


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


def job_start(*, owner, rows: list[dict[str, Any]], params: JobParams) -> ExtractJob:
    """Store the job and its rows in one transaction, then enqueue its work."""
    with transaction.atomic():
        job = ExtractJob.objects.create(owner=owner, count_total=len(rows), **vars(params))
        ExtractRow.objects.bulk_create(
            (
                ExtractRow(job=job, index=index, question_id=question_id_for(row, index), data=row)
                for index, row in enumerate(rows)
            ),
            batch_size=500,
        )
        transaction.on_commit(lambda: enqueue_job_work(job_id=job.id, row_count=len(rows)))
    return job


def enqueue_job_work(*, job_id, row_count: int) -> int:
    """One task per chunk of rows. A task only says "work on this job"; which
    rows it takes is decided by claims against the database."""
    tasks = math.ceil(row_count / settings.STRINGSIGHT_CHUNK_SIZE)
    for _ in range(tasks):
        async_task("jobs.tasks.process_job_chunk", str(job_id), group=str(job_id), task_name=None)
    return tasks


def job_mark_running(*, job_id) -> None:
    ExtractJob.objects.filter(pk=job_id, state=JobState.QUEUED).update(
        state=JobState.RUNNING, started_at=timezone.now()
    )


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
    return CancelOutcome(job=job, cancelled_now=bool(won))


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
    return bool(won)


def _close_unfinished_rows(*, job_id, status: str, now) -> None:
    ExtractRow.objects.filter(job_id=job_id, status__in=(RowStatus.PENDING, RowStatus.RUNNING)).update(
        status=status, finished_at=now, claimed_by="", lease_expires_at=None
    )


@dataclass(frozen=True)
class ClaimedRow:
    id: int
    index: int
    question_id: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Claim:
    rows: list[ClaimedRow]
    job_running: bool
    pending_left: bool


def claim_rows(*, job_id, worker_id: str, limit: int) -> Claim:
    """Take up to `limit` pending rows, lowest index first, keeping the
    job's calls in flight across all workers within its max_workers."""
    now = timezone.now()
    with transaction.atomic():
        job = ExtractJob.objects.select_for_update().filter(pk=job_id).values("state", "max_workers").first()
        if job is None or job["state"] != JobState.RUNNING:
            return Claim(rows=[], job_running=False, pending_left=False)
        job_rows = ExtractRow.objects.filter(job_id=job_id)
        room = min(limit, job["max_workers"] - job_rows.filter(status=RowStatus.RUNNING).count())
        pending = job_rows.filter(status=RowStatus.PENDING).order_by("index")
        if room <= 0:
            return Claim(rows=[], job_running=True, pending_left=pending.exists())
        picked = list(
            pending.select_for_update(skip_locked=True).values("id", "index", "question_id", "data")[:room]
        )
        ExtractRow.objects.filter(pk__in=[row["id"] for row in picked]).update(
            status=RowStatus.RUNNING,
            claimed_by=worker_id,
            lease_expires_at=now + timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS),
            started_at=now,
        )
    return Claim(
        rows=[ClaimedRow(**row) for row in picked],
        job_running=True,
        pending_left=len(picked) == room,
    )


def renew_leases(*, job_id, worker_id: str) -> int:
    return ExtractRow.objects.filter(job_id=job_id, status=RowStatus.RUNNING, claimed_by=worker_id).update(
        lease_expires_at=timezone.now() + timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)
    )


class _Discard(Exception):
    """Rolls back a row result that must not be stored."""


def record_row_result(*, job_id, row_id: int, row_index: int, worker_id: str, outcome: RowOutcome) -> bool:
    """Store one row's outcome, its properties and the job's counters in one
    short transaction, only while the job is still running and the row is
    still ours. Returns False when the result was discarded."""
    failed = outcome.error is not None
    now = timezone.now()
    counters = {
        "count_failed" if failed else "count_done": F("count_failed" if failed else "count_done") + 1,
        "properties_count": F("properties_count") + len(outcome.properties),
        "prompt_tokens": F("prompt_tokens") + outcome.prompt_tokens,
        "completion_tokens": F("completion_tokens") + outcome.completion_tokens,
    }
    try:
        with transaction.atomic():
            # The job row first: this takes its lock, so a cancel either
            # waits for this commit or has already made the update match nothing.
            if not ExtractJob.objects.filter(pk=job_id, state=JobState.RUNNING).update(**counters):
                raise _Discard
            row_changed = ExtractRow.objects.filter(
                pk=row_id, status=RowStatus.RUNNING, claimed_by=worker_id
            ).update(
                status=RowStatus.FAILED if failed else RowStatus.DONE,
                error=outcome.error or "",
                raw_answer=outcome.raw_answer,
                attempts=F("attempts") + outcome.attempts,
                properties_dropped=outcome.dropped,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                claimed_by="",
                lease_expires_at=None,
                finished_at=now,
            )
            if not row_changed:
                # Another worker took the row after our lease ran out.
                raise _Discard
            Property.objects.bulk_create(
                Property(job_id=job_id, row_id=row_id, row_index=row_index, position=position, **prop)
                for position, prop in enumerate(outcome.properties)
            )
            ExtractJob.objects.filter(
                pk=job_id, state=JobState.RUNNING, count_total=F("count_done") + F("count_failed")
            ).update(state=JobState.DONE, finished_at=now)
    except _Discard:
        return False
    return True


def jobs_visible_to(user):
    """A user reaches only their own jobs; staff reach all."""
    if user.is_staff:
        return ExtractJob.objects.all()
    return ExtractJob.objects.filter(owner=user)


def job_state(*, job_id) -> str | None:
    return ExtractJob.objects.filter(pk=job_id).values_list("state", flat=True).first()
