"""Extraction as users rely on it, through the worker and the simulator
over HTTP: side by side, scores, sampling, the cache, structured output,
and budgets."""

import pytest

from extraction.render import render_row
from jobs.models import ExtractJob, ExtractRow, Property
from jobs.services import lifecycle
from tests.factories import job_params, make_job, pair_side_by_side, run_job, simple_rows
from tests.fixtures_simulator import user_sha256

pytestmark = pytest.mark.django_db


def test_side_by_side_properties_name_the_real_models(user, sim, airline_rows):
    pairs = pair_side_by_side(airline_rows)[:6]
    job = make_job(user, pairs, method="side_by_side")

    run_job(job.id, base_url=sim.base_url)

    job.refresh_from_db()
    assert (job.state, job.count_done) == ("done", 6)
    models = set(Property.objects.filter(job=job).values_list("model", flat=True))
    assert models == {"gpt-4o", "claude-sonnet-35"}
    assert "gpt-4o" not in sim.requests()[0]["user_preview"]


def test_scores_reach_the_llm_only_when_asked(user, sim):
    rows = simple_rows(1)
    rows[0]["score"] = {"accuracy": 0.5}
    job = make_job(user, rows, include_scores_in_prompt=True)
    hidden = make_job(user, rows)

    run_job(job.id, base_url=sim.base_url)
    run_job(hidden.id, base_url=sim.base_url)

    sent = [request["user_sha256"] for request in sim.requests()]
    assert sent == [
        user_sha256(render_row(rows[0], "single_model", include_scores=True)),
        user_sha256(render_row(rows[0], "single_model", include_scores=False)),
    ]
    assert "accuracy" in render_row(rows[0], "single_model", include_scores=True)


def test_sample_size_runs_a_deterministic_sample(user):
    rows = simple_rows(20)

    first = lifecycle.job_start(owner=user, rows=rows, params=job_params(sample_size=5))
    second = lifecycle.job_start(owner=user, rows=rows, params=job_params(sample_size=5))

    picked = list(first.rows.order_by("index").values_list("question_id", flat=True))
    assert first.count_total == 5
    assert len(set(picked)) == 5
    assert picked == list(second.rows.order_by("index").values_list("question_id", flat=True))
    assert picked == sorted(picked, key=lambda qid: int(qid[1:]))  # input order is kept


def test_a_rerun_of_identical_rows_is_answered_from_the_cache(user, sim, airline_rows):
    rows = airline_rows[:5]
    first = make_job(user, rows)
    run_job(first.id, base_url=sim.base_url)
    calls_before = len(sim.requests())

    again = make_job(user, rows)
    run_job(again.id, base_url=sim.base_url)

    again.refresh_from_db()
    assert calls_before == 5
    assert len(sim.requests()) == 5  # no new LLM call
    assert (again.state, again.cache_hits, again.count_done) == ("done", 5, 5)
    assert (again.prompt_tokens, again.completion_tokens) == (0, 0)
    assert set(ExtractRow.objects.filter(job=again).values_list("cached", flat=True)) == {True}

    def descriptions(job):
        return list(Property.objects.filter(job=job).values_list("property_description", flat=True))

    assert descriptions(again) == descriptions(first)


def test_use_cache_false_asks_the_llm_again(user, sim):
    rows = simple_rows(3)
    run_job(make_job(user, rows).id, base_url=sim.base_url)

    fresh = make_job(user, rows, use_cache=False)
    run_job(fresh.id, base_url=sim.base_url)

    fresh.refresh_from_db()
    assert len(sim.requests()) == 6
    assert fresh.cache_hits == 0


def test_a_failed_answer_is_not_cached(user, sim):
    rows = simple_rows(1, marker="[[sim:bad_json]]")
    run_job(make_job(user, rows).id, base_url=sim.base_url)
    run_job(make_job(user, rows).id, base_url=sim.base_url)

    assert len(sim.requests()) == 4  # each job asked twice (the answer is re-asked once)


def test_the_cache_key_covers_the_sampling_parameters(user, sim):
    rows = simple_rows(2)
    run_job(make_job(user, rows, temperature=0.0).id, base_url=sim.base_url)
    run_job(make_job(user, rows, temperature=0.5).id, base_url=sim.base_url)

    assert len(sim.requests()) == 4


def test_structured_output_is_asked_for_and_dropped_where_unsupported(user, sim):
    run_job(make_job(user, simple_rows(1)).id, base_url=sim.base_url)
    sim.configure(structured_output=False)
    fallback = make_job(user, simple_rows(1, marker="other"))

    run_job(fallback.id, base_url=sim.base_url)

    assert [request["response_format_type"] for request in sim.requests()] == [
        "json_schema",
        "json_schema",
        None,
    ]
    fallback.refresh_from_db()
    assert (fallback.state, fallback.count_done) == ("done", 1)


def described(job) -> list[tuple[int, str]]:
    return list(
        job.properties.order_by("row_index", "position").values_list("row_index", "property_description")
    )


def test_free_text_answers_are_parsed_when_structured_output_is_off(user, sim, airline_rows):
    structured = make_job(user, airline_rows[:3])
    run_job(structured.id, base_url=sim.base_url)
    job = make_job(user, airline_rows[:3], use_cache=False)

    run_job(job.id, base_url=sim.base_url, structured_output=False)

    job.refresh_from_db()
    assert [request["response_format_type"] for request in sim.requests()] == ["json_schema"] * 3 + [None] * 3
    assert (job.count_done, job.count_failed) == (3, 0)
    # The simulator describes a transcript alike in prose and as an object.
    assert described(job) == described(structured)
    assert job.properties_count == len(described(job)) >= 9


def test_a_token_budget_stops_the_job_before_the_call_that_would_exceed_it(user, sim, airline_rows):
    rows = airline_rows[:10]
    job = make_job(user, rows, max_workers=1, max_tokens=1500, max_total_tokens=20_000)

    run_job(job.id, base_url=sim.base_url)

    job.refresh_from_db()
    assert job.state == "error"
    assert job.error.startswith("budget exceeded: ")
    assert "of max_total_tokens 20,000 tokens used" in job.error
    assert 0 < job.count_done < 10
    assert job.total_tokens <= 20_000
    assert len(sim.requests()) == job.count_done
    assert job.properties_count == Property.objects.filter(job=job).count() > 0
    statuses = list(ExtractRow.objects.filter(job=job).order_by("index").values_list("status", flat=True))
    assert statuses == ["done"] * job.count_done + ["cancelled"] * (10 - job.count_done)


def test_a_spent_cost_budget_makes_no_call(user, sim):
    job = make_job(user, simple_rows(3), model_name="gpt-4o-mini", max_cost_usd=0.0)
    job.refresh_from_db()
    assert (job.price_input_per_mtok, job.price_output_per_mtok) == (0.15, 0.60)

    run_job(job.id, base_url=sim.base_url)

    job.refresh_from_db()
    assert job.state == "error"
    assert job.error == (
        "budget exceeded: $0.0000 of max_cost_usd $0.0000 spent; the next call would go over it, "
        "so 3 rows were not run"
    )
    assert sim.requests() == []


def test_cost_is_estimated_from_tokens_and_the_frozen_prices(user, sim):
    job = make_job(user, simple_rows(2), model_name="gpt-4o-mini")

    run_job(job.id, base_url=sim.base_url)

    job.refresh_from_db()
    expected = (job.prompt_tokens * 0.15 + job.completion_tokens * 0.60) / 1_000_000
    assert job.cost_usd == pytest.approx(expected)
    assert job.cost_usd > 0
    assert ExtractJob(model_name="unknown").cost_usd is None
