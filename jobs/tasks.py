"""django-q2 tasks: take an id, call the services or the worker. No rules live here."""

from .batchmode import poll, submit
from .services import recovery
from .worker.engine import Engine, WorkerSettings


def serve_jobs() -> str:
    """Take part in every running job until none has rows left for this
    worker. Safe to run any number of times at once: rows are claimed and
    calls granted in the database, so another worker only adds capacity."""
    return Engine(WorkerSettings.from_django()).run()


def sweep() -> str:
    return str(recovery.sweep())


def process_job_chunk(job_id: str) -> str:
    """A task enqueued by a release whose workers served one job each:
    serving every job includes that one."""
    return serve_jobs()


def submit_batches(job_id: str) -> str:
    """A batch job's rows to the provider's Batch API (jobs.batchmode.submit)."""
    return submit.submit_batches(job_id=job_id)


def cancel_batches(job_id: str) -> str:
    """Ask the provider to cancel a cancelled batch job's batches now."""
    return f"sent {poll.cancel_batches(job_id=job_id)} cancels"
