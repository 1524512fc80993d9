"""The simulator's provider limits over HTTP, answered as OpenAI answers them."""

import asyncio
import json
import urllib.request

import pytest

from tests.fixtures_simulator import start_simulator, stop_simulator

REQUEST = {"model": "sim-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1000}


def post(sim, body=REQUEST) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        sim.base_url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer k"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, dict(response.headers), json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.load(exc)


def test_a_spent_quota_answers_429_insufficient_quota_until_switched_off(sim):
    sim.configure(quota_spent=True)

    status, headers, body = post(sim)
    sim.configure(quota_spent=False)
    after = post(sim)

    assert status == 429
    assert body["error"]["code"] == body["error"]["type"] == "insufficient_quota"
    assert body["error"]["message"].startswith("You exceeded your current quota")
    assert "retry-after" not in {name.lower() for name in headers}
    assert after[0] == 200
    assert [r["outcome"] for r in sim.requests()] == ["quota_spent", "ok"]


def test_a_forbidden_key_answers_403_as_openai_does(sim):
    sim.configure(forbidden=True)

    status, _, body = post(sim)

    assert (status, body["error"]["code"]) == (403, "unsupported_country_region_territory")
    assert sim.requests()[0]["outcome"] == "forbidden"


def test_requests_beyond_the_concurrency_limit_are_refused_at_once(sim):
    sim.configure(max_concurrency=2, latency_ms=400)

    async def four_at_once():
        return await asyncio.gather(*(asyncio.to_thread(post, sim) for _ in range(4)))

    answers = asyncio.run(four_at_once())

    assert sorted(status for status, _, _ in answers) == [200, 200, 429, 429]
    refused = [body for status, _, body in answers if status == 429]
    assert {body["error"]["code"] for body in refused} == {"rate_limit_exceeded"}
    assert sim.stats()["by_outcome"] == {"ok": 2, "rate_limited": 2}


def test_the_request_rate_is_enforced_with_openais_headers(sim):
    sim.configure(rpm=3)

    answers = [post(sim) for _ in range(4)]

    assert [status for status, _, _ in answers] == [200, 200, 200, 429]
    _, last_ok, _ = answers[2]
    assert (last_ok["x-ratelimit-limit-requests"], last_ok["x-ratelimit-remaining-requests"]) == ("3", "0")
    assert last_ok["x-ratelimit-reset-requests"].endswith("s")
    _, refused_headers, refused = answers[3]
    assert 1 <= int(refused_headers["retry-after"]) <= 20
    assert 0 < int(refused_headers["retry-after-ms"]) <= 20_000
    assert refused["error"]["message"].startswith(
        "Rate limit reached for sim-model in organization org-sim on requests per min (RPM): Limit 3"
    )


def test_the_token_rate_counts_the_prompt_and_max_tokens(sim):
    sim.configure(tpm=2100)

    answers = [post(sim) for _ in range(3)]

    assert [status for status, _, _ in answers] == [200, 200, 429]
    # 2,100 less twice 2 (for "hello") + 1,000 (max_tokens), and a trickle refilled meanwhile.
    assert 96 <= int(answers[1][1]["x-ratelimit-remaining-tokens"]) < 110
    assert "tokens per min (TPM): Limit 2100" in answers[2][2]["error"]["message"]


def test_limit_options_are_checked_and_set_from_flags(sim):
    with pytest.raises(urllib.error.HTTPError) as refused:
        sim.configure(rpm=0)
    assert (
        json.load(refused.value)["error"]["message"]
        == "rpm must be a whole number >= 1, or null for no limit"
    )

    process, base_url = start_simulator(
        "--max-concurrency", "24", "--rpm", "600", "--tpm", "90000", "--quota-spent"
    )
    try:
        from llm_simulator.client import SimulatorClient

        config = SimulatorClient(base_url).config()
    finally:
        stop_simulator(process)
    assert (config["max_concurrency"], config["rpm"], config["tpm"], config["quota_spent"]) == (
        24,
        600,
        90000,
        True,
    )
