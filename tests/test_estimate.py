"""What a job would cost, before it is started (issue 14): no LLM call, the
start's validation, and prompt tokens as the LLM counts them."""

import io
import json

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from extraction.render import render_row
from extraction.tokens import prompt_counter
from jobs.models import ExtractJob
from tests.factories import simple_rows
from tests.test_worker import run_job

pytestmark = pytest.mark.django_db


def estimate(client, body, path="/api/jobs/estimate/"):
    return client.post(path, body, format="json")


def test_an_estimate_counts_rows_calls_tokens_and_cost_and_makes_no_llm_call(api, sim, airline_rows):
    body = {"rows": airline_rows[:10], "model_name": "gpt-4o-mini", "max_tokens": 1000}

    response = estimate(api, body)

    assert response.status_code == 200
    answer = response.json()
    o200k = prompt_counter("gpt-4o-mini")
    assert o200k.exact
    assert answer["rows"] == answer["calls"] == 10
    assert answer["cached_rows"] == 0
    assert answer["completion_tokens"] == {"expected": None, "max": 10_000}
    low = answer["prompt_tokens"] * 0.15 / 1e6
    assert answer["cost_usd"] == {
        "low": round(low, 6),
        "expected": None,
        "high": round(low + 10_000 * 0.6 / 1e6, 6),
    }
    assert answer["duration_s"] == {"expected": None}  # no calls of the model seen yet
    # Counted with o200k_base: each transcript's tokens, and a few per message.
    assert answer["prompt_tokens"] > sum(
        o200k.text(render_row(row, "single_model")) for row in airline_rows[:10]
    )
    assert sim.requests() == []
    assert ExtractJob.objects.count() == 0
    assert estimate(api, body, "/extract/jobs/estimate").json() == answer


def test_a_sample_and_the_cache_are_counted(api, user, sim, settings, monkeypatch):
    # The cache is per endpoint: the workers' and the estimate's are the simulator.
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    settings.STRINGSIGHT_ALLOWED_MODELS = ["*"]
    body = {"rows": simple_rows(6), "model_name": "sim-model", "max_tokens": 300}
    started = api.post("/api/jobs/", body, format="json")
    run_job(ExtractJob.objects.get(pk=started.json()["job_id"]), sim)

    again = estimate(api, {**body, "rows": simple_rows(8)}).json()
    sampled = estimate(api, {**body, "rows": simple_rows(8), "sample_size": 3}).json()
    uncached = estimate(api, {**body, "rows": simple_rows(8), "use_cache": False}).json()

    assert (again["rows"], again["cached_rows"], again["calls"]) == (8, 6, 2)
    assert again["completion_tokens"]["max"] == 600
    assert again["cost_usd"] == {"low": None, "expected": None, "high": None}  # no price for sim-model
    # The model's answers so far give the expected length and duration.
    assert again["completion_tokens"]["expected"] > 0
    assert again["duration_s"]["expected"] > 0
    assert sampled["rows"] == 3
    assert (uncached["cached_rows"], uncached["calls"]) == (0, 8)


def test_the_estimated_prompt_tokens_are_what_the_llm_counted(api, user, sim, settings, airline_rows):
    # A model without a known encoding is counted at four characters a
    # token, as the simulator counts; the estimate adds each message's
    # framing, so it is a little above, never below.
    settings.STRINGSIGHT_ALLOWED_MODELS = ["*"]
    body = {"rows": airline_rows[:20], "model_name": "sim-model", "use_cache": False}
    estimated = estimate(api, body).json()["prompt_tokens"]

    job = ExtractJob.objects.get(pk=api.post("/api/jobs/", body, format="json").json()["job_id"])
    run_job(job, sim)

    job.refresh_from_db()
    assert job.count_done == 20
    assert job.prompt_tokens <= estimated <= job.prompt_tokens * 1.01


BAD_BODIES = [
    {},
    {"rows": []},
    {"rows": [{"prompt": "no answer"}]},
    {"rows": simple_rows(1), "max_tokens": 10**9},
    {"rows": simple_rows(1), "model_name": "o1-pro"},
    {"rows": simple_rows(1), "temperature": "hot"},
    {"rows": simple_rows(1), "system_prompt": "no-such-prompt-name"},
    {"rows": simple_rows(1), "max_cost_usd": 1, "model_name": "my-model"},
    [1, 2],
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_an_estimate_refuses_what_a_start_refuses_with_the_same_answer(api, sim, body):
    started = api.post("/api/jobs/", body, format="json")
    estimated = estimate(api, body)

    assert 400 <= estimated.status_code < 500
    assert (estimated.status_code, estimated.json()) == (started.status_code, started.json())
    assert sim.requests() == []


def test_an_estimate_needs_the_same_credentials_as_a_start(db):
    response = APIClient().post("/api/jobs/estimate/", {"rows": simple_rows(1)}, format="json")

    assert response.status_code == 401


def test_extract_estimate_prints_the_estimate_and_starts_nothing(tmp_path, sim, user, settings):
    settings.STRINGSIGHT_ALLOWED_MODELS = ["*"]
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps(row) for row in simple_rows(4)))
    out = io.StringIO()

    call_command("extract", str(source), "--estimate", "--model", "gpt-4o-mini", stdout=out)

    text = out.getvalue()
    assert text.startswith("Estimate (no job started, no LLM call made): 4 rows\n")
    assert "  calls:              4 (0 rows answered from the cache)\n" in text
    assert "  duration:           — (no recent calls of the model to go by)" in text
    assert ExtractJob.objects.count() == 0
    assert sim.requests() == []
