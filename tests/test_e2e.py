"""End to end: the API in this process, a real `qcluster` process and the
LLM simulator over HTTP, on whichever database the suite runs on."""

import time

import pytest
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
    sim.configure(latency_ms=100, jitter_ms=50)
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


def test_a_cancel_mid_run_is_immediate_and_final(api, qcluster, sim, airline_rows):
    sim.configure(latency_ms=600, jitter_ms=200)
    job_id = api.post("/extract/jobs/start", {"rows": airline_rows, "max_workers": 8}, format="json").json()[
        "job_id"
    ]
    wait_for(lambda: status(api, job_id)["count_done"] >= 8, timeout=60)

    cancel_sent = time.time()
    response = api.post("/extract/jobs/cancel", {"job_id": job_id}, format="json")

    assert response.status_code == 200
    body = response.json()
    assert (body["state"], body["message"]) == ("cancelled", "job cancelled")
    frozen = body["properties_count"]
    assert frozen > 0
    time.sleep(1.2)
    after = status(api, job_id)
    assert (after["state"], after["properties_count"]) == ("cancelled", frozen)
    result = api.get("/extract/jobs/result", {"job_id": job_id}).json()
    assert (result["cancelled"], result["count"]) == (True, frozen)
    assert Property.objects.filter(job_id=job_id).count() == frozen

    requests = sim.requests()
    late = [r for r in requests if r["started_at"] > cancel_sent + 0.25]
    still_open = [r for r in requests if r["ended_at"] is None or r["ended_at"] > cancel_sent + 1.0]
    assert late == []
    assert still_open == []
    assert any(r["outcome"] == "aborted" for r in requests), "calls in flight at the cancel are aborted"
    statuses = set(ExtractRow.objects.filter(job_id=job_id).values_list("status", flat=True))
    assert statuses == {"done", "cancelled"}
    assert ExtractRow.objects.filter(job_id=job_id, status="done").count() == after["count_done"]


def test_a_queued_job_cancelled_before_any_worker_runs_makes_no_llm_call(
    api, worker_process, sim, airline_rows
):
    worker_process.stop()
    job_id = api.post("/extract/jobs/start", {"rows": airline_rows[:5]}, format="json").json()["job_id"]
    assert OrmQ.objects.count() == 1

    cancelled = api.post("/extract/jobs/cancel", {"job_id": job_id}, format="json").json()
    worker_process.start()
    task = wait_for(lambda: Task.objects.filter(group=job_id).first(), timeout=30)

    assert (cancelled["state"], cancelled["properties_count"]) == ("cancelled", 0)
    assert task.success is True
    assert task.result == "job is not running: nothing to do"
    assert status(api, job_id)["state"] == "cancelled"
    assert sim.requests() == []
