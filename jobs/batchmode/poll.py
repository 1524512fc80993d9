"""Polling the provider's batches from the workers' sweep thread
(jobs.sweeper), so no worker process waits idle for hours: every
STRINGSIGHT_BATCH_POLL_SECONDS one worker process, on whichever machine,
retrieves every submitted batch, asks for the cancels the lifecycle
requested, imports the batches that have ended, and enqueues the submit
work that a killed or lost task left undone."""

import logging
from dataclasses import dataclass
from datetime import timedelta

import openai
from django.conf import settings
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.tasks import async_task

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
from ..services.recovery import take_turn
from .importing import import_batch
from .provider import TERMINAL_STATUSES, BatchProvider
from .records import OPEN_STATES
from .submit import stale_since

log = logging.getLogger(__name__)

POLL_HEARTBEAT = "batch-poll"


@dataclass(frozen=True)
class PollReport:
    retrieved: int = 0
    imported: int = 0
    cancels_sent: int = 0
    submits_enqueued: int = 0


def poll_if_due(*, now=None) -> PollReport | None:
    """Poll unless some worker did within STRINGSIGHT_BATCH_POLL_SECONDS:
    the poll's heartbeat lets one through per interval, as for the sweep."""
    now = now or timezone.now()
    if not _anything_to_poll():
        return None
    if not take_turn(POLL_HEARTBEAT, seconds=settings.STRINGSIGHT_BATCH_POLL_SECONDS, now=now):
        return None
    return poll(now=now)


def _anything_to_poll() -> bool:
    # One cheap read on every offer, so that a cluster with no batch job
    # never writes the heartbeat.
    return (
        ProviderBatch.objects.filter(state__in=OPEN_STATES).exists()
        or ExtractJob.objects.filter(mode=JobMode.BATCH, state__in=ACTIVE_STATES).exists()
    )


def poll(*, now=None, provider: BatchProvider | None = None) -> PollReport:
    now = now or timezone.now()
    own_provider = provider is None
    provider = provider or BatchProvider.from_django()
    try:
        report = _poll_batches(provider, now=now)
    finally:
        if own_provider:
            provider.close()
    report = PollReport(
        report.retrieved, report.imported, report.cancels_sent, enqueue_submit_work(now=timezone.now())
    )
    if report.imported or report.cancels_sent or report.submits_enqueued:
        log_event("batch_poll", **vars(report))
    return report


def _poll_batches(provider: BatchProvider, *, now) -> PollReport:
    retrieved = imported = cancels = 0
    importing_since = now - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)
    for batch in ProviderBatch.objects.filter(state=ProviderBatchState.SUBMITTED).exclude(batch_id=""):
        if batch.provider_status in TERMINAL_STATUSES and batch.updated_at >= importing_since:
            continue  # another worker is importing it (it renews updated_at as it goes)
        try:
            found = provider.retrieve(batch.batch_id)
            retrieved += 1
            if batch.cancel_requested and found.status not in TERMINAL_STATUSES | {"cancelling"}:
                found = provider.cancel(batch.batch_id)
                cancels += 1
        except openai.APIError as exc:
            log.warning("batch %s: the provider did not answer (%s); next poll", batch.batch_id, exc)
            continue
        if not store_status(batch, found, now=timezone.now()):
            continue  # another worker stored it first, and imports it if it ended
        if found.status in TERMINAL_STATUSES:
            batch.refresh_from_db()
            try:
                import_batch(batch, provider)
            except Exception:
                # The other jobs' batches are polled all the same; this one
                # is imported again (idempotently) once its lease runs out.
                log.exception("batch %s of job %s: import failed", batch.batch_id, batch.job_id)
                continue
            imported += 1
    return PollReport(retrieved, imported, cancels)


def store_status(batch: ProviderBatch, found, *, now) -> bool:
    """The provider's status, counts and files on our record, only if no
    other worker changed the record since we read it (then that worker
    has the newer news, and the import if the batch ended)."""
    counts = found.request_counts
    return bool(
        ProviderBatch.objects.filter(
            pk=batch.pk, state=ProviderBatchState.SUBMITTED, updated_at=batch.updated_at
        ).update(
            provider_status=found.status,
            request_counts=(
                {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
                if counts
                else {}
            ),
            output_file_id=found.output_file_id or "",
            error_file_id=found.error_file_id or "",
            updated_at=now,
        )
    )


def cancel_batches(*, job_id) -> int:
    """The task a cancel enqueues: ask the provider to cancel the job's
    submitted batches at once, rather than at the next poll. Returns the
    cancels sent; the polls import what the provider completed."""
    provider = BatchProvider.from_django()
    sent = 0
    try:
        for batch in ProviderBatch.objects.filter(
            job_id=job_id, state=ProviderBatchState.SUBMITTED, cancel_requested=True
        ).exclude(batch_id=""):
            if batch.provider_status in TERMINAL_STATUSES | {"cancelling"}:
                continue
            try:
                found = provider.cancel(batch.batch_id)
            except openai.APIError as exc:
                log.warning("batch %s: cancel failed (%s); the polls ask again", batch.batch_id, exc)
                continue
            sent += 1
            store_status(batch, found, now=timezone.now())
    finally:
        provider.close()
    log_event("batch_cancels_sent", job_id=job_id, batches=sent)
    return sent


def enqueue_submit_work(*, now) -> int:
    """Enqueue jobs.tasks.submit_batches again for a batch job whose
    submission stopped: a half-made batch that no living worker can be
    making (stale_since), or an active job with pending rows, no batch in
    flight and no task for a lease period (its task was lost, or its
    worker killed before it made a batch). At most once a lease period per
    job (work_enqueued_at)."""
    quiet_since = now - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)
    open_batches = ProviderBatch.objects.filter(job=OuterRef("pk"), state__in=OPEN_STATES)
    half_made = Q()
    for state in (ProviderBatchState.PREPARING, ProviderBatchState.UPLOADED):
        half_made |= Q(Exists(open_batches.filter(state=state, updated_at__lt=stale_since(state, now))))
    pending = Exists(ExtractRow.objects.filter(job=OuterRef("pk"), status=RowStatus.PENDING))
    stalled = Q(state__in=ACTIVE_STATES) & Q(pending) & ~Q(Exists(open_batches))
    jobs = ExtractJob.objects.filter(mode=JobMode.BATCH).filter(
        Q(work_enqueued_at__lt=quiet_since) | Q(work_enqueued_at__isnull=True, created_at__lt=quiet_since)
    )
    candidates = list(jobs.filter(half_made | stalled).values_list("pk", "work_enqueued_at"))
    if not candidates or get_broker().queue_size():
        return 0  # tasks waiting in the broker may be these jobs' own
    enqueued = 0
    for job_id, enqueued_at in candidates:
        if ExtractJob.objects.filter(pk=job_id, work_enqueued_at=enqueued_at).update(work_enqueued_at=now):
            async_task("jobs.tasks.submit_batches", str(job_id))
            log_event("job_requeued", job_id=job_id, reason="its batch submission stopped")
            enqueued += 1
    return enqueued
