"""django-q2 tasks: take an id, call the services. No rules live here."""

from .runner import ChunkRunner, RunnerSettings
from .services import lifecycle, recovery


def process_job_chunk(job_id: str) -> str:
    """Work on the job until no rows are left to claim. Safe to run twice:
    rows are claimed in the database, so a second delivery only helps."""
    lifecycle.job_mark_running(job_id=job_id)
    return ChunkRunner(job_id, RunnerSettings.from_django()).run()


def sweep() -> str:
    return str(recovery.sweep())
