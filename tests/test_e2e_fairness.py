"""Every job progresses (issue 13): real qcluster processes serving several
jobs of several users at once, against the LLM simulator over HTTP."""

import time

import pytest

from jobs.models import ExtractJob, ExtractRow
from tests.conftest import token_client
from tests.factories import simple_rows
from tests.test_e2e import status, wait_for
from tests.test_e2e_recovery import on_postgres, workers_of
from tests.test_worker import most_at_once, requests_of

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def start(api, rows, **params) -> str:
    response = api.post("/extract/jobs/start", {"rows": rows, **params}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()["job_id"]


def apis_of(django_user_model, count: int) -> list:
    return [
        token_client(django_user_model.objects.create_user(f"user{n}", password="pw")) for n in range(count)
    ]


def test_a_small_job_started_beside_a_big_one_finishes_while_the_big_one_runs(api, other_api, qcluster, sim):
    sim.configure(latency_ms=200)
    big = start(api, simple_rows(2400, marker="tag-big"), max_workers=64)
    wait_for(lambda: sim.stats()["in_flight"] >= 32, timeout=60)

    small = start(other_api, simple_rows(16, marker="tag-small"), max_workers=8)
    final = wait_for(lambda: (body := status(other_api, small))["state"] == "done" and body, timeout=120)
    big_then = status(api, big)
    api.post("/extract/jobs/cancel", {"job_id": big}, format="json")

    assert (final["count_done"], big_then["state"]) == (16, "running")
    assert big_then["count_done"] < 2400


def test_six_users_jobs_all_have_rows_done_before_any_of_them_ends(django_user_model, qcluster, sim):
    # Answers wait until all six jobs are started: however slow the starts,
    # no job can finish before the last one exists.
    sim.configure(latency_ms=200, paused=True)
    apis = apis_of(django_user_model, 6)
    jobs = [start(api, simple_rows(150, marker=f"tag-{n}"), max_workers=16) for n, api in enumerate(apis)]
    sim.configure(paused=False)

    wait_for(
        lambda: not ExtractJob.objects.filter(pk__in=jobs, state__in=("queued", "running")).exists(),
        timeout=240,
    )

    finished = ExtractJob.objects.filter(pk__in=jobs).order_by("finished_at")
    assert [job.count_done for job in finished] == [150] * 6
    first_end = finished[0].finished_at
    for job_id in jobs:
        first_row_done = ExtractRow.objects.filter(job_id=job_id).order_by("finished_at")[0].finished_at
        assert first_row_done < first_end


def test_cancelling_one_of_three_jobs_on_one_worker_process_leaves_the_others_calls_alone(
    api, start_worker, sim
):
    sim.configure(paused=True)
    start_worker("single", Q_WORKERS="1")
    jobs = {tag: start(api, simple_rows(8, marker=tag), max_workers=4) for tag in ("tag-a", "tag-b", "tag-c")}
    wait_for(lambda: sim.stats()["in_flight"] == 12, timeout=60)

    cancelled_at = time.time()
    response = api.post("/extract/jobs/cancel", {"job_id": jobs["tag-b"]}, format="json")
    assert response.json()["state"] == "cancelled"
    wait_for(lambda: all(r["outcome"] is not None for r in requests_of(sim, "tag-b")), timeout=60)
    others_in_flight = sum(r["outcome"] is None for tag in ("tag-a", "tag-c") for r in requests_of(sim, tag))
    sim.configure(paused=False)
    for tag in ("tag-a", "tag-c"):
        wait_for(lambda tag=tag: status(api, jobs[tag])["state"] == "done", timeout=120)

    cancelled = requests_of(sim, "tag-b")
    assert others_in_flight == 8
    assert {r["outcome"] for r in cancelled} == {"aborted"}
    assert max(r["started_at"] for r in cancelled) < cancelled_at + 0.25  # none started after the cancel
    for tag in ("tag-a", "tag-c"):
        assert "aborted" not in {r["outcome"] for r in requests_of(sim, tag)}
        assert status(api, jobs[tag])["count_done"] == 8


@on_postgres
def test_max_workers_holds_with_two_clusters_serving_several_jobs(
    api, other_api, start_worker, sim, settings
):
    settings.STRINGSIGHT_WORKER_CONCURRENCY = 4
    sim.configure(latency_ms=150, jitter_ms=50)
    for name in ("alpha", "beta"):
        start_worker(name, Q_WORKERS="2", STRINGSIGHT_WORKER_CONCURRENCY="4")
    capped = start(api, simple_rows(400, marker="tag-capped"), max_workers=6)
    other = start(other_api, simple_rows(400, marker="tag-other"), max_workers=16)

    for job_id, client in ((capped, api), (other, other_api)):
        wait_for(lambda job_id=job_id, client=client: status(client, job_id)["state"] == "done", timeout=180)

    assert most_at_once(requests_of(sim, "tag-capped")) <= 6
    assert (
        most_at_once(requests_of(sim, "tag-capped") + requests_of(sim, "tag-other")) <= 16
    )  # 4 processes of 4
    assert workers_of(capped) | workers_of(other) == {"alpha", "beta"}
