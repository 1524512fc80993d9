"""The endpoint gate's rules (extraction.gate), without Django: how a lane
adapts, shares its calls in flight and its rates, and pauses; and how an
LLM answer is classified."""

import asyncio

import httpx2
import openai
import pytest

from extraction.gate import (
    DECREASE,
    INITIAL_CONCURRENCY,
    EndpointLimits,
    EndpointState,
    LimitsConfig,
    RateLimitInfo,
    Report,
    fair_share,
    local_gate,
    settle,
)
from extraction.llm import duration_seconds, fatal_message, is_rate_limited, rate_limit_info

LEASE = 20.0


def test_fair_shares_add_up_to_the_capacity_and_small_wants_are_met():
    wants = {"a": 2, "b": 30, "c": 30}

    shares = {holder: fair_share(24, holder, wants) for holder in wants}

    assert shares == {"a": 2, "b": 11, "c": 11}
    assert {holder: fair_share(25, holder, {"b": 30, "c": 30}) for holder in "bc"} == {"b": 13, "c": 12}
    assert fair_share(24, "a", {"a": 5}) == 5


def test_a_lane_without_configuration_starts_small_and_doubles_while_calls_succeed_and_more_are_wanted():
    state, leases = EndpointState(), {}

    first = settle(state, leases, "w", Report(waiting=100), EndpointLimits(), now=1000.0, lease_seconds=LEASE)
    assert first.cap == INITIAL_CONCURRENCY

    grant = settle(
        state,
        leases,
        "w",
        Report(in_flight=16, waiting=84, successes=16),
        EndpointLimits(),
        now=1001.0,
        lease_seconds=LEASE,
    )
    assert grant.cap == 2 * INITIAL_CONCURRENCY

    # Successes while nothing more is wanted do not grow the lane.
    grant = settle(
        state,
        leases,
        "w",
        Report(in_flight=3, successes=30),
        EndpointLimits(),
        now=1002.0,
        lease_seconds=LEASE,
    )
    assert state.allowed == 2 * INITIAL_CONCURRENCY


def test_a_refusal_multiplies_what_is_allowed_once_per_burst_then_growth_is_additive():
    state, leases = EndpointState(allowed=24.0, slow_start=True), {}
    limits = EndpointLimits()

    settle(
        state,
        leases,
        "w",
        Report(in_flight=25, waiting=10, rate_limited=True),
        limits,
        now=10.0,
        lease_seconds=LEASE,
    )
    after_first = state.allowed
    settle(
        state,
        leases,
        "w",
        Report(in_flight=25, waiting=10, rate_limited=True),
        limits,
        now=10.2,
        lease_seconds=LEASE,
    )

    assert after_first == 24 * DECREASE
    assert state.allowed == after_first  # the same burst's refusals count once
    assert state.slow_start is False
    settle(
        state,
        leases,
        "w",
        Report(in_flight=19, waiting=10, successes=19),
        limits,
        now=11.0,
        lease_seconds=LEASE,
    )
    assert state.allowed == pytest.approx(after_first + 19 / after_first)  # about one per round of calls


def test_a_refusal_under_a_grant_made_after_the_decrease_decreases_again_and_one_under_an_older_grant_not():
    state, leases = EndpointState(allowed=30.0, slow_start=False), {}
    limits = EndpointLimits()
    first = settle(
        state, leases, "a", Report(in_flight=30, rate_limited=True), limits, now=10.0, lease_seconds=LEASE
    )
    assert first.at == 10.0
    assert state.allowed == 30 * DECREASE

    # Another holder's call started after the decrease, but under its grant
    # of before it (the holder had not settled yet): the same burst.
    settle(
        state,
        leases,
        "b",
        Report(in_flight=2, rate_limited=True, refused_granted_at=9.9),
        limits,
        now=10.1,
        lease_seconds=LEASE,
    )
    assert state.allowed == 30 * DECREASE

    # A call started under the decreased grant is refused: not enough.
    settle(
        state,
        leases,
        "a",
        Report(in_flight=26, rate_limited=True, refused_granted_at=first.at),
        limits,
        now=10.2,
        lease_seconds=LEASE,
    )
    assert state.allowed == pytest.approx(30 * DECREASE * DECREASE)


def test_a_decrease_starts_from_the_caps_in_use_not_from_the_calls_still_in_flight():
    # Slow start has just doubled 16 to 32; a holder's burst is refused at
    # once, so when it settles few of its calls are still in flight.
    state, leases = EndpointState(allowed=32.0, slow_start=True), {}
    limits = EndpointLimits()
    settle(state, leases, "b", Report(in_flight=16, waiting=50), limits, now=5.0, lease_seconds=LEASE)
    settle(state, leases, "a", Report(in_flight=10, waiting=50), limits, now=5.01, lease_seconds=LEASE)

    settle(
        state,
        leases,
        "a",
        Report(in_flight=9, waiting=50, rate_limited=True, refused_cap=16, refused_granted_at=5.01),
        limits,
        now=5.1,
        lease_seconds=LEASE,
    )

    # 16 + 16 were in use: the limit lies below 32, not below 9 + 16.
    assert state.allowed == pytest.approx(32 * DECREASE)


def test_a_configured_concurrency_is_never_exceeded_by_the_holders_together():
    state, leases = EndpointState(), {}
    limits = EndpointLimits(max_concurrency=24)

    a = settle(state, leases, "a", Report(waiting=24), limits, now=1.0, lease_seconds=LEASE)
    b = settle(state, leases, "b", Report(waiting=24), limits, now=1.1, lease_seconds=LEASE)
    # a learns of b's wants and lowers its cap; b gets the rest once a's calls end.
    a = settle(state, leases, "a", Report(in_flight=24), limits, now=1.2, lease_seconds=LEASE)
    b = settle(state, leases, "b", Report(waiting=24), limits, now=1.3, lease_seconds=LEASE)
    a2 = settle(state, leases, "a", Report(in_flight=12, waiting=12), limits, now=1.4, lease_seconds=LEASE)
    b2 = settle(state, leases, "b", Report(waiting=24), limits, now=1.5, lease_seconds=LEASE)

    assert (a.cap, b.cap) == (12, 0)
    assert (a2.cap, b2.cap) == (12, 12)
    assert sum(lease.held for lease in leases.values()) <= 24


def test_a_dead_holders_part_returns_after_a_lease_period():
    state, leases = EndpointState(), {}
    limits = EndpointLimits(max_concurrency=10)
    settle(state, leases, "dead", Report(in_flight=10), limits, now=100.0, lease_seconds=LEASE)

    early = settle(state, leases, "alive", Report(waiting=10), limits, now=110.0, lease_seconds=LEASE)
    late = settle(state, leases, "alive", Report(waiting=10), limits, now=121.0, lease_seconds=LEASE)

    assert (early.cap, late.cap) == (0, 10)
    assert set(leases) == {"alive"}


def test_the_request_rate_is_granted_no_faster_than_its_limit():
    state, leases = EndpointState(), {}
    limits = EndpointLimits(rpm=600)  # one every 0.1 s, a second ahead at most
    granted, now = 0, 1000.0
    while now < 1010.0:
        grant = settle(
            state,
            leases,
            "w",
            Report(waiting=50, waiting_tokens=[0] * 50),
            limits,
            now=now,
            lease_seconds=LEASE,
        )
        granted += grant.requests
        now += 0.05

    # Ten seconds at 10 a second, and the burst of one second ahead.
    assert 100 <= granted <= 112


def test_the_token_rate_counts_each_calls_tokens_and_takes_back_what_was_not_used():
    state, leases = EndpointState(), {}
    limits = EndpointLimits(tpm=60_000)  # 1,000 tokens a second
    first = settle(
        state, leases, "w", Report(waiting=5, waiting_tokens=[800] * 5), limits, now=0.0, lease_seconds=LEASE
    )
    assert (first.requests, first.tokens) == (2, 1600)  # the second goes past the burst; the third waits
    assert first.more_at == pytest.approx(0.6)

    settle(state, leases, "w", Report(unused_tokens=1000), limits, now=0.0, lease_seconds=LEASE)
    again = settle(
        state, leases, "w", Report(waiting=3, waiting_tokens=[800] * 3), limits, now=0.0, lease_seconds=LEASE
    )
    assert again.requests == 1


def test_a_pause_holds_every_caller_until_it_ends():
    gate = local_gate(LimitsConfig())
    started = []

    async def main():
        loop = asyncio.get_running_loop()
        async with gate.call("m", 10) as permit:
            permit.report(rate_limit=RateLimitInfo(retry_after=0.3), rate_limited=True)
        paused_at = loop.time()

        async def one():
            async with gate.call("m", 10) as permit:
                started.append(loop.time() - paused_at)
                permit.report(tokens=10)

        await asyncio.gather(*(one() for _ in range(5)))

    asyncio.run(main())

    assert len(started) == 5
    assert min(started) >= 0.25


def test_the_local_gate_keeps_calls_in_flight_within_the_configured_concurrency():
    gate = local_gate(LimitsConfig(default=EndpointLimits(max_concurrency=3)))
    in_flight, peak = 0, 0

    async def one():
        nonlocal in_flight, peak
        async with gate.call("m", 10) as permit:
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            permit.report(tokens=10)

    async def main():
        await asyncio.gather(*(one() for _ in range(30)))

    asyncio.run(main())

    assert peak == 3


def test_a_model_with_its_own_limits_has_its_own_lane():
    limits = LimitsConfig(
        default=EndpointLimits(max_concurrency=8), per_model={"big": EndpointLimits(rpm=60)}
    )
    gate = local_gate(limits, endpoint="e")

    assert (gate.lane_key("small"), gate.lane_key("big")) == ("e", "e:big")
    assert limits.lane("big") == ("big", EndpointLimits(rpm=60))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("250ms", 0.25), ("1h2m3.5s", 3723.5), ("2.5", 2.5), ("soon", None)],
)
def test_reset_durations_read_as_openai_writes_them(text, seconds):
    assert duration_seconds(text) == seconds


def test_rate_limit_headers_are_read_and_say_how_long_to_pause():
    info = rate_limit_info(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "29000",
            "x-ratelimit-reset-tokens": "2s",
        }
    )

    assert info == RateLimitInfo(
        reset_requests=0.12,
        reset_tokens=2.0,
        remaining_requests=0,
        remaining_tokens=29000,
        limit_requests=500,
        limit_tokens=30000,
    )
    assert info.pause_seconds(refused=False, tokens=1000) == 0.12  # no request left
    assert info.pause_seconds(refused=False, tokens=30000) == 2.0  # not enough tokens left either
    assert RateLimitInfo(retry_after=3.0, reset_tokens=9.0).pause_seconds(refused=True) == 3.0
    assert rate_limit_info({"content-type": "application/json"}) is None


def error(cls, status, body):
    response = httpx2.Response(status, request=httpx2.Request("POST", "http://sim/v1/chat/completions"))
    return cls(body.get("message", ""), response=response, body=body)


def test_a_spent_quota_is_fatal_and_told_apart_from_a_rate_limit():
    key = "sk-proj-AbCdEf0123456789"
    quota = error(
        openai.RateLimitError,
        429,
        {
            "message": f"You exceeded your current quota for key {key}, "
            "please check your plan and billing details.",
            "type": "insufficient_quota",
            "code": "insufficient_quota",
        },
    )
    rate = error(
        openai.RateLimitError,
        429,
        {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"},
    )

    message = fatal_message(quota, "gpt-4o-mini", key)

    assert message == (
        "the LLM provider says the key's quota is spent: You exceeded your current quota for key [redacted], "
        "please check your plan and billing details"
    )
    assert (is_rate_limited(quota), is_rate_limited(rate)) == (False, True)
    assert fatal_message(rate, "gpt-4o-mini", key) is None


@pytest.mark.parametrize(
    ("cls", "status", "expected"),
    [
        (
            openai.AuthenticationError,
            401,
            "the LLM provider refused the API key (401): nope; check OPENAI_API_KEY",
        ),
        (openai.PermissionDeniedError, 403, "the LLM provider refused the API key (403): nope"),
        (
            openai.NotFoundError,
            404,
            "the LLM provider has no model 'gpt-x' (404): nope; check model_name and OPENAI_BASE_URL",
        ),
        (openai.InternalServerError, 500, None),
    ],
)
def test_refused_keys_and_unknown_models_are_fatal(cls, status, expected):
    assert fatal_message(error(cls, status, {"message": "nope"}), "gpt-x", "a-long-secret-key") == expected


def test_what_a_holder_holds_covers_the_cap_it_uses_until_it_has_its_new_grant():
    state, leases = EndpointState(), {}
    limits = EndpointLimits(max_concurrency=24)
    settle(state, leases, "a", Report(waiting=24), limits, now=1.0, lease_seconds=LEASE)
    settle(state, leases, "b", Report(waiting=12), limits, now=1.1, lease_seconds=LEASE)

    # a's calls fell to 8 before it reported; until it applies its new cap
    # (12, b wants its share) it may start calls up to 24 again.
    a = settle(
        state, leases, "a", Report(in_flight=8, cap=24, waiting=16), limits, now=1.2, lease_seconds=LEASE
    )
    b = settle(state, leases, "b", Report(waiting=12), limits, now=1.3, lease_seconds=LEASE)

    assert (a.cap, leases["a"].held) == (12, 24)
    assert b.cap == 0
