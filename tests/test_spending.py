"""Spending is bounded by the operator: allowed models, a default job
budget and a per-user daily budget checked at start and kept while a job
runs (issue 19)."""

import pytest

from jobs.models import ExtractJob, ExtractRow
from jobs.services import budgets
from tests.factories import make_job, run_job, simple_rows

pytestmark = pytest.mark.django_db


def start(client, **body):
    return client.post("/extract/jobs/start", {"rows": simple_rows(1), **body}, format="json")


def test_by_default_only_priced_models_and_the_default_model_are_allowed(api, settings):
    assert sorted({*settings.STRINGSIGHT_PRICES, "gpt-4o-mini"}) == settings.STRINGSIGHT_ALLOWED_MODELS

    refused = start(api, model_name="o1-pro")

    assert refused.status_code == 400
    assert refused.json()["field"] == "model_name"
    assert refused.json()["detail"] == (
        "model_name: 'o1-pro' is not an allowed model; allowed: "
        f"{', '.join(settings.STRINGSIGHT_ALLOWED_MODELS)} (STRINGSIGHT_ALLOWED_MODELS)"
    )
    assert start(api, model_name="gpt-4o").status_code == 201
    assert start(api).status_code == 201  # the default model
    assert ExtractJob.objects.count() == 2


def test_a_star_allows_any_model_and_a_list_only_its_own(api, settings):
    settings.STRINGSIGHT_ALLOWED_MODELS = ["*"]
    assert start(api, model_name="my-local-model").status_code == 201

    settings.STRINGSIGHT_ALLOWED_MODELS = ["llama3"]
    assert start(api, model_name="llama3").status_code == 201
    assert start(api, model_name="gpt-4o").status_code == 400
    assert start(api).json()["field"] == "model_name"  # the default model is not on the list


def test_a_job_without_a_budget_gets_the_default_one(api, settings):
    assert settings.STRINGSIGHT_DEFAULT_MAX_COST_USD is None
    assert start(api).json()["budget"]["max_cost_usd"] is None

    settings.STRINGSIGHT_DEFAULT_MAX_COST_USD = 2.5
    settings.STRINGSIGHT_ALLOWED_MODELS = ["*"]

    assert start(api).json()["budget"]["max_cost_usd"] == 2.5
    assert start(api, max_cost_usd=0.75).json()["budget"]["max_cost_usd"] == 0.75
    # A model without a price cannot keep a cost budget: it has none.
    assert start(api, model_name="my-local-model").json()["budget"]["max_cost_usd"] is None


def test_a_start_the_daily_budget_cannot_pay_for_answers_429_naming_it(api, other_api, user, settings):
    settings.STRINGSIGHT_USER_DAILY_BUDGET_USD = 0.002
    first = start(api, max_tokens=1000)  # may cost up to $0.0007: its prompt and 1,000 answer tokens
    earlier = make_job(user, model_name="gpt-4o-mini", max_tokens=1)
    ExtractJob.objects.filter(pk=earlier.pk).update(
        state="done",
        prompt_tokens=4000,
        completion_tokens=1000,
        price_input_per_mtok=0.15,
        price_output_per_mtok=0.6,
    )  # $0.0012 spent

    refused = start(api, max_tokens=1000)

    assert first.status_code == 201
    assert refused.status_code == 429
    detail = refused.json()["detail"]
    assert detail.startswith("daily budget exceeded: $0.0012 spent today and $0.0007 held by running jobs")
    assert detail.endswith("more than the $0.0020 a user may spend a day (STRINGSIGHT_USER_DAILY_BUDGET_USD)")
    assert refused.json()["code"] == "daily_budget_exceeded"
    assert start(other_api, max_tokens=1000).status_code == 201  # a budget per user
    assert ExtractJob.objects.filter(owner=user).count() == 2


def test_with_a_daily_budget_a_model_without_a_price_cannot_start(api, settings):
    settings.STRINGSIGHT_USER_DAILY_BUDGET_USD = 1.0
    settings.STRINGSIGHT_ALLOWED_MODELS = ["*"]

    refused = start(api, model_name="my-local-model")

    assert refused.status_code == 429
    assert "STRINGSIGHT_USER_DAILY_BUDGET_USD" in refused.json()["detail"]


def test_yesterdays_spend_does_not_count(api, user, settings):
    from datetime import timedelta

    from django.utils import timezone

    old = make_job(user, model_name="gpt-4o-mini")
    settings.STRINGSIGHT_USER_DAILY_BUDGET_USD = 0.002
    ExtractJob.objects.filter(pk=old.pk).update(
        state="done",
        created_at=timezone.now() - timedelta(days=1, minutes=1),
        prompt_tokens=10**6,
        price_input_per_mtok=0.15,
        price_output_per_mtok=0.6,
    )

    assert start(api, max_tokens=1000).status_code == 201


def another_job_spent_today(user) -> None:
    """A done job of the user's that spent $0.0084 today."""
    other = make_job(user, simple_rows(1), model_name="gpt-4o-mini")
    ExtractJob.objects.filter(pk=other.pk).update(
        state="done", prompt_tokens=56_000, price_input_per_mtok=0.15, price_output_per_mtok=0.6
    )


@pytest.mark.django_db(transaction=True)
def test_a_running_job_stops_at_the_daily_budget(user, sim, settings, no_background_worker):
    settings.STRINGSIGHT_USER_DAILY_BUDGET_USD = 0.01
    job = make_job(user, simple_rows(20), model_name="gpt-4o-mini", max_tokens=200, max_workers=2)
    # Another of the user's jobs spends all but a few calls' worth meanwhile
    # (a call reserves its prompt and 2 x 200 answer tokens, about $0.00026).
    another_job_spent_today(user)  # $0.0084 of $0.01

    run_job(job.id, base_url=sim.base_url)

    job.refresh_from_db()
    assert job.state == "error"
    assert job.error.startswith("daily budget exceeded: $0.0")
    assert (
        "of STRINGSIGHT_USER_DAILY_BUDGET_USD $0.0100 spent today; the next call would go over it"
        in job.error
    )
    done = ExtractRow.objects.filter(job=job, status="done").count()
    assert 0 < done < 20
    assert len(sim.requests()) == done
    assert budgets.spent_today(owner_id=user.pk) <= 0.01


def test_a_single_extraction_the_daily_budget_cannot_pay_for_answers_429(api, settings):
    from tests.test_extract_single import extract, frontend_row

    settings.STRINGSIGHT_USER_DAILY_BUDGET_USD = 0.000001

    refused = extract(api, frontend_row())

    assert refused.status_code == 429
    assert refused.json()["code"] == "daily_budget_exceeded"
    assert refused.json()["detail"].endswith("(STRINGSIGHT_USER_DAILY_BUDGET_USD)")
    assert ExtractJob.objects.count() == 0


def stopped_yesterday(job, **fields) -> None:
    """The job as if started yesterday and stopped then (by a cancel, or by
    the daily budget), with `fields` spent."""
    from datetime import timedelta

    from django.utils import timezone

    ExtractJob.objects.filter(pk=job.pk).update(
        state="error", created_at=timezone.now() - timedelta(days=1, minutes=1), **fields
    )
    ExtractRow.objects.filter(job=job).update(status="cancelled")


def test_a_resume_the_daily_budget_cannot_pay_for_answers_429_naming_it(api, user, settings):
    job = make_job(user, simple_rows(20), model_name="gpt-4o-mini", max_tokens=1000)
    stopped_yesterday(job)
    settings.STRINGSIGHT_USER_DAILY_BUDGET_USD = 0.002  # 20 rows of up to 1,000 answer tokens: $0.012

    refused = api.post(f"/api/jobs/{job.pk}/resume/", {}, format="json")

    assert refused.status_code == 429
    assert refused.json()["code"] == "daily_budget_exceeded"
    assert refused.json()["detail"].endswith("(STRINGSIGHT_USER_DAILY_BUDGET_USD)")
    job.refresh_from_db()
    assert job.state == "error"
    assert set(ExtractRow.objects.filter(job=job).values_list("status", flat=True)) == {"cancelled"}


@pytest.mark.django_db(transaction=True)
def test_a_job_resumed_on_a_later_day_stops_at_that_days_budget(user, sim, settings, no_background_worker):
    from jobs.services import lifecycle

    settings.STRINGSIGHT_USER_DAILY_BUDGET_USD = 0.01
    job = make_job(user, simple_rows(20), model_name="gpt-4o-mini", max_tokens=200, max_workers=2)
    stopped_yesterday(job, prompt_tokens=10**6)  # $0.15 spent yesterday: not today's
    lifecycle.job_resume(job=job)
    another_job_spent_today(user)  # $0.0084 of $0.01

    run_job(job.id, base_url=sim.base_url)

    job.refresh_from_db()
    assert job.state == "error"
    assert job.error.startswith("daily budget exceeded: $0.0")
    done = ExtractRow.objects.filter(job=job, status="done").count()
    assert 0 < done < 20
    assert budgets.spent_today(owner_id=user.pk) <= 0.01


def test_a_claim_counts_the_calls_in_flight_of_the_owners_other_jobs(user, settings):
    from jobs.services import claims, lifecycle

    first = make_job(user, simple_rows(20), model_name="gpt-4o-mini", max_tokens=1000)
    second = make_job(user, simple_rows(20), model_name="gpt-4o-mini", max_tokens=1000)
    for job in (first, second):
        lifecycle.job_mark_running(job_id=job.id)
    settings.STRINGSIGHT_USER_DAILY_BUDGET_USD = 0.01
    # A call reserves its prompt and 2 x 1,000 answer tokens, about $0.0012:
    # the budget holds eight calls in flight, whichever job makes them.
    held = claims.claim_rows(job_id=first.id, worker_id="w1", limit=20).rows
    more = claims.claim_rows(job_id=second.id, worker_id="w2", limit=20).rows

    assert (len(held), len(more)) == (8, 0)
    second.refresh_from_db()
    assert second.state == "error"
    assert second.error.startswith(
        "daily budget exceeded: $0.0000 of STRINGSIGHT_USER_DAILY_BUDGET_USD $0.0100 spent today and "
        "$0.0097 held by your other jobs' calls in flight; the next call would go over it"
    )
