"""Slot grants: how many of a job's max_workers LLM calls each worker may
have in flight, kept in the database so they hold across processes and
machines."""

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Sum
from django.utils import timezone

from ..models import ExtractJob, ExtractRow, JobKind, JobMode, JobState, RowStatus, WorkerSlots


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

    def held_by_others(self, worker_id: str) -> int:
        return sum(slots for worker, (slots, _) in self.grants.items() if worker != worker_id)


@dataclass(frozen=True)
class JobToServe:
    """A job a worker may take part in, with its workers' live grants."""

    job_id: uuid.UUID
    state: str
    owner_id: int | None
    created_at: datetime
    # Whether it has rows waiting for a worker.
    has_pending: bool
    slots: SlotView


def jobs_to_serve(*, only_job=None) -> list[JobToServe]:
    """What a worker reads every poll interval, in one query: the running
    and queued jobs that workers run (not /extract/single's, which its web
    request runs), oldest first, with their live slot grants."""
    quote = connection.ops.quote_name
    params = [
        RowStatus.PENDING,
        connection.ops.adapt_datetimefield_value(grants_alive_since(timezone.now())),
        JobState.RUNNING,
        JobState.QUEUED,
        JobKind.ROWS,
        # A batch job's rows go to the provider's Batch API (jobs.batchmode).
        JobMode.ONLINE,
    ]
    only = ""
    if only_job is not None:
        only = " AND j.id = %s"
        params.append(ExtractJob._meta.pk.get_db_prep_value(only_job, connection))
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT j.id, j.state, j.owner_id, j.created_at, j.max_workers, "
            f"EXISTS (SELECT 1 FROM {quote(ExtractRow._meta.db_table)} r "
            "WHERE r.job_id = j.id AND r.status = %s), "
            "g.worker_id, g.slots, g.wants "
            f"FROM {quote(ExtractJob._meta.db_table)} j "
            f"LEFT JOIN {quote(WorkerSlots._meta.db_table)} g ON g.job_id = j.id AND g.renewed_at >= %s "
            f"WHERE j.state IN (%s, %s) AND j.kind = %s AND j.mode = %s{only} ORDER BY j.created_at, j.id",
            params,
        )
        found = cursor.fetchall()
    jobs: dict = {}
    id_field, created_field = ExtractJob._meta.pk, ExtractJob._meta.get_field("created_at")
    for job_id, state, owner_id, created_at, max_workers, has_pending, worker, slots, wants in found:
        job_id = id_field.to_python(job_id)
        if job_id not in jobs:
            created_at = created_field.to_python(created_at)
            jobs[job_id] = (state, owner_id, created_at, bool(has_pending), max_workers, {})
        if worker is not None:
            jobs[job_id][5][worker] = (slots, bool(wants))
    return [
        JobToServe(
            job_id=job_id,
            state=state,
            owner_id=owner_id,
            created_at=created_at,
            has_pending=has_pending,
            slots=SlotView(max_workers=max_workers, grants=grants),
        )
        for job_id, (state, owner_id, created_at, has_pending, max_workers, grants) in jobs.items()
    ]


def set_slots(*, job_id, worker_id: str, slots: int, in_flight: int, wants: bool) -> int | None:
    """Ask for `slots` LLM calls in flight for this worker. The grant is
    `slots`, or less while other workers still hold the rest of the job's
    max_workers (or of its owner's STRINGSIGHT_USER_MAX_CONCURRENCY), and
    never below `in_flight` (calls already running; the worker has stopped
    starting new ones beyond `slots`). With the job row locked (and the
    owner's, under a per-user limit), so the grants never add up to more
    than either. None if the job is not running."""
    now = timezone.now()
    alive_since = grants_alive_since(now)
    user_limit = settings.STRINGSIGHT_USER_MAX_CONCURRENCY
    with transaction.atomic():
        job = ExtractJob.objects.select_for_update().filter(pk=job_id, state=JobState.RUNNING).order_by()
        found = job.values_list("max_workers", "owner_id").first()
        if found is None:
            return None
        max_workers, owner_id = found
        # Dead workers' grants do not count; the sweep removes them once it
        # has acted on them (requeue_abandoned_jobs).
        live = WorkerSlots.objects.filter(renewed_at__gte=alive_since).exclude(
            job_id=job_id, worker_id=worker_id
        )
        held_by_others = live.filter(job_id=job_id).aggregate(held=Sum("slots"))["held"] or 0
        free = max_workers - held_by_others
        if user_limit is not None:
            if owner_id is not None:
                get_user_model().objects.select_for_update().filter(pk=owner_id).exists()
            owners_jobs = live.filter(job__owner_id=owner_id, job__state=JobState.RUNNING)
            free = min(free, user_limit - (owners_jobs.aggregate(held=Sum("slots"))["held"] or 0))
        granted = max(in_flight, min(slots, free))
        WorkerSlots.objects.update_or_create(
            job_id=job_id, worker_id=worker_id, defaults={"slots": granted, "wants": wants, "renewed_at": now}
        )
    return granted


def release_slots(*, job_id, worker_id: str) -> None:
    """The worker has no calls in flight and leaves the job."""
    WorkerSlots.objects.filter(job_id=job_id, worker_id=worker_id).delete()


def release_worker(*, worker_id: str) -> None:
    """The worker leaves every job."""
    WorkerSlots.objects.filter(worker_id=worker_id).delete()


def grants_alive_since(now):
    """A grant not renewed within a lease period is a dead worker's, like
    its rows."""
    return now - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)


@dataclass(frozen=True)
class WorkerAtWork:
    """A live worker, its calls in flight at its last heartbeat, and its
    grant in each job it takes part in (job id, owner, slots, calls in flight)."""

    worker_id: str
    in_flight: int
    jobs: list[tuple[uuid.UUID, str, int, int]]


def workers_at_work() -> list[WorkerAtWork]:
    """Every worker holding a live grant, busiest first (for the admin)."""
    live = (
        WorkerSlots.objects.filter(
            renewed_at__gte=grants_alive_since(timezone.now()), job__state=JobState.RUNNING
        )
        .order_by("worker_id", "job__created_at")
        .values_list("worker_id", "job_id", "job__owner__username", "slots", "in_flight")
    )
    by_worker: dict[str, list] = {}
    for worker_id, job_id, owner, slots, in_flight in live:
        by_worker.setdefault(worker_id, []).append((job_id, owner or "anonymous", slots, in_flight))
    workers = [
        WorkerAtWork(worker_id=worker, in_flight=sum(job[3] for job in jobs), jobs=jobs)
        for worker, jobs in by_worker.items()
    ]
    return sorted(workers, key=lambda worker: (-worker.in_flight, worker.worker_id))
