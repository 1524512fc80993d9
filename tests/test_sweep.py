"""The sweep repairs what dead workers leave behind."""

import threading
import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone
from django_q.models import OrmQ, Schedule

from jobs import sweeper
from jobs.models import ExtractJob, ExtractRow, Heartbeat, IdempotencyKey, WorkerSlots
from jobs.services import claims, grants, lifecycle, recovery
from tests import factories
from tests.factories import done_outcome, make_job, simple_rows

pytestmark = pytest.mark.django_db


def running_job(owner, rows=3, **params):
    job = make_job(owner, simple_rows(rows), **params)
    lifecycle.job_mark_running(job_id=job.id)
    return job


def expire(rows, seconds_ago=1):
    ExtractRow.objects.filter(pk__in=[row.id for row in rows]).update(
        lease_expires_at=timezone.now() - timedelta(seconds=seconds_ago)
    )


def test_sweep_returns_rows_of_a_dead_worker_to_pending(user):
    job = running_job(user)
    dead = claims.claim_rows(job_id=job.id, worker_id="dead", limit=2).rows
    alive = claims.claim_rows(job_id=job.id, worker_id="alive", limit=1).rows
    expire(dead)

    report = recovery.sweep()

    assert report.released == 2
    rows = {row.index: row for row in ExtractRow.objects.filter(job=job)}
    assert [(rows[r.index].status, rows[r.index].lease_expiries) for r in dead] == [
        ("pending", 1),
        ("pending", 1),
    ]
    assert rows[alive[0].index].status == "running"
    again = claims.claim_rows(job_id=job.id, worker_id="new", limit=5).rows
    assert sorted(row.index for row in again) == sorted(row.index for row in dead)


def test_a_row_that_outlives_too_many_workers_is_failed(user, settings):
    settings.STRINGSIGHT_MAX_LEASE_EXPIRIES = 2
    job = running_job(user, rows=1)
    for _ in range(2):
        expire(claims.claim_rows(job_id=job.id, worker_id="w", limit=1).rows)
        recovery.sweep()

    job.refresh_from_db()
    row = ExtractRow.objects.get(job=job)
    assert (row.status, row.lease_expiries) == ("failed", 2)
    assert row.error == "the worker extracting this row stopped responding 2 times"
    assert (job.state, job.count_failed) == ("done", 1)


def test_a_late_result_from_a_worker_presumed_dead_is_discarded(user):
    job = running_job(user, rows=1)
    row = claims.claim_rows(job_id=job.id, worker_id="slow", limit=1).rows[0]
    expire([row])
    recovery.sweep()
    claims.claim_rows(job_id=job.id, worker_id="new", limit=1)

    late = factories.record_row_result(
        job_id=job.id, row_id=row.id, row_index=0, worker_id="slow", outcome=done_outcome(2)
    )
    fresh = factories.record_row_result(
        job_id=job.id, row_id=row.id, row_index=0, worker_id="new", outcome=done_outcome(3)
    )

    job.refresh_from_db()
    assert (late, fresh) == (False, True)
    assert (job.state, job.properties_count, job.count_done) == ("done", 3, 1)


def test_sweep_leaves_rows_of_finished_jobs_alone(user):
    job = running_job(user)
    rows = claims.claim_rows(job_id=job.id, worker_id="w", limit=1).rows
    expire(rows)
    ExtractJob.objects.filter(pk=job.id).update(state="error")

    assert recovery.sweep().released == 0
    assert ExtractRow.objects.get(pk=rows[0].id).status == "running"


def test_sweep_finishes_a_job_whose_rows_are_all_finished(user):
    job = running_job(user, rows=2)
    ExtractJob.objects.filter(pk=job.id).update(count_done=1, count_failed=1)

    assert recovery.sweep().finished == 1
    job.refresh_from_db()
    assert job.state == "done"
    assert job.finished_at is not None


def test_sweep_re_enqueues_work_for_a_job_nobody_works_on(user, settings):
    job = running_job(user, rows=5)
    stale = timezone.now() - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS + 1)
    ExtractJob.objects.filter(pk=job.id).update(work_enqueued_at=stale)

    report = recovery.sweep()

    assert report.requeued_jobs == 1
    assert OrmQ.objects.count() == 1  # one worker serves every job
    job.refresh_from_db()
    assert job.work_enqueued_at > stale
    assert recovery.sweep().requeued_jobs == 0  # work is queued now


@pytest.mark.parametrize("situation", ["recently_enqueued", "a_worker_holds_rows", "recent_progress"])
def test_sweep_leaves_a_job_with_live_work_alone(user, settings, situation):
    job = running_job(user, rows=5)
    stale = timezone.now() - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS + 1)
    ExtractJob.objects.filter(pk=job.id).update(
        work_enqueued_at=timezone.now() if situation == "recently_enqueued" else stale
    )
    if situation == "a_worker_holds_rows":
        claims.claim_rows(job_id=job.id, worker_id="w", limit=1)
    if situation == "recent_progress":
        row = claims.claim_rows(job_id=job.id, worker_id="w", limit=1).rows[0]
        factories.record_row_result(
            job_id=job.id, row_id=row.id, row_index=row.index, worker_id="w", outcome=done_outcome(1)
        )

    assert recovery.sweep().requeued_jobs == 0
    assert OrmQ.objects.count() == 0


def test_sweep_adds_nothing_while_the_broker_still_holds_tasks(
    user, settings, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        job = make_job(user)
    ExtractJob.objects.filter(pk=job.id).update(
        work_enqueued_at=timezone.now() - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS + 1)
    )

    assert recovery.sweep().requeued_jobs == 0
    assert OrmQ.objects.count() == 1


def test_the_sweep_command_schedules_itself_and_reports(user):
    Schedule.objects.filter(name=recovery.SWEEP_SCHEDULE_NAME).delete()
    out = StringIO()

    call_command("sweep", stdout=out)

    schedule = Schedule.objects.get(name=recovery.SWEEP_SCHEDULE_NAME)
    assert (schedule.func, schedule.schedule_type, schedule.minutes, schedule.repeats) == (
        "jobs.tasks.sweep",
        "I",
        1,
        -1,
    )
    assert out.getvalue().strip() == (
        "released 0 rows, failed 0 rows, finished 0 jobs, re-enqueued work for 0 jobs"
    )


def make_dead(job, worker_id: str, seconds_ago: float | None = None, *, settings) -> None:
    """The worker stopped renewing its rows and grant a lease period ago (and more)."""
    past = timezone.now() - timedelta(seconds=seconds_ago or settings.STRINGSIGHT_LEASE_SECONDS + 1)
    ExtractRow.objects.filter(job=job, claimed_by=worker_id, status="running").update(lease_expires_at=past)
    WorkerSlots.objects.filter(job=job, worker_id=worker_id).update(
        renewed_at=past - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)
    )


def test_a_claim_takes_the_rows_of_a_dead_worker_first_and_counts_their_expiry(user, settings):
    job = running_job(user, rows=5)
    claims.claim_rows(job_id=job.id, worker_id="dead", limit=2)
    claims.claim_rows(job_id=job.id, worker_id="alive", limit=1)
    make_dead(job, "dead", settings=settings)

    taken = claims.claim_rows(job_id=job.id, worker_id="new", limit=3).rows

    assert [row.index for row in taken] == [0, 1, 3]
    rows = ExtractRow.objects.filter(job=job).order_by("index")
    assert [(row.status, row.claimed_by, row.lease_expiries) for row in rows] == [
        ("running", "new", 1),
        ("running", "new", 1),
        ("running", "alive", 0),
        ("running", "new", 0),
        ("pending", "", 0),
    ]


def test_a_claim_never_takes_a_living_workers_rows(user):
    job = running_job(user, rows=3)
    claims.claim_rows(job_id=job.id, worker_id="slow", limit=3)

    claim = claims.claim_rows(job_id=job.id, worker_id="other", limit=3)

    assert (claim.rows, claim.pending_left) == ([], False)
    assert set(ExtractRow.objects.values_list("claimed_by", "lease_expiries")) == {("slow", 0)}


def test_a_claim_fails_a_row_that_outlived_too_many_workers_and_finishes_the_job(user, settings):
    settings.STRINGSIGHT_MAX_LEASE_EXPIRIES = 2
    job = running_job(user, rows=1)
    claims.claim_rows(job_id=job.id, worker_id="first", limit=1)
    make_dead(job, "first", settings=settings)
    assert [row.index for row in claims.claim_rows(job_id=job.id, worker_id="second", limit=1).rows] == [0]
    make_dead(job, "second", settings=settings)

    claim = claims.claim_rows(job_id=job.id, worker_id="third", limit=1)

    job.refresh_from_db()
    row = ExtractRow.objects.get(job=job)
    assert (claim.rows, claim.job_running) == ([], False)
    assert (row.status, row.lease_expiries, row.error) == (
        "failed",
        2,
        "the worker extracting this row stopped responding 2 times",
    )
    assert (job.state, job.count_failed) == ("done", 1)


def test_a_claim_renews_the_claiming_workers_grant(user, settings):
    job = running_job(user, rows=4)
    grants.set_slots(job_id=job.id, worker_id="w", slots=2, in_flight=0, wants=True)
    old = timezone.now() - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS - 1)
    WorkerSlots.objects.update(renewed_at=old)

    claims.claim_rows(job_id=job.id, worker_id="w", limit=2)

    assert WorkerSlots.objects.get().renewed_at > old + timedelta(seconds=1)


def test_sweep_enqueues_the_work_of_a_job_whose_worker_died_at_once_and_once(user, settings):
    job = running_job(user, rows=5)
    ExtractJob.objects.filter(pk=job.id).update(work_enqueued_at=timezone.now())  # its task: taken, now dead
    grants.set_slots(job_id=job.id, worker_id="dead", slots=8, in_flight=0, wants=True)
    claims.claim_rows(job_id=job.id, worker_id="dead", limit=3)
    make_dead(job, "dead", settings=settings)

    report = recovery.sweep()
    again = recovery.sweep()

    assert (report.released, report.requeued_jobs) == (3, 1)
    assert OrmQ.objects.count() == 1
    assert not WorkerSlots.objects.exists()
    assert again.requeued_jobs == 0  # the death was acted on; its task is queued
    assert OrmQ.objects.count() == 1


def test_sweep_leaves_a_dead_workers_rows_to_a_living_worker_still_taking_rows(user, settings):
    job = running_job(user, rows=5)
    grants.set_slots(job_id=job.id, worker_id="dead", slots=4, in_flight=0, wants=True)
    grants.set_slots(job_id=job.id, worker_id="alive", slots=4, in_flight=0, wants=True)
    claims.claim_rows(job_id=job.id, worker_id="dead", limit=2)
    make_dead(job, "dead", settings=settings)

    report = recovery.sweep()

    assert (report.released, report.requeued_jobs) == (2, 0)
    assert OrmQ.objects.count() == 0
    assert list(WorkerSlots.objects.values_list("worker_id", flat=True)) == ["alive"]
    assert [row.index for row in claims.claim_rows(job_id=job.id, worker_id="alive", limit=5).rows] == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_sweep_enqueues_work_when_the_only_living_worker_takes_no_more_rows(user, settings):
    job = running_job(user, rows=4)
    grants.set_slots(job_id=job.id, worker_id="dead", slots=2, in_flight=0, wants=True)
    claims.claim_rows(job_id=job.id, worker_id="dead", limit=2)
    grants.set_slots(job_id=job.id, worker_id="finishing", slots=2, in_flight=2, wants=False)
    claims.claim_rows(job_id=job.id, worker_id="finishing", limit=2)
    make_dead(job, "dead", settings=settings)

    assert recovery.sweep().requeued_jobs == 1
    assert OrmQ.objects.count() == 1


def test_sweep_never_piles_tasks_on_a_job_waiting_in_the_queue(
    user, settings, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        job = make_job(user, simple_rows(3))

    reports = [recovery.sweep(now=timezone.now() + timedelta(seconds=seconds)) for seconds in (0, 10, 60)]

    assert [report.requeued_jobs for report in reports] == [0, 0, 0]
    assert OrmQ.objects.count() == 1
    assert ExtractJob.objects.get(pk=job.id).state == "queued"


def test_sweep_if_due_lets_one_sweep_through_per_interval(user, settings):
    settings.STRINGSIGHT_SWEEP_SECONDS = 5
    start = timezone.now()

    swept = [
        recovery.sweep_if_due(now=start + timedelta(seconds=seconds)) is not None
        for seconds in (0, 0, 4.9, 5.0, 5.1, 10.1)
    ]

    assert swept == [True, False, False, True, False, True]
    assert Heartbeat.objects.get(name="sweep").at == start + timedelta(seconds=10.1)


def test_sweep_forgets_idempotency_keys_after_a_day(user):
    job = make_job(user)
    now = timezone.now()
    for key, age in (("old", timedelta(hours=24, seconds=1)), ("recent", timedelta(hours=23))):
        IdempotencyKey.objects.create(owner=user, key=key, request_hash="h", job=job, created_at=now - age)

    recovery.sweep(now=now)

    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["recent"]


@pytest.mark.django_db(transaction=True)
def test_a_workers_background_sweeps_return_a_dead_workers_rows_and_requeue_its_job(
    user, settings, no_background_worker
):
    settings.STRINGSIGHT_SWEEP_SECONDS = 0.2
    job = running_job(user, rows=3)
    grants.set_slots(job_id=job.id, worker_id="dead", slots=2, in_flight=0, wants=True)
    claims.claim_rows(job_id=job.id, worker_id="dead", limit=2)
    make_dead(job, "dead", settings=settings)
    OrmQ.objects.all().delete()  # the start's task: taken by the worker that died
    queued_before = 0
    stop = threading.Event()
    sweeps = threading.Thread(target=sweeper.sweep_until, args=(stop,))
    sweeps.start()
    try:
        deadline = time.monotonic() + 60
        while OrmQ.objects.count() == queued_before and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        sweeps.join()

    assert OrmQ.objects.count() == queued_before + 1
    rows = ExtractRow.objects.filter(job=job).order_by("index")
    assert [(row.status, row.lease_expiries) for row in rows] == [
        ("pending", 1),
        ("pending", 1),
        ("pending", 0),
    ]
    assert Heartbeat.objects.filter(name="sweep").exists()
