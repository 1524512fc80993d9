"""What one user may have at once: STRINGSIGHT_USER_MAX_ACTIVE_JOBS queued
and running jobs. Anonymous callers share one count, as they share jobs."""

from django.conf import settings
from django.contrib.auth import get_user_model

from ..models import ACTIVE_STATES, ExtractJob
from .errors import LimitReached
from .sql import lock_anonymous_owner

TOO_MANY_ACTIVE_JOBS = "too_many_active_jobs"


def lock_owner(owner_id) -> None:
    """Hold the owner until the transaction ends, so that two of their
    starts never both pass a check on what they hold (active jobs, the
    daily budget): the second waits for the first to commit, then counts
    its job."""
    if owner_id is not None:
        get_user_model().objects.select_for_update().filter(pk=owner_id).exists()
    else:
        lock_anonymous_owner()


def check_active_jobs(*, owner_id) -> None:
    """Before a start or a resume, inside its transaction: LimitReached if
    the owner already has as many queued and running jobs as they may."""
    limit = settings.STRINGSIGHT_USER_MAX_ACTIVE_JOBS
    if limit is None:
        return
    lock_owner(owner_id)
    jobs = ExtractJob.objects.filter(state__in=ACTIVE_STATES)
    active = (
        jobs.filter(owner_id=owner_id) if owner_id is not None else jobs.filter(owner__isnull=True)
    ).count()
    if active >= limit:
        jobs = "job" if active == 1 else "jobs"
        most = "the most" if active == limit else f"more than the {limit}"
        raise LimitReached(
            TOO_MANY_ACTIVE_JOBS,
            f"you have {active} active {jobs}, {most} STRINGSIGHT_USER_MAX_ACTIVE_JOBS allows; "
            "wait for one to finish or cancel one",
        )
