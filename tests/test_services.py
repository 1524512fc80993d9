from datetime import timedelta

import pytest
from django.db.models import F
from django.utils import timezone
from django_q.models import OrmQ

from extraction.extract import RowOutcome
from jobs.models import ExtractJob, ExtractRow, JobState, Property, RowStatus, WorkerSlots
from jobs.services import access, claims, grants, lifecycle, recovery
from tests import factories
from tests.factories import done_outcome, make_job, simple_rows

pytestmark = pytest.mark.django_db


def start_running(owner, rows=None, **params) -> ExtractJob:
    job = make_job(owner, rows, **params)
    lifecycle.job_mark_running(job_id=job.id)
    job.refresh_from_db()
    return job


def test_job_start_stores_rows_in_input_order_with_question_ids(user):
    rows = simple_rows(3)
    del rows[1]["question_id"]

    job = make_job(user, rows)

    stored = list(job.rows.order_by("index").values_list("index", "question_id", "status", "data"))
    assert [(index, status) for index, _, status, _ in stored] == [
        (0, "pending"),
        (1, "pending"),
        (2, "pending"),
    ]
    assert stored[0][1] == "q0"
    assert stored[1][1].startswith("q-")
    assert stored[2][3] == rows[2]
    assert (job.state, job.count_total, job.count_done, job.properties_count) == ("queued", 3, 0, 0)


def test_job_start_wakes_enough_workers_for_its_max_workers_after_commit(
    user, settings, django_capture_on_commit_callbacks
):
    settings.STRINGSIGHT_WORKER_CONCURRENCY = 4
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "workers": 3}
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        make_job(user, simple_rows(5), max_workers=9)
    assert OrmQ.objects.count() == 0  # nothing is enqueued before the job is committed

    for callback in callbacks:
        callback()
    assert OrmQ.objects.count() == 3  # 9 calls at once need 3 workers of 4

    with django_capture_on_commit_callbacks(execute=True):
        make_job(user, simple_rows(5), max_workers=9)
    assert OrmQ.objects.count() == 3  # the waiting tasks serve every job


def test_a_small_job_wakes_one_worker(user, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        make_job(user, simple_rows(5), max_workers=2)

    assert OrmQ.objects.count() == 1


def test_claim_rows_takes_lowest_pending_indexes(user, settings):
    job = start_running(user, simple_rows(5), max_workers=10)

    before = timezone.now()
    claim = claims.claim_rows(job_id=job.id, worker_id="w1", limit=2)
    after = timezone.now()

    assert [row.index for row in claim.rows] == [0, 1]
    assert (claim.job_running, claim.pending_left) == (True, True)
    running = job.rows.filter(status=RowStatus.RUNNING)
    assert sorted(running.values_list("index", flat=True)) == [0, 1]
    assert set(running.values_list("claimed_by", flat=True)) == {"w1"}
    lease = timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)
    for row in running:
        assert before <= row.started_at <= after
        assert row.lease_expires_at == row.started_at + lease


def test_slot_grants_never_add_up_to_more_than_max_workers(user):
    job = start_running(user, simple_rows(10), max_workers=5)

    first = grants.set_slots(job_id=job.id, worker_id="w1", slots=5, in_flight=0, wants=True)
    second = grants.set_slots(job_id=job.id, worker_id="w2", slots=3, in_flight=0, wants=True)

    assert (first, second) == (5, 0)  # w1 holds every slot until it gives some back
    view = slot_view(job.id)
    assert view.grants == {"w1": (5, True), "w2": (0, True)}
    assert (view.fair_share("w1", wants=True), view.fair_share("w2", wants=True)) == (3, 2)

    # w1 lowers its grant to its share, but not below the 4 calls it has running.
    assert grants.set_slots(job_id=job.id, worker_id="w1", slots=3, in_flight=4, wants=True) == 4
    assert grants.set_slots(job_id=job.id, worker_id="w2", slots=2, in_flight=0, wants=True) == 1
    assert grants.set_slots(job_id=job.id, worker_id="w1", slots=3, in_flight=2, wants=True) == 3
    assert grants.set_slots(job_id=job.id, worker_id="w2", slots=2, in_flight=1, wants=True) == 2
    assert sum(slots for slots, _ in slot_view(job.id).grants.values()) == 5


def test_fair_shares_add_up_to_max_workers_among_the_workers_that_want_slots(user):
    job = start_running(user, simple_rows(10), max_workers=7)
    for worker in ("a", "b", "c"):
        grants.set_slots(job_id=job.id, worker_id=worker, slots=0, in_flight=0, wants=True)
    view = slot_view(job.id)

    assert [view.fair_share(worker, wants=True) for worker in ("a", "b", "c")] == [3, 2, 2]
    assert view.fair_share("d", wants=True) == 1  # a newcomer counts itself in: 7 among four
    assert view.fair_share("a", wants=False) == 0

    # A worker with no rows left to call leaves its share to the others.
    grants.set_slots(job_id=job.id, worker_id="c", slots=0, in_flight=0, wants=False)
    view = slot_view(job.id)
    assert [view.fair_share(worker, wants=True) for worker in ("a", "b")] == [4, 3]


def test_a_dead_workers_grant_is_given_back_after_a_lease_period(user, settings):
    job = start_running(user, simple_rows(10), max_workers=4)
    grants.set_slots(job_id=job.id, worker_id="dead", slots=4, in_flight=0, wants=True)
    assert grants.set_slots(job_id=job.id, worker_id="alive", slots=4, in_flight=0, wants=True) == 0

    WorkerSlots.objects.filter(worker_id="dead").update(
        renewed_at=timezone.now() - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS + 1)
    )

    assert slot_view(job.id).grants == {"alive": (0, True)}
    assert grants.set_slots(job_id=job.id, worker_id="alive", slots=4, in_flight=0, wants=True) == 4
    # The sweep acts on the death (a living worker wants rows: nothing to
    # enqueue), then forgets the grant.
    assert recovery.jobs_with_dead_workers(now=timezone.now()) == {job.id}
    assert recovery.sweep().requeued_jobs == 0
    assert list(WorkerSlots.objects.values_list("worker_id", flat=True)) == ["alive"]


def test_renewing_leases_keeps_the_grant_alive_and_release_gives_it_back(user, settings):
    job = start_running(user, simple_rows(10), max_workers=4)
    grants.set_slots(job_id=job.id, worker_id="w1", slots=4, in_flight=0, wants=True)
    WorkerSlots.objects.update(
        renewed_at=timezone.now() - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS - 1)
    )

    claims.renew_leases(worker_id="w1", in_flight={job.id: 3})
    WorkerSlots.objects.update(renewed_at=F("renewed_at") - timedelta(seconds=2))

    assert slot_view(job.id).grants == {"w1": (4, True)}
    assert WorkerSlots.objects.get().in_flight == 3  # what the status shows
    grants.release_slots(job_id=job.id, worker_id="w1")
    assert slot_view(job.id).grants == {}


@pytest.mark.parametrize("state", ["queued", "cancelled", "done", "error"])
def test_no_slots_unless_the_job_is_running(user, state):
    job = make_job(user)
    ExtractJob.objects.filter(pk=job.id).update(state=state)

    assert slot_view(job.id) is None
    assert grants.set_slots(job_id=job.id, worker_id="w1", slots=2, in_flight=0, wants=True) is None
    assert not WorkerSlots.objects.exists()


def test_the_sweep_drops_the_grants_of_jobs_that_stopped_running(user):
    running = start_running(user, simple_rows(2), max_workers=2)
    stopped = start_running(user, simple_rows(2), max_workers=2)
    for job in (running, stopped):
        grants.set_slots(job_id=job.id, worker_id="w1", slots=2, in_flight=0, wants=True)
    ExtractJob.objects.filter(pk=stopped.id).update(state=JobState.CANCELLED)

    recovery.sweep()

    assert list(WorkerSlots.objects.values_list("job_id", flat=True)) == [running.id]


def test_claim_rows_says_when_no_pending_rows_are_left(user):
    job = start_running(user, simple_rows(2), max_workers=10)

    claim = claims.claim_rows(job_id=job.id, worker_id="w1", limit=10)

    assert len(claim.rows) == 2
    assert claim.pending_left is False


@pytest.mark.parametrize("state", ["queued", "cancelled", "done", "error"])
def test_claim_rows_takes_nothing_unless_the_job_is_running(user, state):
    job = make_job(user)
    ExtractJob.objects.filter(pk=job.id).update(state=state)

    claim = claims.claim_rows(job_id=job.id, worker_id="w1", limit=5)

    assert (claim.rows, claim.job_running) == ([], False)
    assert job.rows.filter(status=RowStatus.RUNNING).count() == 0


def test_record_row_result_stores_properties_and_counters_together(user):
    job = start_running(user, simple_rows(3))
    row = claims.claim_rows(job_id=job.id, worker_id="w1", limit=1).rows[0]

    stored = factories.record_row_result(
        job_id=job.id, row_id=row.id, row_index=row.index, worker_id="w1", outcome=done_outcome(2)
    )

    assert stored is True
    job.refresh_from_db()
    assert (job.count_done, job.count_failed, job.properties_count) == (1, 0, 2)
    assert (job.prompt_tokens, job.completion_tokens) == (100, 40)
    db_row = ExtractRow.objects.get(pk=row.id)
    assert (db_row.status, db_row.attempts, db_row.claimed_by, db_row.raw_answer) == (
        "done",
        1,
        "w1",
        "[...]",
    )
    assert db_row.lease_expires_at is None
    descriptions = list(
        Property.objects.filter(row_id=row.id)
        .order_by("position")
        .values_list("property_description", flat=True)
    )
    assert descriptions == ["Behaviour 0.", "Behaviour 1."]


def test_record_row_result_counts_a_failed_row_and_keeps_its_answer(user):
    job = start_running(user, simple_rows(2))
    row = claims.claim_rows(job_id=job.id, worker_id="w1", limit=1).rows[0]
    outcome = RowOutcome(
        raw_answer="no json here",
        prompt_tokens=10,
        completion_tokens=5,
        attempts=1,
        error="no valid property in the LLM answer: no JSON found",
    )

    factories.record_row_result(
        job_id=job.id, row_id=row.id, row_index=row.index, worker_id="w1", outcome=outcome
    )

    job.refresh_from_db()
    assert (job.count_done, job.count_failed, job.properties_count, job.state) == (0, 1, 0, "running")
    db_row = ExtractRow.objects.get(pk=row.id)
    assert (db_row.status, db_row.error, db_row.raw_answer) == (
        "failed",
        "no valid property in the LLM answer: no JSON found",
        "no json here",
    )


def test_last_row_finishes_the_job_as_done_even_with_failures(user):
    job = start_running(user, simple_rows(2))
    first, second = claims.claim_rows(job_id=job.id, worker_id="w1", limit=2).rows

    factories.record_row_result(
        job_id=job.id, row_id=first.id, row_index=0, worker_id="w1", outcome=RowOutcome(error="bad answer")
    )
    before = timezone.now()
    factories.record_row_result(
        job_id=job.id, row_id=second.id, row_index=1, worker_id="w1", outcome=done_outcome(3)
    )
    after = timezone.now()

    job.refresh_from_db()
    assert (job.state, job.count_done, job.count_failed, job.properties_count) == ("done", 1, 1, 3)
    assert before <= job.finished_at <= after
    assert job.error == ""
    assert job.progress == 1.0


def test_a_result_arriving_after_cancel_is_discarded(user):
    job = start_running(user, simple_rows(3))
    first, second = claims.claim_rows(job_id=job.id, worker_id="w1", limit=2).rows
    factories.record_row_result(
        job_id=job.id, row_id=first.id, row_index=0, worker_id="w1", outcome=done_outcome(2)
    )

    cancelled = lifecycle.job_cancel(job=job)
    stored = factories.record_row_result(
        job_id=job.id, row_id=second.id, row_index=1, worker_id="w1", outcome=done_outcome(4)
    )

    assert stored is False
    assert cancelled.job.properties_count == 2
    job.refresh_from_db()
    assert (job.state, job.properties_count, job.count_done) == ("cancelled", 2, 1)
    assert Property.objects.filter(job=job).count() == 2
    statuses = dict(job.rows.values_list("index", "status"))
    assert statuses == {0: "done", 1: "cancelled", 2: "cancelled"}


def test_a_result_for_a_row_another_worker_reclaimed_is_discarded(user):
    job = start_running(user, simple_rows(1))
    row = claims.claim_rows(job_id=job.id, worker_id="w1", limit=1).rows[0]
    ExtractRow.objects.filter(pk=row.id).update(claimed_by="w2")

    stored = factories.record_row_result(
        job_id=job.id, row_id=row.id, row_index=0, worker_id="w1", outcome=done_outcome(2)
    )

    assert stored is False
    job.refresh_from_db()
    assert (job.count_done, job.properties_count) == (0, 0)
    assert Property.objects.count() == 0


@pytest.mark.parametrize("running", [False, True])
def test_job_cancel_is_immediate_for_queued_and_running_jobs(user, running):
    job = start_running(user, simple_rows(3)) if running else make_job(user, simple_rows(3))
    if running:
        claims.claim_rows(job_id=job.id, worker_id="w1", limit=1)

    before = timezone.now()
    outcome = lifecycle.job_cancel(job=job)
    after = timezone.now()

    assert outcome.cancelled_now is True
    assert outcome.job.state == "cancelled"
    assert before <= outcome.job.cancelled_at <= after
    assert set(job.rows.values_list("status", flat=True)) == {"cancelled"}


def test_job_cancel_twice_changes_nothing_the_second_time(user):
    job = make_job(user)
    first = lifecycle.job_cancel(job=job)

    second = lifecycle.job_cancel(job=job)

    assert (first.cancelled_now, second.cancelled_now) == (True, False)
    assert second.job.cancelled_at == first.job.cancelled_at


@pytest.mark.parametrize("state", ["done", "error"])
def test_job_cancel_leaves_a_finished_job_alone(user, state):
    job = make_job(user)
    ExtractJob.objects.filter(pk=job.id).update(state=state)
    job.refresh_from_db()

    outcome = lifecycle.job_cancel(job=job)

    assert (outcome.cancelled_now, outcome.job.state, outcome.job.cancelled_at) == (False, state, None)


def test_job_fail_keeps_done_rows_and_closes_the_rest(user):
    job = start_running(user, simple_rows(3))
    row = claims.claim_rows(job_id=job.id, worker_id="w1", limit=1).rows[0]
    factories.record_row_result(
        job_id=job.id, row_id=row.id, row_index=0, worker_id="w1", outcome=done_outcome(2)
    )

    assert lifecycle.job_fail(job_id=job.id, error="LLM authentication failed (401): check OPENAI_API_KEY")

    job.refresh_from_db()
    assert (job.state, job.error, job.properties_count) == (
        "error",
        "LLM authentication failed (401): check OPENAI_API_KEY",
        2,
    )
    assert dict(job.rows.values_list("index", "status")) == {0: "done", 1: "cancelled", 2: "cancelled"}


def test_jobs_visible_to_users_and_staff(user, other_user, staff_user):
    mine = make_job(user)
    theirs = make_job(other_user)

    assert list(access.jobs_visible_to(user)) == [mine]
    assert set(access.jobs_visible_to(staff_user)) == {mine, theirs}


def test_job_state_reads_the_state(user):
    job = make_job(user)
    assert lifecycle.job_state(job_id=job.id) == JobState.QUEUED


def test_rows_reach_the_worker_with_their_keys_in_the_order_sent(user):
    """PostgreSQL's jsonb would sort an object's keys; the transcript the LLM
    sees (and the cache key) must follow the user's order on any database."""
    row = {
        "prompt": "Book it",
        "model_response": [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"name": "book", "arguments": {"zeta": 1, "alpha": 2}}],
            }
        ],
        "model": "m",
        "zz_extra": {"b": 1, "a": 2},
    }
    job = start_running(user, [row])

    claimed = claims.claim_rows(job_id=job.id, worker_id="w1", limit=1).rows[0]

    assert list(claimed.data) == ["prompt", "model_response", "model", "zz_extra"]
    assert list(claimed.data["model_response"][0]["tool_calls"][0]["arguments"]) == ["zeta", "alpha"]
    assert claimed.data == row
    assert list(ExtractRow.objects.get(pk=claimed.id).data["zz_extra"]) == ["b", "a"]


def test_a_batch_stores_the_rows_still_ours_when_one_was_taken_over(user):
    job = start_running(user, simple_rows(3))
    first, second = claims.claim_rows(job_id=job.id, worker_id="w1", limit=2).rows
    ExtractRow.objects.filter(pk=second.id).update(claimed_by="w2")

    recorded = claims.record_row_results(
        job_id=job.id, worker_id="w1", results=[(first, done_outcome(2)), (second, done_outcome(3))]
    )

    job.refresh_from_db()
    assert (recorded.stored, recorded.job_running) == (1, True)
    assert (job.count_done, job.properties_count) == (1, 2)
    assert ExtractRow.objects.get(pk=first.id).status == "done"
    assert ExtractRow.objects.get(pk=second.id).status == "running"
    assert Property.objects.filter(row_id=first.id).count() == 2
    assert Property.objects.filter(row_id=second.id).count() == 0


def slot_view(job_id):
    """The job's grants as a worker reads them, or None unless it runs."""
    found = [job for job in grants.jobs_to_serve(only_job=job_id) if job.state == "running"]
    return found[0].slots if found else None
