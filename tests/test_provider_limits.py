"""The LLM endpoint's limits shared through the database or Redis, and the
worker keeping them against the simulator over HTTP."""

import asyncio
import os
import threading
import uuid

import pytest
import redis
from django.db import connection

from extraction.gate import DECREASE, EndpointLimits, LimitsConfig, Report
from jobs.models import ExtractJob, ProviderEndpoint, ProviderLease
from jobs.services import provider_limits
from jobs.services.provider_limits import DatabaseStore, RedisStore, SharedGate, endpoint_id
from tests.factories import make_job, simple_rows
from tests.test_worker import run_at_once, run_job

REDIS_URL = os.environ.get("STRINGSIGHT_TEST_REDIS_URL", "redis://127.0.0.1:6379/10")


def test_an_endpoint_is_named_by_a_hash_that_holds_no_part_of_the_key():
    key = "sk-proj-0123456789abcdefghij"

    name = endpoint_id(base_url="https://api.example.com/v1/", api_key=key)

    assert name == endpoint_id(base_url="https://api.example.com/v1", api_key=key)
    assert name != endpoint_id(base_url="https://api.example.com/v1", api_key=key + "x")
    assert not any(key[at : at + 8] in name for at in range(len(key) - 7))


def most_in_flight_together(gates: list[SharedGate], calls: int) -> int:
    """Each gate on a thread of its own (as each worker process would be),
    making `calls` calls of 20 ms; the most in flight at once across them."""
    lock = threading.Lock()
    counts = {"now": 0, "most": 0}

    async def one(gate):
        async with gate.call("sim-model", 100) as permit:
            with lock:
                counts["now"] += 1
                counts["most"] = max(counts["most"], counts["now"])
            await asyncio.sleep(0.02)
            with lock:
                counts["now"] -= 1
            permit.report(tokens=100)

    def run(gate):
        async def all_calls():
            await asyncio.gather(*(one(gate) for _ in range(calls)))

        try:
            asyncio.run(all_calls())
        finally:
            gate.close()

    threads = [threading.Thread(target=run, args=(gate,)) for gate in gates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return counts["most"]


@pytest.mark.django_db(transaction=True)
def test_workers_share_one_concurrency_through_the_database():
    limits = LimitsConfig(default=EndpointLimits(max_concurrency=5))
    gates = [
        SharedGate(DatabaseStore(), endpoint="db-endpoint", limits=limits, lease_seconds=20) for _ in range(3)
    ]

    most = most_in_flight_together(gates, calls=30)

    assert most == 5
    # Each worker gave its lease back as it left.
    assert ProviderLease.objects.count() == 0
    assert ProviderEndpoint.objects.get(key="db-endpoint").allowed == 5.0


@pytest.fixture
def redis_lane():
    """A lane name of this test's own, and a factory of Redis stores."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    lane = f"test-{uuid.uuid4().hex}"
    yield lane, lambda: RedisStore(REDIS_URL)
    for key in client.scan_iter(f"stringsight:llm:{lane}*"):
        client.delete(key)
    client.close()


def test_workers_share_one_concurrency_through_redis(redis_lane):
    lane, store = redis_lane
    limits = LimitsConfig(default=EndpointLimits(max_concurrency=4))
    gates = [SharedGate(store(), endpoint=lane, limits=limits, lease_seconds=20) for _ in range(3)]

    most = most_in_flight_together(gates, calls=20)

    assert most == 4
    assert redis.Redis.from_url(REDIS_URL).hlen(f"stringsight:llm:{lane}:leases") == 0


def test_a_refusal_slows_the_lane_for_every_worker_through_redis(redis_lane):
    lane, store = redis_lane
    first, other = store(), store()
    limits = EndpointLimits()
    first.settle(lane, "a", Report(waiting=20), limits, 20)
    first.settle(lane, "a", Report(in_flight=16, waiting=4, rate_limited=True), limits, 20)

    grant = other.settle(lane, "b", Report(waiting=20), limits, 20)

    assert grant.allowed == pytest.approx(16 * DECREASE)
    assert grant.cap == 0  # a still holds what the lane allows


@pytest.mark.django_db(transaction=True)
def test_the_worker_keeps_the_configured_concurrency_whatever_max_workers(
    user, sim, settings, no_background_worker
):
    settings.STRINGSIGHT_LLM_MAX_CONCURRENCY = 4
    sim.configure(latency_ms=40)
    job = make_job(user, simple_rows(40), max_workers=8)

    run_job(job, sim)

    job.refresh_from_db()
    assert (job.state, job.count_done) == ("done", 40)
    assert sim.stats()["max_in_flight"] == 4


@pytest.mark.django_db(transaction=True)
def test_jobs_and_workers_share_the_endpoints_concurrency(user, sim, settings, no_background_worker):
    settings.STRINGSIGHT_LLM_MAX_CONCURRENCY = 5
    sim.configure(latency_ms=40)
    first = make_job(user, simple_rows(30), max_workers=8)
    second = make_job(user, simple_rows(30, marker="again"), max_workers=8)

    def other_job():
        try:
            run_job(second, sim)
        finally:
            connection.close()

    run_at_once(first, sim, runners=2, meanwhile=other_job)

    assert sim.stats()["max_in_flight"] <= 5
    assert list(ExtractJob.objects.order_by("created_at").values_list("state", "count_done")) == [
        ("done", 30),
        ("done", 30),
    ]


@pytest.mark.django_db(transaction=True)
def test_a_per_model_limit_applies_to_that_model_only(user, sim, settings, no_background_worker):
    settings.STRINGSIGHT_LLM_LIMITS = {"gpt-4o-mini": {"max_concurrency": 2}}
    sim.configure(latency_ms=40)
    job = make_job(user, simple_rows(12), model_name="gpt-4o-mini", max_workers=6)

    run_job(job, sim)

    assert sim.stats()["max_in_flight"] == 2
    endpoint = endpoint_id(base_url=sim.base_url, api_key="sim-key")
    assert ProviderEndpoint.objects.filter(key=f"{endpoint}:gpt-4o-mini").exists()
    assert provider_limits.limits_config().lane("sim-model") == ("", EndpointLimits())
