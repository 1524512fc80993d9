"""The LLM call's retry rules, as plain functions and over HTTP."""

import asyncio
import email.utils
import json
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from openai._utils._json import openapi_dumps

from extraction.extract import ExtractionSpec, build_messages
from extraction.llm import (
    CallSettings,
    LLMCallError,
    backoff_seconds,
    complete,
    request_arguments,
    request_body,
    retry_after_seconds,
)
from extraction.prompts import resolve_system_prompt, response_format

CALL = CallSettings(
    model="sim-model", temperature=0.0, top_p=1.0, max_tokens=500, retry_base=1.0, retry_max=8.0
)
DEMO_PATH = Path(__file__).parent / "data" / "airline_data_demo.jsonl"
MESSAGES = [{"role": "system", "content": "List properties."}, {"role": "user", "content": "hello"}]


def with_headers(**headers):
    return SimpleNamespace(
        response=SimpleNamespace(headers={k.replace("_", "-"): v for k, v in headers.items()})
    )


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry_after": "3"}, 3.0),
        ({"retry_after_ms": "250"}, 0.25),
        ({"retry_after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_seconds_and_milliseconds(headers, seconds):
    assert retry_after_seconds(with_headers(**headers)) == seconds


def test_retry_after_reads_an_http_date():
    moment = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after_seconds(with_headers(retry_after=moment)) <= 30


def test_backoff_is_full_jitter_under_an_exponential_cap():
    random.seed(7)
    waits = [backoff_seconds(3, None, CALL) for _ in range(500)]
    assert 0 <= min(waits) < 0.2
    assert 3.8 < max(waits) <= 4.0  # base * 2 ** (attempt - 1)


def test_backoff_waits_at_least_retry_after_but_never_past_the_cap():
    assert backoff_seconds(1, 5.0, CALL) >= 5.0
    assert backoff_seconds(1, 120.0, CALL) == 8.0


def call(sim, **overrides):
    settings = CallSettings(**{**vars(CALL), "retry_base": 0.01, "retry_max": 0.05, **overrides})
    client = openai.AsyncOpenAI(api_key="sim-test-key-0123", base_url=sim.base_url, max_retries=0)

    async def go():
        try:
            return await complete(client, MESSAGES, settings)
        finally:
            await client.close()

    return asyncio.run(go())


def test_complete_sends_parameters_exactly_and_reports_usage(sim):
    completion = call(sim, temperature=0.0, top_p=0.25, max_tokens=777)

    assert completion.attempts == 1
    # The simulator counts a token per four characters, rounded up.
    assert completion.prompt_tokens == math.ceil(sum(len(m["content"]) for m in MESSAGES) / 4)
    assert completion.completion_tokens == math.ceil(len(completion.text) / 4)
    request = sim.requests()[0]
    assert (request["temperature"], request["top_p"], request["max_tokens"]) == (0.0, 0.25, 777)


def test_rate_limit_refusals_spend_no_attempt_but_are_bounded(sim):
    sim.configure(rate_429=1.0, retry_after=0)

    with pytest.raises(LLMCallError) as caught:
        call(sim, max_attempts=2, rate_limit_attempts=5)

    assert caught.value.fatal_for_job is False
    assert caught.value.attempts == 5
    assert str(caught.value) == (
        "LLM error 429: Rate limit reached for requests (simulated); "
        "gave up after 5 answers refused for the endpoint's rate limit"
    )
    assert len(sim.requests()) == 5


def test_a_call_refused_for_the_rate_more_often_than_its_attempts_still_succeeds(sim):
    settings = CallSettings(**{**vars(CALL), "retry_base": 0.01, "retry_max": 0.05, "max_attempts": 2})
    messages = [MESSAGES[0], {"role": "user", "content": "hello [[sim:429x3]]"}]

    async def go():
        client = openai.AsyncOpenAI(api_key="sim-test-key-0123", base_url=sim.base_url, max_retries=0)
        try:
            return await complete(client, messages, settings)
        finally:
            await client.close()

    completion = asyncio.run(go())

    assert completion.attempts == 4
    assert [r["outcome"] for r in sim.requests()] == ["rate_limited"] * 3 + ["ok"]


@pytest.mark.parametrize(
    ("configure", "overrides", "message"),
    [
        (
            {"api_key": "other"},
            {},
            "the LLM provider refused the API key (401): Incorrect API key provided; check OPENAI_API_KEY",
        ),
        (
            {},
            {"model": "no-such-model"},
            "the LLM provider has no model 'no-such-model' (404): The model `no-such-model` does not exist "
            "or you do not have access to it; check model_name and OPENAI_BASE_URL",
        ),
    ],
)
def test_complete_fails_the_job_at_once_on_credentials_and_unknown_models(sim, configure, overrides, message):
    sim.configure(**configure)

    with pytest.raises(LLMCallError) as caught:
        call(sim, **overrides)

    assert (caught.value.fatal_for_job, caught.value.attempts, str(caught.value)) == (True, 1, message)
    assert len(sim.requests()) == 1


def test_complete_reports_a_refusal_as_a_row_failure(sim):
    sim.configure(rate_refusal=1.0)

    with pytest.raises(LLMCallError) as caught:
        call(sim)

    assert caught.value.fatal_for_job is False
    assert str(caught.value).startswith("the LLM refused: ")


def test_the_request_body_is_the_json_the_sdk_itself_would_send_for_the_demo_rows():
    call = CallSettings(**{**vars(CALL), "response_format": response_format("single_model")})
    spec = ExtractionSpec("single_model", resolve_system_prompt("default", "single_model"), call)

    for line in DEMO_PATH.read_text(encoding="utf-8").splitlines():
        messages = build_messages(json.loads(line), spec)
        assert request_body(messages, call) == openapi_dumps(request_arguments(messages, call))


def test_the_request_body_holds_what_orjson_refuses_as_the_sdk_would():
    messages = [{"role": "user", "content": "beyond 64 bits:", "n": 10**30}]

    assert request_body(messages, CALL) == openapi_dumps(request_arguments(messages, CALL))
