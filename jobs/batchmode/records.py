"""What the lifecycle changes on a batch job's provider batches and rows
when the job ends or resumes. No provider call: the caller holds the job's
transaction, and the provider is asked afterwards (tasks.cancel_batches)."""

from ..models import ExtractRow, ProviderBatch, ProviderBatchState, RowStatus

# A batch in these states may still have rows at the provider, or be about to.
OPEN_STATES = (ProviderBatchState.PREPARING, ProviderBatchState.UPLOADED, ProviderBatchState.SUBMITTED)


def worker_id_for(batch: ProviderBatch) -> str:
    """The claimed_by of a row the batch sends: recording a line finds the
    row still running and still this batch's, or leaves it (already done,
    or sent again by another batch)."""
    return f"batch:{batch.pk}"


def rows_at_provider(job_id):
    """The job's rows that an open batch holds: they end when it is imported
    (or abandoned), never by a cancel."""
    return ExtractRow.objects.filter(
        job_id=job_id,
        status=RowStatus.RUNNING,
        provider_batch__state__in=OPEN_STATES,
    )


def close_rows_not_at_provider(*, job_id, status: str, now) -> int:
    """A batch job's cancel or failure: its pending rows, and rows taken but
    not yet in a batch, end now. Rows in an open batch stay running: the
    provider may complete (and bill) them, and the import records them."""
    held = rows_at_provider(job_id).values("pk")
    return (
        ExtractRow.objects.filter(job_id=job_id, status__in=(RowStatus.PENDING, RowStatus.RUNNING))
        .exclude(pk__in=held)
        .update(status=status, finished_at=now, lease_expires_at=None)
    )


def request_cancel(*, job_id) -> int:
    """Mark the job's open batches for cancelling. The provider is asked by
    tasks.cancel_batches (and by every poll until it says so); a batch not
    yet created is abandoned by whoever would have created it."""
    return ProviderBatch.objects.filter(job_id=job_id, state__in=OPEN_STATES).update(cancel_requested=True)


def pending_provider_results(*, job_id) -> bool:
    """The design's rule for the status: the provider holds results of the
    job that are not imported yet."""
    batches = ProviderBatch.objects.filter(job_id=job_id).exclude(batch_id="")
    return batches.exclude(state=ProviderBatchState.IMPORTED).exists()
