"""The LLM simulator, reached like a provider: over HTTP through the real openai SDK."""

import asyncio
import contextlib
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.error

import openai
import pytest

from llm_simulator import compose_answer, serve
from tests.fixtures_simulator import MODULE, ROOT, start_simulator, stop_simulator, user_sha256

TRANSCRIPT = """user: Hi, I need to change my flight to Seattle on May 20.
assistant: Sure! Could you share your user ID so I can look up the reservation?
user: It is mia_li_3668.
assistant: call get_user_details with {"user_id": "mia_li_3668"}
tool: {"name": "Mia Li", "reservations": ["NO6JO3"]}
assistant: call get_reservation_details with {"reservation_id": "NO6JO3"}
assistant: I'm sorry, the new fare is $121 and the change fee is $50.
user: Thanks, go ahead.
assistant: Thank you, your flight is changed."""

SIDE_BY_SIDE = """Compare the two responses below.
Model A
user: Can I bring my dog on board?
assistant: Yes. Pets under 20 lbs fly in the cabin for $125. Anything else?
Model B
user: Can I bring my dog on board?
assistant: I'm sorry, I cannot help with pet policies."""

PROPERTY_FIELDS = {
    "property_description",
    "category",
    "reason",
    "evidence",
    "behavior_type",
    "contains_errors",
    "unexpected_behavior",
}
BEHAVIOR_TYPES = {"Positive", "Negative (critical)", "Negative (non-critical)", "Style"}
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "properties", "schema": {"type": "object"}},
}


@pytest.fixture
def client(sim):
    with openai.OpenAI(base_url=sim.base_url, api_key="sim-key", max_retries=0) as client:
        yield client


def ask(client, content, **arguments):
    arguments.setdefault("model", "gpt-4o-mini")
    return client.chat.completions.create(messages=[{"role": "user", "content": content}], **arguments)


def fenced_json(content: str):
    return json.loads(re.search(r"```json\n(.*)\n```", content, re.DOTALL).group(1))


def wait_until_ended(sim, timeout=30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    log = sim.requests()
    while any(r["ended_at"] is None for r in log) and time.monotonic() < deadline:
        time.sleep(0.01)
        log = sim.requests()
    return log


def test_completion_returns_properties_quoting_the_transcript(client, sim):
    system = "Extract behavioural properties as JSON."
    response = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": TRANSCRIPT}],
    )

    content = response.choices[0].message.content
    properties = fenced_json(content)
    assert response.model == "gpt-4o-mini"
    assert response.choices[0].finish_reason == "stop"
    assert 3 <= len(properties) <= 6
    for prop in properties:
        assert set(prop) == PROPERTY_FIELDS
        assert prop["behavior_type"] in BEHAVIOR_TYPES
        assert 1 <= len(prop["property_description"].split()) <= 20
        assert 1 <= len(prop["evidence"]) <= 2
        assert all(quote and quote in TRANSCRIPT for quote in prop["evidence"])
    prompt_tokens = math.ceil((len(system) + len(TRANSCRIPT)) / 4)
    completion_tokens = math.ceil(len(content) / 4)
    assert response.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def test_same_request_gets_same_answer(client):
    first = ask(client, TRANSCRIPT).choices[0].message.content
    second = ask(client, TRANSCRIPT).choices[0].message.content

    assert second == first


def test_properties_mention_the_tools_called(client):
    transcript = 'assistant: call search_direct_flight with {"origin": "JFK"}\nuser: ok'

    properties = fenced_json(ask(client, transcript).choices[0].message.content)

    tool_use = [p for p in properties if p["category"] == "Tool use"]
    assert [p["property_description"] for p in tool_use] == [
        "The assistant calls search_direct_flight to check facts before answering the user."
    ]
    assert tool_use[0]["evidence"] == ['assistant: call search_direct_flight with {"origin": "JFK"}']


def test_side_by_side_answer_names_both_models(client):
    properties = fenced_json(ask(client, SIDE_BY_SIDE).choices[0].message.content)

    assert {p["model"] for p in properties} == {"Model A", "Model B"}
    assert all(set(p) == PROPERTY_FIELDS | {"model"} for p in properties)
    assert all(quote in SIDE_BY_SIDE for p in properties for quote in p["evidence"])


@pytest.mark.parametrize("response_format", [SCHEMA_FORMAT, {"type": "json_object"}])
def test_json_response_format_gets_an_object(client, sim, response_format):
    response = ask(client, TRANSCRIPT, response_format=response_format)

    answer = json.loads(response.choices[0].message.content)
    assert list(answer) == ["properties"]
    assert all(set(p) == PROPERTY_FIELDS for p in answer["properties"])
    assert sim.requests()[0]["response_format_type"] == response_format["type"]


def test_request_log_records_parameters_exactly(client, sim):
    ask(client, f"{TRANSCRIPT} [[sim:empty]]", model="gpt-4.1", temperature=0, top_p=0.95, max_tokens=1234)
    ask(client, TRANSCRIPT)

    first, second = sim.requests()
    assert first["id"] + 1 == second["id"]
    assert first["started_at"] <= first["ended_at"] <= second["started_at"] <= second["ended_at"]
    content = f"{TRANSCRIPT} [[sim:empty]]"
    del first["id"], first["started_at"], first["ended_at"]
    assert first == {
        "model": "gpt-4.1",
        "outcome": "ok",
        "status": 200,
        "user_sha256": user_sha256(content),
        "user_preview": content[:200],
        "temperature": 0,
        "top_p": 0.95,
        "max_tokens": 1234,
        "max_completion_tokens": None,
        "response_format_type": None,
    }
    assert (second["temperature"], second["top_p"], second["max_tokens"]) == (None, None, None)


def test_max_tokens_cuts_the_answer(client, sim):
    response = ask(client, TRANSCRIPT, max_tokens=20)

    assert len(response.choices[0].message.content) == 80
    assert response.choices[0].finish_reason == "length"
    assert sim.requests()[0]["outcome"] == "truncated"


@pytest.mark.parametrize(
    ("marker", "error", "status", "outcome"),
    [
        ("[[sim:429]]", openai.RateLimitError, 429, "rate_limited"),
        ("[[sim:500]]", openai.InternalServerError, 500, "server_error"),
        ("[[sim:400]]", openai.BadRequestError, 400, "bad_request"),
    ],
)
def test_fault_markers_raise_the_sdk_error(client, sim, marker, error, status, outcome):
    with pytest.raises(error) as caught:
        ask(client, f"{TRANSCRIPT}\n{marker}")

    assert caught.value.status_code == status
    assert [(r["outcome"], r["status"]) for r in sim.requests()] == [(outcome, status)]


@pytest.mark.parametrize(
    ("option", "error", "status", "outcome"),
    [
        ("rate_429", openai.RateLimitError, 429, "rate_limited"),
        ("rate_500", openai.InternalServerError, 500, "server_error"),
    ],
)
def test_fault_rates_raise_the_sdk_error(client, sim, option, error, status, outcome):
    sim.configure(**{option: 1.0})

    with pytest.raises(error) as caught:
        ask(client, TRANSCRIPT)

    assert caught.value.status_code == status
    assert [(r["outcome"], r["status"]) for r in sim.requests()] == [(outcome, status)]


def test_fault_draws_repeat_after_a_reset(client, sim):
    sim.configure(rate_500=0.5, seed=7)

    def outcomes():
        for _ in range(8):
            with contextlib.suppress(openai.InternalServerError):
                ask(client, TRANSCRIPT)
        return [r["outcome"] for r in sim.requests()]

    first = outcomes()
    sim.reset()
    second = outcomes()

    assert second == first
    assert set(first) == {"ok", "server_error"}


def test_rate_limit_sends_retry_after(client, sim):
    sim.configure(retry_after=7)

    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, "[[sim:429]]")

    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.body["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize("by", ["marker", "rate"])
def test_bad_json_answer_is_prose(client, sim, by):
    if by == "rate":
        sim.configure(rate_bad_json=1.0)

    response = ask(client, "[[sim:bad_json]]" if by == "marker" else TRANSCRIPT)

    content = response.choices[0].message.content
    assert not set("{}[]") & set(content)
    assert sim.requests()[0]["outcome"] == "bad_json"


@pytest.mark.parametrize("by", ["marker", "rate"])
def test_refusal_answer(client, sim, by):
    if by == "rate":
        sim.configure(rate_refusal=1.0)

    response = ask(client, "[[sim:refusal]]" if by == "marker" else TRANSCRIPT)

    message = response.choices[0].message
    assert (message.content, message.refusal) == ("I'm sorry, but I can't help with that.",) * 2
    assert sim.requests()[0]["outcome"] == "refusal"


@pytest.mark.parametrize("by", ["marker", "rate"])
def test_truncated_answer_stops_inside_an_object(client, sim, by):
    if by == "rate":
        sim.configure(rate_truncated=1.0)
    content = f"{TRANSCRIPT}\n[[sim:truncated]]" if by == "marker" else TRANSCRIPT

    response = ask(client, content, response_format=SCHEMA_FORMAT)

    answer = response.choices[0].message.content
    assert response.choices[0].finish_reason == "length"
    assert answer.startswith('{"properties": [{')
    assert answer.count("{") > answer.count("}") + 1
    assert sim.requests()[0]["outcome"] == "truncated"


def test_empty_marker_answers_no_properties(client):
    assert json.loads(
        ask(client, "[[sim:empty]]", response_format=SCHEMA_FORMAT).choices[0].message.content
    ) == {"properties": []}


def test_invalid_items_marker_mixes_valid_and_invalid_items(client):
    properties = fenced_json(ask(client, f"{TRANSCRIPT}\n[[sim:invalid_items]]").choices[0].message.content)

    assert len(properties) == 4
    assert [p["property_description"] == "" for p in properties] == [False, True, False, False]
    assert [p["behavior_type"] == "Weird" for p in properties] == [False, False, False, True]


@pytest.mark.parametrize(
    ("marker", "error", "failures", "outcome"),
    [
        ("[[sim:500x2]]", openai.InternalServerError, 2, "server_error"),
        ("[[sim:429x3]]", openai.RateLimitError, 3, "rate_limited"),
    ],
)
def test_fail_first_n_times_then_succeed(client, sim, marker, error, failures, outcome):
    answered = []
    for _ in range(failures + 2):
        with contextlib.suppress(error):
            answered.append(bool(ask(client, f"{TRANSCRIPT}\n{marker}").choices))

    assert answered == [True, True]
    assert [r["outcome"] for r in sim.requests()] == [outcome] * failures + ["ok", "ok"]


def test_api_key_is_checked_when_set(sim):
    sim.configure(api_key="right-key")

    with (
        openai.OpenAI(base_url=sim.base_url, api_key="wrong-key", max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        ask(wrong, TRANSCRIPT)
    with openai.OpenAI(base_url=sim.base_url, api_key="right-key", max_retries=0) as right:
        ask(right, TRANSCRIPT)

    assert caught.value.body["code"] == "invalid_api_key"
    assert [(r["outcome"], r["status"]) for r in sim.requests()] == [("unauthorized", 401), ("ok", 200)]


def test_unknown_model_is_not_found(client, sim):
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, TRANSCRIPT, model="gpt-imaginary")

    assert caught.value.body["code"] == "model_not_found"
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini", "gpt-4.1", "gpt-4o", "sim-model"]
    assert sim.requests()[0]["outcome"] == "not_found"


@pytest.mark.parametrize(
    ("configured", "marker", "expected"), [(150, "", 0.15), (0, "[[sim:latency=100]]", 0.1)]
)
def test_latency_is_honoured(client, sim, configured, marker, expected):
    sim.configure(latency_ms=configured)

    started = time.monotonic()
    ask(client, f"{TRANSCRIPT}{marker}")
    elapsed = time.monotonic() - started

    record = sim.requests()[0]
    assert expected <= record["ended_at"] - record["started_at"]
    assert expected <= elapsed
    # Not, say, seconds for milliseconds; a busy machine may add a little.
    assert elapsed < expected + 2.0


def test_concurrent_calls_are_in_flight_together(sim):
    # Long enough for the five requests to arrive before the first answer, on a busy machine too.
    sim.configure(latency_ms=1000)

    async def five_calls():
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sim-key", max_retries=0) as client:
            calls = [
                client.chat.completions.create(
                    model="sim-model", messages=[{"role": "user", "content": f"{TRANSCRIPT} #{i}"}]
                )
                for i in range(5)
            ]
            return await asyncio.gather(*calls)

    responses = asyncio.run(five_calls())

    assert len({r.choices[0].message.content for r in responses}) == 5
    assert sim.stats() == {"requests_total": 5, "in_flight": 0, "max_in_flight": 5, "by_outcome": {"ok": 5}}


def test_cancelled_call_is_logged_as_aborted(sim):
    sim.configure(latency_ms=60_000)

    async def cancelled_call():
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sim-key", max_retries=0) as client:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    client.chat.completions.create(
                        model="sim-model", messages=[{"role": "user", "content": TRANSCRIPT}]
                    ),
                    timeout=0.2,
                )

    asyncio.run(cancelled_call())

    [record] = wait_until_ended(sim)
    assert (record["outcome"], record["status"]) == ("aborted", None)
    assert record["ended_at"] - record["started_at"] < 30  # when the client left, not after 60 s
    assert sim.stats() == {
        "requests_total": 1,
        "in_flight": 0,
        "max_in_flight": 1,
        "by_outcome": {"aborted": 1},
    }


def test_hang_marker_waits_until_the_client_leaves(sim):
    with (
        openai.OpenAI(base_url=sim.base_url, api_key="sim-key", max_retries=0, timeout=0.15) as client,
        pytest.raises(openai.APITimeoutError),
    ):
        ask(client, "[[sim:hang]]")

    [record] = wait_until_ended(sim)
    assert (record["outcome"], record["status"]) == ("aborted", None)


def test_stats_count_outcomes(client, sim):
    ask(client, TRANSCRIPT)
    with pytest.raises(openai.InternalServerError):
        ask(client, "[[sim:500]]")

    assert sim.stats() == {
        "requests_total": 2,
        "in_flight": 0,
        "max_in_flight": 1,
        "by_outcome": {"ok": 1, "server_error": 1},
    }


def test_reset_clears_the_log(client, sim):
    ask(client, TRANSCRIPT)

    sim.reset()

    assert (sim.requests(), sim.stats()["requests_total"]) == ([], 0)


def test_config_rejects_unknown_and_bad_options(sim):
    with pytest.raises(urllib.error.HTTPError) as unknown:
        sim.configure(latency=5, speed=2)
    with pytest.raises(urllib.error.HTTPError) as bad:
        sim.configure(rate_500=2)

    assert (unknown.value.code, json.load(unknown.value)["error"]["message"]) == (
        400,
        "unknown option(s): latency, speed",
    )
    assert (bad.value.code, json.load(bad.value)["error"]["message"]) == (
        400,
        "rate_500 must be a number between 0 and 1.0",
    )
    assert sim.config() == sim.defaults


def test_chunked_body_and_connection_close(sim):
    host, port = sim.root_url.removeprefix("http://").split(":")
    body = json.dumps({"model": "sim-model", "messages": [{"role": "user", "content": TRANSCRIPT}]}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:100], body[100:])) + b"0\r\n\r\n"
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )

    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(head + chunks)
        received = b"".join(iter(lambda: connection.recv(65536), b""))

    response_head, response_body = received.split(b"\r\n\r\n", 1)
    headers = dict(line.split(": ", 1) for line in response_head.decode().split("\r\n")[1:])
    assert response_head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert (headers["Connection"], int(headers["Content-Length"])) == ("close", len(response_body))
    assert json.loads(response_body)["object"] == "chat.completion"


def test_command_exits_cleanly_on_sigterm():
    process, base_url = start_simulator()

    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", base_url)
    assert stop_simulator(process) == 0


def test_the_module_command_line_serves_without_django():
    process, base_url = start_simulator("--seed", "3", "--models", "m1,m2", command=MODULE)
    try:
        with openai.OpenAI(base_url=base_url, api_key="k", max_retries=0) as client:
            models = [model.id for model in client.models.list()]
            answer = ask(client, TRANSCRIPT, model="m2").choices[0].message.content
    finally:
        assert stop_simulator(process) == 0

    assert models == ["m1", "m2"]
    assert answer == compose_answer(TRANSCRIPT, 3, "ok", object_form=False)[0]


def test_the_module_command_line_names_a_bad_option():
    finished = subprocess.run(
        [sys.executable, "-m", "llm_simulator", "--host", "0.0.0.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert finished.returncode == 2
    assert "loopback only" in finished.stderr


def test_serve_refuses_a_non_loopback_host():
    with pytest.raises(ValueError, match="loopback only"):
        asyncio.run(serve("0.0.0.0", 0))


def test_bad_json_first_answers_a_requests_first_call_badly_and_the_second_well(client, sim):
    sim.configure(rate_bad_json_first=1.0)

    answers = [
        ask(client, content).choices[0].message.content for content in (TRANSCRIPT, TRANSCRIPT, "other")
    ]

    assert not set("{}[]") & set(answers[0])
    assert 3 <= len(fenced_json(answers[1])) <= 6
    assert not set("{}[]") & set(answers[2])  # another request's first call
    assert [r["outcome"] for r in sim.requests()] == ["bad_json", "ok", "bad_json"]
    assert sim.config()["rate_bad_json_first"] == 1.0
    sim.reset()  # forgets which requests were asked
    assert not set("{}[]") & set(ask(client, TRANSCRIPT).choices[0].message.content)


def test_a_paused_simulator_holds_answers_until_it_resumes(sim):
    sim.configure(paused=True)

    async def held_call():
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sim-key", max_retries=0) as client:
            call = asyncio.ensure_future(
                client.chat.completions.create(
                    model="sim-model", messages=[{"role": "user", "content": TRANSCRIPT}]
                )
            )
            while sim.stats()["in_flight"] < 1:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # a paused answer stays held, however long
            held = not call.done()
            resumed_at = time.time()
            sim.configure(paused=False)
            return held, resumed_at, await call

    held, resumed_at, response = asyncio.run(held_call())

    [record] = sim.requests()
    assert held is True
    assert response.choices[0].finish_reason == "stop"
    assert (record["outcome"], record["started_at"] < resumed_at <= record["ended_at"]) == ("ok", True)


def test_a_call_whose_client_leaves_while_paused_is_aborted(sim):
    sim.configure(paused=True)

    with (
        openai.OpenAI(base_url=sim.base_url, api_key="sim-key", max_retries=0, timeout=0.3) as client,
        pytest.raises(openai.APITimeoutError),
    ):
        ask(client, TRANSCRIPT)

    [record] = wait_until_ended(sim)
    assert (record["outcome"], record["status"]) == ("aborted", None)
