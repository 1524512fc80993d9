"""End to end: the API in this process, a real `qcluster` process and the
LLM simulator over HTTP, on whichever database the suite runs on."""

import time

import pytest
from django.utils import timezone
from django_q.models import OrmQ, Task

from jobs.models import ExtractRow, Property

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def status(api, job_id) -> dict:
    response = api.get("/extract/jobs/status", {"job_id": job_id})
    assert response.status_code == 200
    return response.json()


def test_a_job_runs_to_done_with_every_rows_properties(api, qcluster, sim, airline_rows):
    # 40 rows, 4 at a time, of 300 ms: the job runs for 3 s, which polls
    # every 50 ms see climbing.
    sim.configure(latency_ms=300, jitter_ms=100)
    rows = airline_rows[:40]
    job_id = api.post("/extract/jobs/start", {"rows": rows, "max_workers": 4}, format="json").json()["job_id"]

    seen = []

    def finished():
        body = status(api, job_id)
        seen.append(body["count_done"])
        return body if body["state"] not in ("queued", "running") else None

    final = wait_for(finished, timeout=60)

    assert (final["state"], final["count_done"], final["count_total"], final["progress"]) == (
        "done",
        40,
        40,
        1.0,
    )
    assert any(0 < count < 40 for count in seen), "count_done should climb while the job runs"
    assert seen == sorted(seen)
    result = api.get("/extract/jobs/result", {"job_id": job_id}).json()
    assert (result["cancelled"], result["count"]) == (False, final["properties_count"])
    assert result["count"] == Property.objects.filter(job_id=job_id).count()
    assert {p["row_index"] for p in result["properties"]} == set(range(40))
    assert {p["model"] for p in result["properties"]} == {row["model"] for row in rows}
    assert len(sim.requests()) == 40


def serve_jobs_task(*, since):
    """A worker task that ended after `since` (not one an earlier test's
    worker finished late)."""
    return Task.objects.filter(func="jobs.tasks.serve_jobs", stopped__gte=since).first()


def with_fast_answers(rows: list[dict], fast: int) -> list[dict]:
    """The first `fast` rows answered in 300 ms; the others take the
    simulator's latency."""
    return [
        {**row, "prompt": f"{row['prompt']} [[sim:latency=300]]"} if index < fast else row
        for index, row in enumerate(rows)
    ]


def test_a_cancel_mid_run_is_immediate_and_final(api, qcluster, sim, airline_rows):
    # Sixteen rows answered quickly, then calls that take a minute: with the
    # eight slots busy with those, no call ends by itself (so none starts in
    # its place) and only the cancel's abort can end them. How soon is
    # benchmark #3's figure.
    sim.configure(latency_ms=60_000)
    rows = with_fast_answers(airline_rows, 16)
    started = timezone.now()
    job_id = api.post("/extract/jobs/start", {"rows": rows, "max_workers": 8}, format="json").json()["job_id"]
    wait_for(lambda: status(api, job_id)["count_done"] == 16 and sim.stats()["in_flight"] == 8, timeout=60)

    cancel_sent = time.time()
    response = api.post("/extract/jobs/cancel", {"job_id": job_id}, format="json")

    assert response.status_code == 200
    body = response.json()
    assert (body["state"], body["message"]) == ("cancelled", "job cancelled")
    frozen = body["properties_count"]
    assert frozen > 0
    # The worker aborts the job's calls; with no other job it then ends its
    # task. Nothing is stored after.
    task = wait_for(lambda: serve_jobs_task(since=started), timeout=30)
    requests = wait_for(lambda: (log := sim.requests()) and all(r["ended_at"] for r in log) and log, 30)
    assert task.success is True
    after = status(api, job_id)
    assert (after["state"], after["count_done"], after["properties_count"]) == ("cancelled", 16, frozen)
    result = api.get("/extract/jobs/result", {"job_id": job_id}).json()
    assert (result["cancelled"], result["count"]) == (True, frozen)
    assert Property.objects.filter(job_id=job_id).count() == frozen

    assert [r for r in requests if r["started_at"] > cancel_sent] == []
    open_at_cancel = [r for r in requests if r["ended_at"] > cancel_sent]
    assert len(open_at_cancel) == 8
    assert {r["outcome"] for r in open_at_cancel} == {"aborted"}
    assert max(r["ended_at"] - r["started_at"] for r in open_at_cancel) < 30  # not their minute
    statuses = set(ExtractRow.objects.filter(job_id=job_id).values_list("status", flat=True))
    assert statuses == {"done", "cancelled"}
    assert ExtractRow.objects.filter(job_id=job_id, status="done").count() == 16


def test_a_queued_job_cancelled_before_any_worker_runs_makes_no_llm_call(
    api, worker_process, sim, airline_rows
):
    worker_process.stop()
    job_id = api.post("/extract/jobs/start", {"rows": airline_rows[:5]}, format="json").json()["job_id"]
    assert OrmQ.objects.count() == 1

    cancelled = api.post("/extract/jobs/cancel", {"job_id": job_id}, format="json").json()
    restarted = timezone.now()
    worker_process.start()
    task = wait_for(lambda: serve_jobs_task(since=restarted), timeout=30)

    assert (cancelled["state"], cancelled["properties_count"]) == ("cancelled", 0)
    assert task.success is True
    assert task.result == "recorded 0 rows; no job has rows left to claim"
    assert status(api, job_id)["state"] == "cancelled"
    assert sim.requests() == []
