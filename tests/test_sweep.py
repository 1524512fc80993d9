"""The sweep repairs what dead workers leave behind."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone
from django_q.models import OrmQ, Schedule

from jobs import services
from jobs.models import ExtractJob, ExtractRow
from tests.factories import done_outcome, make_job, simple_rows

pytestmark = pytest.mark.django_db


def running_job(owner, rows=3, **params):
    job = make_job(owner, simple_rows(rows), **params)
    services.job_mark_running(job_id=job.id)
    return job


def expire(rows, seconds_ago=1):
    ExtractRow.objects.filter(pk__in=[row.id for row in rows]).update(
        lease_expires_at=timezone.now() - timedelta(seconds=seconds_ago)
    )


def test_sweep_returns_rows_of_a_dead_worker_to_pending(user):
    job = running_job(user)
    dead = services.claim_rows(job_id=job.id, worker_id="dead", limit=2).rows
    alive = services.claim_rows(job_id=job.id, worker_id="alive", limit=1).rows
    expire(dead)

    report = services.sweep()

    assert report.released == 2
    rows = {row.index: row for row in ExtractRow.objects.filter(job=job)}
    assert [(rows[r.index].status, rows[r.index].lease_expiries) for r in dead] == [
        ("pending", 1),
        ("pending", 1),
    ]
    assert rows[alive[0].index].status == "running"
    again = services.claim_rows(job_id=job.id, worker_id="new", limit=5).rows
    assert sorted(row.index for row in again) == sorted(row.index for row in dead)


def test_a_row_that_outlives_too_many_workers_is_failed(user, settings):
    settings.STRINGSIGHT_MAX_LEASE_EXPIRIES = 2
    job = running_job(user, rows=1)
    for _ in range(2):
        expire(services.claim_rows(job_id=job.id, worker_id="w", limit=1).rows)
        services.sweep()

    job.refresh_from_db()
    row = ExtractRow.objects.get(job=job)
    assert (row.status, row.lease_expiries) == ("failed", 2)
    assert row.error == "the worker extracting this row stopped responding 2 times"
    assert (job.state, job.count_failed) == ("done", 1)


def test_a_late_result_from_a_worker_presumed_dead_is_discarded(user):
    job = running_job(user, rows=1)
    row = services.claim_rows(job_id=job.id, worker_id="slow", limit=1).rows[0]
    expire([row])
    services.sweep()
    services.claim_rows(job_id=job.id, worker_id="new", limit=1)

    late = services.record_row_result(
        job_id=job.id, row_id=row.id, row_index=0, worker_id="slow", outcome=done_outcome(2)
    )
    fresh = services.record_row_result(
        job_id=job.id, row_id=row.id, row_index=0, worker_id="new", outcome=done_outcome(3)
    )

    job.refresh_from_db()
    assert (late, fresh) == (False, True)
    assert (job.state, job.properties_count, job.count_done) == ("done", 3, 1)


def test_sweep_leaves_rows_of_finished_jobs_alone(user):
    job = running_job(user)
    rows = services.claim_rows(job_id=job.id, worker_id="w", limit=1).rows
    expire(rows)
    ExtractJob.objects.filter(pk=job.id).update(state="error")

    assert services.sweep().released == 0
    assert ExtractRow.objects.get(pk=rows[0].id).status == "running"


def test_sweep_finishes_a_job_whose_rows_are_all_finished(user):
    job = running_job(user, rows=2)
    ExtractJob.objects.filter(pk=job.id).update(count_done=1, count_failed=1)

    assert services.sweep().finished == 1
    job.refresh_from_db()
    assert job.state == "done"
    assert job.finished_at is not None


def test_sweep_re_enqueues_work_for_a_job_nobody_works_on(user, settings):
    settings.STRINGSIGHT_CHUNK_SIZE = 2
    job = running_job(user, rows=5)
    stale = timezone.now() - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS + 1)
    ExtractJob.objects.filter(pk=job.id).update(work_enqueued_at=stale)

    report = services.sweep()

    assert report.requeued_jobs == 1
    assert OrmQ.objects.count() == 3
    job.refresh_from_db()
    assert job.work_enqueued_at > stale
    assert services.sweep().requeued_jobs == 0  # work is queued now


@pytest.mark.parametrize("situation", ["recently_enqueued", "a_worker_holds_rows", "recent_progress"])
def test_sweep_leaves_a_job_with_live_work_alone(user, settings, situation):
    job = running_job(user, rows=5)
    stale = timezone.now() - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS + 1)
    ExtractJob.objects.filter(pk=job.id).update(
        work_enqueued_at=timezone.now() if situation == "recently_enqueued" else stale
    )
    if situation == "a_worker_holds_rows":
        services.claim_rows(job_id=job.id, worker_id="w", limit=1)
    if situation == "recent_progress":
        row = services.claim_rows(job_id=job.id, worker_id="w", limit=1).rows[0]
        services.record_row_result(
            job_id=job.id, row_id=row.id, row_index=row.index, worker_id="w", outcome=done_outcome(1)
        )

    assert services.sweep().requeued_jobs == 0
    assert OrmQ.objects.count() == 0


def test_sweep_adds_nothing_while_the_broker_still_holds_tasks(
    user, settings, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        job = make_job(user)
    ExtractJob.objects.filter(pk=job.id).update(
        work_enqueued_at=timezone.now() - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS + 1)
    )

    assert services.sweep().requeued_jobs == 0
    assert OrmQ.objects.count() == 1


def test_the_sweep_command_schedules_itself_and_reports(user):
    Schedule.objects.filter(name=services.SWEEP_SCHEDULE_NAME).delete()
    out = StringIO()

    call_command("sweep", stdout=out)

    schedule = Schedule.objects.get(name=services.SWEEP_SCHEDULE_NAME)
    assert (schedule.func, schedule.schedule_type, schedule.minutes, schedule.repeats) == (
        "jobs.tasks.sweep",
        "I",
        1,
        -1,
    )
    assert out.getvalue().strip() == (
        "released 0 rows, failed 0 rows, finished 0 jobs, re-enqueued work for 0 jobs"
    )
