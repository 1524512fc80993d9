"""Budgets hold with calls in flight: a call starts only if the budget, less
what is spent and what the calls in flight reserved, covers its own
reservation (issue 14)."""

import pytest

from jobs.models import ExtractJob, ExtractRow, Property
from jobs.services import budgets, claims, lifecycle
from tests.factories import make_job, simple_rows
from tests.test_worker import run_job


@pytest.mark.django_db(transaction=True)
def test_tokens_used_never_exceed_max_total_tokens_with_16_calls_in_flight(
    user, api, sim, no_background_worker
):
    sim.configure(latency_ms=60)
    job = make_job(user, simple_rows(240), max_workers=16, max_total_tokens=40_000, max_tokens=500)

    run_job(job, sim)

    job.refresh_from_db()
    assert job.state == "error"
    assert job.error.startswith("budget exceeded: ")
    assert job.error.endswith(f"the next call would go over it, so {240 - job.count_done} rows were not run")
    assert job.total_tokens <= 40_000
    # Calls did run side by side: the budget did not make the job serial.
    assert sim.stats()["max_in_flight"] >= 8
    # Partial results are kept, and every call that was paid for is counted.
    assert 0 < job.count_done < 240
    assert Property.objects.filter(job=job).count() == job.properties_count > 0
    assert len(sim.requests()) == job.count_done + job.count_failed
    assert len(api.get(f"/api/jobs/{job.id}/result/").json()["properties"]) == job.properties_count


@pytest.mark.django_db(transaction=True)
def test_cost_never_exceeds_max_cost_usd_with_16_calls_in_flight(user, sim, no_background_worker):
    sim.configure(latency_ms=60)
    job = make_job(
        user, simple_rows(120), model_name="gpt-4o-mini", max_workers=16, max_cost_usd=0.006, max_tokens=500
    )
    ExtractJob.objects.filter(pk=job.pk).update(price_input_per_mtok=0.15, price_output_per_mtok=0.6)

    run_job(job, sim)

    job.refresh_from_db()
    assert job.state == "error"
    assert job.error.startswith("budget exceeded: $0.00")
    assert job.cost_usd <= 0.006
    assert 0 < job.count_done < 120
    assert sim.stats()["max_in_flight"] >= 8


@pytest.mark.django_db
def test_a_claim_reserves_each_rows_prompt_and_max_tokens_for_both_asks(user):
    job = make_job(user, simple_rows(3), max_total_tokens=10**6, max_tokens=300)
    lifecycle.job_mark_running(job_id=job.id)
    claim = claims.claim_rows(job_id=job.id, worker_id="w", limit=2)

    job.refresh_from_db()
    rows = ExtractRow.objects.filter(job=job, status="running").order_by("index")
    assert [row.index for row in claim.rows] == [0, 1]
    for row in rows:
        prompt = budgets.prompt_tokens_for(job, row.data)
        assert (row.reserved_prompt_tokens, row.reserved_completion_tokens) == (2 * prompt, 600)


@pytest.mark.django_db
def test_a_claim_takes_no_row_the_budget_cannot_hold_beside_the_calls_in_flight(user):
    job = make_job(user, simple_rows(5), max_tokens=300)
    lifecycle.job_mark_running(job_id=job.id)
    reservation = budgets.reservation_for(job, simple_rows(5)[0])
    per_row = reservation.prompt_tokens + reservation.completion_tokens
    # Room for two rows' reservations and a little more.
    ExtractJob.objects.filter(pk=job.pk).update(max_total_tokens=2 * per_row + per_row // 2)

    first = claims.claim_rows(job_id=job.id, worker_id="w", limit=5)
    second = claims.claim_rows(job_id=job.id, worker_id="w", limit=5)

    assert len(first.rows) == 2
    # Nothing fits beside the two in flight, but the job goes on: they may free room.
    assert (second.rows, second.job_running, second.pending_left) == ([], True, True)
