"""The LLM endpoint's limits, shared by every worker process and machine.

The rules are extraction.gate's (Django-free); this module keeps each
endpoint lane's state where every process sees it: in the database, or in
Redis when Q_REDIS_URL is set. A process settles with the store a few
times a second while it calls (not once per call): it reports its calls
in flight and waiting, its successes and refusals, and gets its part of
the lane's calls in flight and of its rates. Its part is a lease that
lapses a lease period after its last settle, so a dead process's part
returns to the others.

An endpoint is named by a hash of its base URL and key: the key itself is
never stored.
"""

import asyncio
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields

from django.conf import settings
from django.db import connection, transaction

from extraction.extract import OPENAI_DEFAULT_BASE_URL
from extraction.gate import (
    EndpointLimits,
    EndpointState,
    Grant,
    Lease,
    LimitsConfig,
    MemoryStore,
    Report,
    SharingGate,
    settle,
)

from ..models import ProviderEndpoint, ProviderLease

log = logging.getLogger(__name__)

# Redis keys live this long after their last settle.
REDIS_KEY_SECONDS = 86_400


def endpoint_id(*, base_url: str | None, api_key: str | None) -> str:
    endpoint = (base_url or OPENAI_DEFAULT_BASE_URL).rstrip("/")
    return hashlib.sha256(f"{endpoint}\n{api_key or ''}".encode()).hexdigest()[:40]


def limits_config() -> LimitsConfig:
    default = EndpointLimits(
        max_concurrency=settings.STRINGSIGHT_LLM_MAX_CONCURRENCY,
        rpm=settings.STRINGSIGHT_LLM_RPM,
        tpm=settings.STRINGSIGHT_LLM_TPM,
    )
    per_model = {
        model: EndpointLimits(
            max_concurrency=int(values["max_concurrency"]) if "max_concurrency" in values else None,
            rpm=values.get("rpm"),
            tpm=values.get("tpm"),
        )
        for model, values in settings.STRINGSIGHT_LLM_LIMITS.items()
    }
    return LimitsConfig(default=default, per_model=per_model)


class DatabaseStore:
    """Lanes in the database: one short transaction per settle, the lane's
    row locked (SQLite: the IMMEDIATE transaction) while it decides."""

    blocking = True

    def settle(
        self, key: str, holder: str, report: Report, limits: EndpointLimits, lease_seconds: float
    ) -> Grant:
        with transaction.atomic():
            row = ProviderEndpoint.objects.select_for_update().filter(key=key).first()
            if row is None:
                ProviderEndpoint.objects.bulk_create([ProviderEndpoint(key=key)], ignore_conflicts=True)
                row = ProviderEndpoint.objects.select_for_update().get(key=key)
            state = _state_of(row)
            before = asdict(state)
            stored = {
                lease.holder: Lease(lease.held, lease.wants, lease.in_flight, lease.renewed_at)
                for lease in ProviderLease.objects.filter(endpoint_id=key)
            }
            leases = dict(stored)
            grant = settle(
                state, leases, holder, report, limits, now=time.time(), lease_seconds=lease_seconds
            )
            changed = {name: value for name, value in asdict(state).items() if before[name] != value}
            if changed:
                ProviderEndpoint.objects.filter(key=key).update(**changed)
            gone = [name for name in stored if name not in leases]
            if gone:
                ProviderLease.objects.filter(endpoint_id=key, holder__in=gone).delete()
            mine = leases.get(holder)
            if mine is not None:
                fields = asdict(mine)
                if holder in stored:
                    ProviderLease.objects.filter(endpoint_id=key, holder=holder).update(**fields)
                else:
                    ProviderLease.objects.create(endpoint_id=key, holder=holder, **fields)
        return grant

    def close(self) -> None:
        connection.close()


class RedisStore:
    """Lanes in Redis: a lane's state and leases are read, decided on and
    written back in one optimistic transaction (WATCH/MULTI), taken again
    if another process wrote between."""

    blocking = True

    def __init__(self, url: str):
        import redis

        self.client = redis.Redis.from_url(url)

    def settle(
        self, key: str, holder: str, report: Report, limits: EndpointLimits, lease_seconds: float
    ) -> Grant:
        import redis

        state_key, leases_key = f"stringsight:llm:{key}:state", f"stringsight:llm:{key}:leases"
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(state_key, leases_key)
                    raw_state = pipe.get(state_key)
                    raw_leases = pipe.hgetall(leases_key)
                    state = EndpointState(**json.loads(raw_state)) if raw_state else EndpointState()
                    leases = {name.decode(): Lease(**json.loads(value)) for name, value in raw_leases.items()}
                    grant = settle(
                        state, leases, holder, report, limits, now=time.time(), lease_seconds=lease_seconds
                    )
                    pipe.multi()
                    pipe.set(state_key, json.dumps(asdict(state)), ex=REDIS_KEY_SECONDS)
                    pipe.delete(leases_key)
                    if leases:
                        stored = {name: json.dumps(asdict(lease)) for name, lease in leases.items()}
                        pipe.hset(leases_key, mapping=stored)
                        pipe.expire(leases_key, REDIS_KEY_SECONDS)
                    pipe.execute()
                    return grant
                except redis.WatchError:
                    continue

    def close(self) -> None:
        self.client.close()


class SharedGate(SharingGate):
    """A worker's gate on the endpoint, shared through the database or
    Redis. The store is called on a thread of the gate's own (with its own
    database connection), never on the event loop. `close()` once its
    calls have ended."""

    def __init__(self, store, *, endpoint: str, limits: LimitsConfig, lease_seconds: float):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-limits")
        super().__init__(
            store,
            endpoint=endpoint,
            limits=limits,
            lease_seconds=lease_seconds,
            run_blocking=self._off_the_loop,
        )

    async def _off_the_loop(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def close(self) -> None:
        log.info("LLM endpoint limits: %d calls, %d settles with the store", self.calls, self.settles)
        try:
            self._executor.submit(self.leave).result(timeout=30)
        finally:
            self._executor.submit(self.store.close).result(timeout=30)
            self._executor.shutdown(wait=True)


def shared_gate(*, api_key: str | None, base_url: str | None) -> SharingGate:
    """The gate for the endpoint this worker calls."""
    redis_url = settings.STRINGSIGHT_LIMITS_REDIS_URL
    if redis_url:
        store = RedisStore(redis_url)
    elif connection.in_atomic_block:
        # The gate's own connection would wait on this transaction's locks
        # (SQLite) and commit beside it: made inside one (a test), the gate
        # keeps its lanes in this process.
        store = MemoryStore()
    else:
        store = DatabaseStore()
    return SharedGate(
        store,
        endpoint=endpoint_id(base_url=base_url, api_key=api_key),
        limits=limits_config(),
        lease_seconds=settings.STRINGSIGHT_LEASE_SECONDS,
    )


def lane_state(key: str) -> EndpointState | None:
    """A lane's shared state as the database holds it (for the admin and tests)."""
    row = ProviderEndpoint.objects.filter(key=key).first()
    if row is None:
        return None
    return _state_of(row)


def _state_of(row: ProviderEndpoint) -> EndpointState:
    return EndpointState(**{field.name: getattr(row, field.name) for field in fields(EndpointState)})
