"""Where a job stands (issue 13): a queued job's place in the queue and a
running job's LLM calls in flight, in its status on both paths, in the job
list, the admin's job list and `manage.py jobs show`."""

import io
import re
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from jobs.models import ExtractJob, WorkerSlots
from jobs.services import claims, grants, lifecycle, standing
from tests.factories import make_job

pytestmark = pytest.mark.django_db


def standing_in(body: dict) -> tuple:
    return body["queue_position"], body["calls_in_flight"]


def status(client, job) -> dict:
    seed = client.get("/extract/jobs/status", {"job_id": str(job.id)}).json()
    rest = client.get(f"/api/jobs/{job.id}/").json()
    assert standing_in(seed) == standing_in(rest)
    return seed


def queued_jobs(user, other_user, count: int) -> list[ExtractJob]:
    """Jobs of two users, each created a second after the one before."""
    jobs = [make_job(user if n % 2 == 0 else other_user) for n in range(count)]
    start = timezone.now() - timedelta(hours=1)
    for n, job in enumerate(jobs):
        ExtractJob.objects.filter(pk=job.pk).update(created_at=start + timedelta(seconds=n))
    return jobs


def running_with_grants(job: ExtractJob, **in_flight: int) -> None:
    """Workers on the job, each with this many calls in flight at its last
    heartbeat (and a grant of one more)."""
    lifecycle.job_mark_running(job_id=job.id)
    for worker_id, count in in_flight.items():
        assert (
            grants.set_slots(job_id=job.id, worker_id=worker_id, slots=count + 1, in_flight=0, wants=True)
            == count + 1
        )
        claims.renew_leases(worker_id=worker_id, in_flight={job.id: count})


def test_a_queued_job_counts_every_users_queued_jobs_ahead_of_it(api, user, other_user):
    first, _, third, _ = queued_jobs(user, other_user, 4)

    assert standing_in(status(api, first)) == (0, 0)
    assert standing_in(status(api, third)) == (2, 0)

    lifecycle.job_mark_running(job_id=first.id)

    assert standing_in(status(api, first)) == (None, 0)
    assert standing_in(status(api, third)) == (1, 0)


def test_a_running_job_counts_the_calls_in_flight_of_its_live_workers(api, user):
    job = make_job(user, max_workers=12)
    running_with_grants(job, w1=3, w2=2, w3=1)
    WorkerSlots.objects.filter(job=job, worker_id="w3").update(
        renewed_at=grants.grants_alive_since(timezone.now()) - timedelta(seconds=1)
    )  # a dead worker's grant

    assert standing_in(status(api, job)) == (None, 5)

    api.post(f"/api/jobs/{job.id}/cancel/")

    assert standing_in(status(api, job)) == (None, 0)


def test_a_new_job_knows_its_place_at_once(api, user, other_user):
    queued_jobs(user, other_user, 3)

    started = api.post(
        "/api/jobs/", {"rows": [{"prompt": "p", "model": "m", "model_response": "r"}]}, format="json"
    )

    assert standing_in(started.json()) == (3, 0)


def test_the_list_reads_each_jobs_standing(api, user, other_user):
    first, second, third = queued_jobs(user, user, 3)
    running_with_grants(first, w1=4)

    listed = api.get("/api/jobs/").json()["results"]

    assert [(job["job_id"], standing_in(job)) for job in listed] == [
        (str(third.id), (1, 0)),
        (str(second.id), (0, 0)),
        (str(first.id), (None, 4)),
    ]


def test_the_standing_read_one_by_one_agrees_with_the_lists(user, other_user):
    jobs = queued_jobs(user, other_user, 4)
    running_with_grants(jobs[1], w1=2, w2=1)
    ExtractJob.objects.filter(pk=jobs[3].pk).update(state="done")

    listed = standing.with_standing(ExtractJob.objects.order_by("created_at"))
    fresh = ExtractJob.objects.order_by("created_at")

    expected = [(0, 0), (None, 3), (1, 0), (None, 0)]
    assert [(job.queue_position, job.calls_in_flight) for job in listed] == expected
    assert [(standing.queue_position(job), standing.calls_in_flight(job)) for job in fresh] == expected


def test_the_admin_job_list_shows_the_queue_and_the_calls(client, django_user_model, user, other_user):
    admin = django_user_model.objects.create_superuser("root", password="root-password")
    client.force_login(admin)
    first, second, third = queued_jobs(user, other_user, 3)
    running_with_grants(first, w1=3)
    ExtractJob.objects.filter(pk=second.pk).update(state="done")

    page = client.get("/admin/jobs/extractjob/").content.decode()

    def cell(job) -> str:
        row = page[page.index(str(job.pk)) :]
        return re.search(r'<td class="field-queue_or_calls">([^<]*)</td>', row).group(1)

    assert "<span>Queue / calls</span>" in page
    assert [cell(first), cell(second), cell(third)] == ["3 calls", "—", "0 ahead"]


def test_jobs_show_says_where_the_job_stands(user, other_user):
    first, second = queued_jobs(user, other_user, 2)

    def shown(job) -> list[str]:
        out = io.StringIO()
        call_command("jobs", "show", str(job.id), stdout=out)
        return [line for line in out.getvalue().splitlines() if line.startswith(("  queue:", "  in flight:"))]

    assert shown(second) == ["  queue:       1 queued job ahead of it"]
    running_with_grants(first, w1=2)
    assert shown(first) == ["  in flight:   2 LLM calls"]
