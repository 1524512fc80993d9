"""The sweep: repair what dead workers leave behind (expired leases, lost
tasks, jobs whose last row was failed by a lease), safe to run anywhere at
once."""

import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone
from django_q.brokers import get_broker

from ..batchmode.records import OPEN_STATES
from ..events import log_event
from ..models import (
    ACTIVE_STATES,
    ExtractJob,
    ExtractRow,
    Heartbeat,
    JobMode,
    JobState,
    RowStatus,
    WorkerSlots,
)
from .claims import release_expired_rows
from .grants import grants_alive_since
from .idempotency import forget_idempotency_keys
from .lifecycle import wake_workers
from .sql import lock_if_running


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
        Q(renewed_at__lt=grants_alive_since(now)) | ~Q(job__state=JobState.RUNNING)
    ).delete()
    finished = (
        ExtractJob.objects.filter(state=JobState.RUNNING, count_total=F("count_done") + F("count_failed"))
        # A batch job is done once its last batch is imported too (batchmode.importing).
        .exclude(provider_batches__state__in=OPEN_STATES)
        .update(state=JobState.DONE, finished_at=now)
    )
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
    if not take_turn("sweep", seconds=settings.STRINGSIGHT_SWEEP_SECONDS, now=now):
        return None
    return sweep(now=now)


def take_turn(name: str, *, seconds: float, now) -> bool:
    """True for one caller per `seconds`, across every worker process and
    machine: the conditional UPDATE of the heartbeat `name` lets one through."""
    due = now - timedelta(seconds=seconds)
    beats = Heartbeat.objects.filter(name=name)
    # A read first: on SQLite it never waits for the write lock.
    if beats.filter(at__gt=due).exists():
        return False
    if not beats.filter(at__lte=due).update(at=now):
        try:
            with transaction.atomic():
                Heartbeat.objects.create(name=name, at=now)
        except IntegrityError:
            return False  # another worker took this turn just now
    return True


def release_expired_leases(*, now) -> tuple[int, int]:
    """Every running job's rows whose lease ran out (release_expired_rows)."""
    released = failed = 0
    expired_rows = ExtractRow.objects.filter(status=RowStatus.RUNNING, lease_expires_at__lt=now)
    for job_id in set(expired_rows.values_list("job_id", flat=True)):
        with transaction.atomic():
            if not lock_if_running(job_id):
                continue
            job_released, job_failed = release_expired_rows(job_id=job_id, now=now, noticed_by="sweep")
            released += job_released
            failed += job_failed
    return released, failed


def jobs_with_dead_workers(*, now) -> set[uuid.UUID]:
    """Running jobs with a worker that has not renewed its slot grant for a
    lease period: it died (its process killed, its machine lost) and its
    task with it. A worker that ends normally gives its grant back, and
    renews it with every claim, so by then every row it held has expired."""
    dead = WorkerSlots.objects.filter(renewed_at__lt=grants_alive_since(now), job__state=JobState.RUNNING)
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
            job_id=job_id, wants=True, renewed_at__gte=grants_alive_since(now)
        )
        if taking_rows.exists():
            continue
        pending = ExtractRow.objects.filter(job_id=job_id, status=RowStatus.PENDING).count()
        if pending and ExtractJob.objects.filter(pk=job_id, state=JobState.RUNNING).exists():
            wake_workers(job_id=job_id, max_workers=1)
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
        # A batch job's submission has its own (batchmode.poll.enqueue_submit_work).
        ExtractJob.objects.filter(state__in=ACTIVE_STATES, mode=JobMode.ONLINE)
        .filter(
            Q(work_enqueued_at__lt=quiet_since) | Q(work_enqueued_at__isnull=True, created_at__lt=quiet_since)
        )
        .exclude(worker_slots__renewed_at__gte=grants_alive_since(now))  # being worked on
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
            wake_workers(job_id=job_id, max_workers=1)
            log_event("job_requeued", job_id=job_id, rows=pending, reason="no worker and no progress")
            requeued += 1
    return requeued


SWEEP_SCHEDULE_NAME = "stringsight-sweep"


def ensure_sweep_schedule() -> None:
    """A backstop for the workers' background sweeps: django-q2 runs this
    schedule about once a minute on whichever cluster picks it up."""
    from django_q.models import Schedule

    Schedule.objects.update_or_create(
        name=SWEEP_SCHEDULE_NAME,
        defaults={
            "func": "jobs.tasks.sweep",
            "schedule_type": Schedule.MINUTES,
            "minutes": 1,
            "repeats": -1,
            "next_run": timezone.now(),
        },
    )
