"""Slot grants: how many of a job's max_workers LLM calls each worker may
have in flight, kept in the database so they hold across processes and
machines."""

from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Sum
from django.utils import timezone

from ..models import (
    ExtractJob,
    JobState,
    WorkerSlots,
)


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
                connection.ops.adapt_datetimefield_value(grants_alive_since(timezone.now())),
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
        live = WorkerSlots.objects.filter(job_id=job_id, renewed_at__gte=grants_alive_since(now))
        held_by_others = live.exclude(worker_id=worker_id).aggregate(held=Sum("slots"))["held"] or 0
        granted = max(in_flight, min(slots, max_workers - held_by_others))
        WorkerSlots.objects.update_or_create(
            job_id=job_id, worker_id=worker_id, defaults={"slots": granted, "wants": wants, "renewed_at": now}
        )
    return granted


def release_slots(*, job_id, worker_id: str) -> None:
    """The worker has no calls in flight and leaves the job."""
    WorkerSlots.objects.filter(job_id=job_id, worker_id=worker_id).delete()


def grants_alive_since(now):
    """A grant not renewed within a lease period is a dead worker's, like
    its rows."""
    return now - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)
