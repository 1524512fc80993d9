"""Who may see, change and delete which job."""

from ..models import (
    ExtractJob,
)


def jobs_visible_to(user):
    """A user reaches only their own jobs; staff with the view permission
    reach everyone's. Anonymous callers (only in anonymous mode) share the
    jobs that have no owner."""
    if not user.is_authenticated:
        return ExtractJob.objects.filter(owner__isnull=True)
    if user.is_staff and user.has_perm("jobs.view_extractjob"):
        return ExtractJob.objects.all()
    return ExtractJob.objects.filter(owner=user)


def _owns(user, job: ExtractJob) -> bool:
    if not user.is_authenticated:
        return job.owner_id is None  # anonymous mode: ownerless jobs are shared
    return job.owner_id == user.pk


def may_change(user, job: ExtractJob) -> bool:
    """Owners cancel and resume their own jobs; doing so to someone else's
    needs staff with the change permission."""
    return _owns(user, job) or (user.is_staff and user.has_perm("jobs.change_extractjob"))


def may_delete(user, job: ExtractJob) -> bool:
    return _owns(user, job) or (user.is_staff and user.has_perm("jobs.delete_extractjob"))
