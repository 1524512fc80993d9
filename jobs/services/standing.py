"""Where a job stands: how many queued jobs are ahead of a queued one, and
how many LLM calls a running one has in flight across all workers. For a
list, with_standing adds both to the list's own query."""

from django.db.models import Case, F, Func, IntegerField, OuterRef, Q, Subquery, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from ..models import ExtractJob, JobState, WorkerSlots
from .grants import grants_alive_since


def queue_position(job: ExtractJob) -> int | None:
    """For a queued job, the queued jobs created before it (every owner's:
    workers take jobs oldest first); None otherwise."""
    if "queue_position" in vars(job):  # read by its query (with_standing)
        return job.queue_position
    if job.state != JobState.QUEUED:
        return None
    return _queued_before(job.created_at).count()


def calls_in_flight(job: ExtractJob) -> int:
    """For a running job, its LLM calls in flight across all workers: the
    calls each live worker had in flight at its last heartbeat. 0 otherwise."""
    if "calls_in_flight" in vars(job):
        return job.calls_in_flight
    if job.state != JobState.RUNNING:
        return 0
    return sum(_live_grants(job.pk).values_list("in_flight", flat=True))


def with_standing(jobs):
    """The jobs, each with its queue_position and calls_in_flight read by
    the jobs' own query, so a list costs no query per job."""
    return jobs.annotate(
        queue_position=Case(
            When(state=JobState.QUEUED, then=Subquery(_count(_queued_before(OuterRef("created_at"))))),
            default=Value(None),
            output_field=IntegerField(),
        ),
        calls_in_flight=Case(
            When(
                state=JobState.RUNNING,
                then=Coalesce(Subquery(_sum(_live_grants(OuterRef("pk")), "in_flight")), Value(0)),
            ),
            default=Value(0),
            output_field=IntegerField(),
        ),
    )


def _queued_before(created_at):
    return ExtractJob.objects.filter(Q(state=JobState.QUEUED) & Q(created_at__lt=created_at))


def _live_grants(job_id):
    return WorkerSlots.objects.filter(job_id=job_id, renewed_at__gte=grants_alive_since(timezone.now()))


def _count(queryset):
    # COUNT over the whole subquery: a Func, unlike Count, adds no GROUP BY.
    return queryset.order_by().annotate(n=Func(F("pk"), function="COUNT")).values("n")


def _sum(queryset, field: str):
    return queryset.order_by().annotate(n=Func(F(field), function="SUM")).values("n")
