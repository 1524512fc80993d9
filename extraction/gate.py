"""When an LLM call may start: the limits of the endpoint it goes to.

An endpoint is a base URL and a key (and a model, where limits are set per
model). Its limits hold for every caller: the calls in flight
(max_concurrency) and the rates of requests and tokens per minute (rpm,
tpm) are shared out between the processes that call it, through a store
(in this process: MemoryStore; across processes and machines: the
database or Redis, in jobs.services.provider_limits). Without any
configuration the gate still adapts: an answer refused for the
endpoint's rate lowers the calls allowed in flight for everyone
(multiplicative decrease), which grow back slowly while calls succeed;
Retry-After and x-ratelimit-reset-* pause every caller until then, and
x-ratelimit-remaining-* pauses them before a refusal when the allowance
is spent.

    async with gate.call(model, tokens) as permit:
        ...  # the call
        permit.report(tokens=used, rate_limit=info)  # or rate_limited=True

No Django here: the stores that need it live in jobs/.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

# An endpoint without a configured concurrency starts here and doubles
# while calls succeed and more are wanted, until its first refusal.
INITIAL_CONCURRENCY = 16
# A refusal for the endpoint's rate multiplies the calls allowed in flight
# by this; the refusals of one burst arrive together, so they count once
# per cooldown. (0.8 kept 20 of 24 calls in flight on average, 0.9 keeps 22.5
# for about one refusal in 40 calls: BENCHMARKS.md #12.)
DECREASE = 0.9
DECREASE_COOLDOWN_SECONDS = 1.0
# Rates may be used this many seconds ahead (a burst), never more.
RATE_BURST_SECONDS = 1.0
# How often a process settles with the store while its calls wait for
# more room, and while they merely run (its lease is renewed then too).
SYNC_WAITING_SECONDS = 0.1
SYNC_RUNNING_SECONDS = 0.5
MIN_SYNC_GAP_SECONDS = 0.02
# After the store failed to answer, ask it again this much later; meanwhile
# the lane is settled in this process alone.
STORE_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class RateLimitInfo:
    """What an answer's headers said of the endpoint's limits, in seconds
    and counts; None where a header was absent."""

    retry_after: float | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    limit_requests: int | None = None
    limit_tokens: int | None = None

    def pause_seconds(self, *, refused: bool, tokens: int = 0) -> float | None:
        """How long every caller of the endpoint should wait: after a
        refusal, its Retry-After; else until the allowance it says is spent
        has room for one more call: the reset, or sooner where the limit
        says how fast the allowance refills (a minute's worth a minute)."""
        if refused and self.retry_after is not None:
            return self.retry_after
        waits = []
        if (self.remaining_requests is not None and self.remaining_requests <= 0) or (
            refused and self.remaining_requests is None
        ):
            waits.append(_sooner(self.reset_requests, 1, self.limit_requests))
        needed = max(1, tokens)
        if (self.remaining_tokens is not None and self.remaining_tokens < needed) or (
            refused and self.remaining_tokens is None
        ):
            short = needed - (self.remaining_tokens or 0)
            waits.append(_sooner(self.reset_tokens, short, self.limit_tokens))
        waits = [wait for wait in waits if wait is not None]
        return max(waits) if waits else None


def _sooner(reset: float | None, short: float, per_minute: int | None) -> float | None:
    refill = short * 60.0 / per_minute if per_minute else None
    if reset is None or refill is None:
        return reset if refill is None else refill
    return min(reset, refill)


@dataclass(frozen=True)
class EndpointLimits:
    """Configured limits; None is no limit (the gate still adapts)."""

    max_concurrency: int | None = None
    rpm: float | None = None
    tpm: float | None = None


@dataclass(frozen=True)
class LimitsConfig:
    """The limits of an endpoint's calls; a model named in `per_model` has
    its own lane (its own limits and state), the others share the default."""

    default: EndpointLimits = EndpointLimits()
    per_model: dict[str, EndpointLimits] = field(default_factory=dict)

    def lane(self, model: str) -> tuple[str, EndpointLimits]:
        if model in self.per_model:
            return model, self.per_model[model]
        return "", self.default


class Permit(Protocol):
    def report(
        self,
        *,
        tokens: int | None = None,
        rate_limit: RateLimitInfo | None = None,
        rate_limited: bool = False,
    ) -> None:
        """After the call: `tokens` used when it was answered, what its
        headers said, and whether it was refused for the endpoint's rate."""


class Gate(Protocol):
    def call(self, model: str, tokens: int) -> contextlib.AbstractAsyncContextManager[Permit]: ...


class _NoPermit:
    def report(self, *, tokens=None, rate_limit=None, rate_limited=False) -> None:
        pass


class OpenGate:
    """No limits and no adapting: every call starts at once."""

    @contextlib.asynccontextmanager
    async def call(self, model: str, tokens: int) -> AsyncIterator[Permit]:
        yield _NoPermit()


OPEN_GATE = OpenGate()


# The shared part: an endpoint lane's state, each process's lease on it, and
# how a process settles with them. Pure functions on plain data, so every
# store (memory, database, Redis) applies the same rules.


@dataclass
class EndpointState:
    # Calls allowed in flight, adapted; None until first settled.
    allowed: float | None = None
    slow_start: bool = True
    decreased_at: float = 0.0
    paused_until: float = 0.0
    # GCRA theoretical arrival times of the request and token rates (epoch s).
    request_tat: float = 0.0
    token_tat: float = 0.0


@dataclass
class Lease:
    """A process's part of a lane: the calls it may have in flight (held),
    wants, and has; renewed at every settle, dead after lease_seconds."""

    held: int = 0
    wants: int = 0
    in_flight: int = 0
    renewed_at: float = 0.0


@dataclass
class Report:
    """What a process tells the store when it settles."""

    in_flight: int = 0
    # The cap the process goes on using until it has this settle's grant.
    cap: int = 0
    # Token needs of the calls waiting for a rate allowance, first first.
    waiting_tokens: list[int] = field(default_factory=list)
    waiting: int = 0
    successes: int = 0
    rate_limited: bool = False
    # When the grant was made under which the latest refused call started
    # (epoch s): a call started under a grant older than the lane's last
    # decrease says nothing about that decrease.
    refused_granted_at: float = 0.0
    # The cap the process used when its latest call was refused.
    refused_cap: int = 0
    pause_until: float = 0.0
    unused_tokens: int = 0
    leaving: bool = False


@dataclass(frozen=True)
class Grant:
    cap: int
    paused_until: float
    # Rate allowances taken for the first waiting calls: how many calls,
    # and their tokens.
    requests: int
    tokens: int
    # When the rates have room for the next waiting call, if some were left.
    more_at: float | None
    allowed: float
    # When the grant was made (epoch s).
    at: float = 0.0


def settle(
    state: EndpointState,
    leases: dict[str, Lease],
    holder: str,
    report: Report,
    limits: EndpointLimits,
    *,
    now: float,
    lease_seconds: float,
) -> Grant:
    """Apply `holder`'s report to the lane and give it its grant. Changes
    `state` and `leases` in place (dead leases are removed)."""
    for name in [name for name, lease in leases.items() if lease.renewed_at < now - lease_seconds]:
        del leases[name]
    others = {name: lease for name, lease in leases.items() if name != holder}
    if state.allowed is None:
        state.allowed = float(limits.max_concurrency or INITIAL_CONCURRENCY)
        state.slow_start = limits.max_concurrency is None
    wants = report.in_flight + report.waiting
    demand = wants + sum(lease.wants for lease in others.values())
    if report.rate_limited:
        # One burst of refusals decreases once; a call refused although it
        # started under a grant made by or after the decrease shows the
        # decrease was not enough. (A call started after the decrease under an older
        # grant, before its process settled, does not.)
        if (
            now - state.decreased_at >= DECREASE_COOLDOWN_SECONDS
            or report.refused_granted_at >= state.decreased_at
        ):
            # What the holders were using when refused: their caps, as calls
            # that just ended (the refused ones too) no longer count in flight.
            tried = max(report.in_flight, report.refused_cap) + sum(
                max(lease.held, lease.in_flight) for lease in others.values()
            )
            state.allowed = max(1.0, min(state.allowed, tried) * DECREASE)
            state.decreased_at = now
            state.slow_start = False
    elif report.successes and demand > state.allowed:
        state.allowed += report.successes if state.slow_start else report.successes / state.allowed
    if limits.max_concurrency is not None:
        state.allowed = min(state.allowed, float(limits.max_concurrency))
    state.paused_until = max(state.paused_until, report.pause_until)

    allowed = max(1, int(state.allowed))
    share = fair_share(allowed, holder, {**{n: lease.wants for n, lease in others.items()}, holder: wants})
    cap = max(0, min(share, allowed - sum(lease.held for lease in others.values())))
    if report.leaving:
        leases.pop(holder, None)
    else:
        # Until it has this grant the process may start calls up to its
        # previous cap: what it holds covers that too, so the others are
        # never granted what it may still use.
        leases[holder] = Lease(
            held=max(cap, report.cap, report.in_flight),
            wants=wants,
            in_flight=report.in_flight,
            renewed_at=now,
        )

    if limits.tpm is not None and report.unused_tokens:
        state.token_tat = max(now, state.token_tat - report.unused_tokens * 60.0 / limits.tpm)
    requests = tokens = 0
    more_at = None
    if not now < state.paused_until:
        for needed in report.waiting_tokens:
            wait = _rate_wait(state, limits, needed, now)
            if wait is not None:
                more_at = wait
                break
            if limits.rpm is not None:
                state.request_tat = max(state.request_tat, now) + 60.0 / limits.rpm
            if limits.tpm is not None:
                state.token_tat = max(state.token_tat, now) + needed * 60.0 / limits.tpm
            requests += 1
            tokens += needed
    return Grant(
        cap=cap,
        paused_until=state.paused_until,
        requests=requests,
        tokens=tokens,
        more_at=more_at,
        allowed=state.allowed,
        at=now,
    )


def _rate_wait(state: EndpointState, limits: EndpointLimits, tokens: int, now: float) -> float | None:
    """When a call of `tokens` fits both rates, or None if it fits now. A
    rate may run RATE_BURST_SECONDS ahead; one call may go past that (a
    call larger than the burst must pass some time), the next waits."""
    waits = [
        tat - RATE_BURST_SECONDS
        for limit, tat in ((limits.rpm, state.request_tat), (limits.tpm, state.token_tat))
        if limit is not None and tat - now > RATE_BURST_SECONDS
    ]
    return max(waits) if waits else None


def fair_share(capacity: int, holder: str, wants: dict[str, int]) -> int:
    """Max-min fair: a holder wanting less than an equal part gets what it
    wants, the others split what is left equally, the first by name taking
    the remainder, so the shares add up to the capacity (or to the wants)."""
    left = capacity
    pending = sorted(wants.items(), key=lambda item: (item[1], item[0]))
    while pending:
        name, want = pending[0]
        if want * len(pending) <= left:
            if name == holder:
                return want
            left -= want
            pending.pop(0)
            continue
        names = sorted(name for name, _ in pending)
        base, extra = divmod(left, len(names))
        return base + (names.index(holder) < extra)
    return 0


class Store(Protocol):
    """Where lanes are shared. `settle` runs the rules above atomically on
    the lane `key`; it may block (a database, Redis), so gates call it on a
    thread of their own unless `blocking` is False."""

    blocking: bool

    def settle(
        self, key: str, holder: str, report: Report, limits: EndpointLimits, lease_seconds: float
    ) -> Grant: ...

    def close(self) -> None: ...


class MemoryStore:
    """Lanes shared by the gates of this process only (the CLI, tests)."""

    blocking = False

    def __init__(self):
        self._lanes: dict[str, tuple[EndpointState, dict[str, Lease]]] = {}

    def settle(self, key, holder, report, limits, lease_seconds) -> Grant:
        state, leases = self._lanes.setdefault(key, (EndpointState(), {}))
        return settle(state, leases, holder, report, limits, now=time.time(), lease_seconds=lease_seconds)

    def state(self, key: str) -> EndpointState | None:
        found = self._lanes.get(key)
        return found[0] if found else None

    def close(self) -> None:
        pass


@dataclass
class _Waiter:
    tokens: int
    future: asyncio.Future
    # Set once the rates granted this call its request and tokens.
    rated: bool = False


class _Lane:
    def __init__(self, key: str, limits: EndpointLimits):
        self.key = key
        self.limits = limits
        self.rated = limits.rpm is not None or limits.tpm is not None
        self.cap = 0
        self.in_flight = 0
        self.waiters: collections.deque[_Waiter] = collections.deque()
        self.paused_until = 0.0
        self.more_at: float | None = None
        self.settled = False
        # What the next settle reports.
        self.successes = 0
        self.rate_limited = False
        self.refused_granted_at = 0.0
        self.refused_cap = 0
        self.refused_cap = 0
        self.pause_until = 0.0
        self.unused_tokens = 0
        # When the grant in force was made.
        self.granted_at = 0.0
        self.last_sync = -math.inf
        self.poked: asyncio.Event | None = None
        self.syncer: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None

    def report(self, *, leaving: bool = False) -> Report:
        report = Report(
            in_flight=self.in_flight,
            cap=self.cap if self.settled else 0,
            waiting=len(self.waiters),
            waiting_tokens=[waiter.tokens for waiter in self.waiters if not waiter.rated]
            if self.rated
            else [],
            successes=self.successes,
            rate_limited=self.rate_limited,
            refused_granted_at=self.refused_granted_at,
            refused_cap=self.refused_cap,
            pause_until=self.pause_until,
            unused_tokens=self.unused_tokens,
            leaving=leaving,
        )
        self.successes = self.unused_tokens = 0
        self.rate_limited = False
        self.refused_granted_at = 0.0
        self.refused_cap = 0
        self.pause_until = 0.0
        return report

    @property
    def idle(self) -> bool:
        return not (self.in_flight or self.waiters or self.successes or self.rate_limited or self.pause_until)


class _LanePermit:
    def __init__(self, gate: SharingGate, lane: _Lane, tokens: int):
        self._gate = gate
        self._lane = lane
        self._tokens = tokens
        self._granted_at = lane.granted_at
        self.rate_limit: RateLimitInfo | None = None

    def report(self, *, tokens=None, rate_limit=None, rate_limited=False) -> None:
        lane = self._lane
        self.rate_limit = rate_limit
        if rate_limited:
            lane.rate_limited = True
            lane.refused_granted_at = max(lane.refused_granted_at, self._granted_at)
            lane.refused_cap = max(lane.refused_cap, lane.cap)
            # Until the lane settles, the refused call's place is not taken again.
            lane.cap = max(1, min(lane.cap, lane.in_flight - 1))
        elif tokens is not None:
            lane.successes += 1
        if tokens is not None and self._lane.limits.tpm is not None:
            lane.unused_tokens += max(0, self._tokens - tokens)
        pause = rate_limit.pause_seconds(refused=rate_limited, tokens=self._tokens) if rate_limit else None
        if pause:
            until = time.time() + pause
            lane.pause_until = max(lane.pause_until, until)
            # This process stops at once; the others when they settle.
            lane.paused_until = max(lane.paused_until, until)
        if rate_limited or pause:
            self._gate._poke(lane)


class SharingGate:
    """A process's gate on one endpoint, whose lanes are shared through a
    store. Used from one event loop."""

    def __init__(
        self,
        store: Store,
        *,
        endpoint: str,
        limits: LimitsConfig | None = None,
        lease_seconds: float = 20.0,
        run_blocking: Callable | None = None,
    ):
        self.store = store
        self.endpoint = endpoint
        self.limits = limits or LimitsConfig()
        self.lease_seconds = lease_seconds
        self.holder = uuid.uuid4().hex
        self._lanes: dict[str, _Lane] = {}
        # How a blocking store is called off the loop (a thread of its own).
        self._run_blocking = run_blocking
        self._fallback = MemoryStore()
        # How often this gate settled with the store, for how many calls.
        self.settles = 0
        self.calls = 0

    @contextlib.asynccontextmanager
    async def call(self, model: str, tokens: int) -> AsyncIterator[Permit]:
        lane = self._lane(model)
        await self._acquire(lane, tokens)
        try:
            yield _LanePermit(self, lane, tokens)
        finally:
            lane.in_flight -= 1
            self._admit(lane)

    def lane_key(self, model: str) -> str:
        name, _ = self.limits.lane(model)
        return f"{self.endpoint}:{name}" if name else self.endpoint

    def _lane(self, model: str) -> _Lane:
        name, limits = self.limits.lane(model)
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = _Lane(self.lane_key(model), limits)
        return lane

    async def _acquire(self, lane: _Lane, tokens: int) -> None:
        waiter = _Waiter(tokens=tokens, future=asyncio.get_running_loop().create_future())
        lane.waiters.append(waiter)
        self._admit(lane)
        if not waiter.future.done():
            self._poke(lane)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter in lane.waiters:
                lane.waiters.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled():
                lane.in_flight -= 1  # admitted as it was cancelled
                self._admit(lane)
            raise

    def _admit(self, lane: _Lane) -> None:
        """Start waiting calls while the lane has room."""
        now = time.time()
        if now < lane.paused_until:
            self._wake_at(lane, lane.paused_until)
            return
        while lane.waiters and lane.settled and lane.in_flight < lane.cap:
            waiter = lane.waiters[0]
            if lane.rated and not waiter.rated:
                break
            lane.waiters.popleft()
            if waiter.future.done():
                continue
            lane.in_flight += 1
            self.calls += 1
            waiter.future.set_result(None)
        if lane.waiters:
            self._poke(lane, soon=False)

    def _wake_at(self, lane: _Lane, moment: float) -> None:
        if lane.timer is not None:
            lane.timer.cancel()
        loop = asyncio.get_running_loop()
        lane.timer = loop.call_later(max(0.0, moment - time.time()), self._resume, lane)

    def _resume(self, lane: _Lane) -> None:
        lane.timer = None
        self._admit(lane)
        self._poke(lane)

    def _poke(self, lane: _Lane, soon: bool = True) -> None:
        """Have the lane settle with the store (at once when `soon`)."""
        if lane.syncer is None or lane.syncer.done():
            lane.poked = asyncio.Event()
            lane.syncer = asyncio.get_running_loop().create_task(self._sync_loop(lane))
        if soon:
            lane.poked.set()

    async def _sync_loop(self, lane: _Lane) -> None:
        while True:
            gap = time.monotonic() - lane.last_sync
            if gap < MIN_SYNC_GAP_SECONDS:
                await asyncio.sleep(min(STORE_RETRY_SECONDS, MIN_SYNC_GAP_SECONDS - gap))
            lane.poked.clear()
            leaving = lane.idle and lane.settled
            report = lane.report(leaving=leaving)
            try:
                grant = await self._settle(lane, report)
            except Exception:
                # The calls go on within limits this process keeps alone
                # until the store answers again.
                log.warning("LLM endpoint limits: the store failed; kept in this process", exc_info=True)
                grant = self._fallback.settle(lane.key, self.holder, report, lane.limits, self.lease_seconds)
                lane.last_sync = time.monotonic() + STORE_RETRY_SECONDS
            else:
                lane.last_sync = time.monotonic()
            self._apply(lane, grant)
            if leaving:
                lane.settled = False
                if lane.idle:
                    return
            self._admit(lane)
            if lane.idle and not lane.poked.is_set():
                # One more settle gives the lease back (leaving) if nothing
                # comes meanwhile.
                delay = SYNC_RUNNING_SECONDS
            elif lane.waiters and lane.in_flight >= lane.cap:
                delay = SYNC_WAITING_SECONDS
            else:
                delay = SYNC_RUNNING_SECONDS
            if lane.more_at is not None:
                delay = min(delay, max(0.0, lane.more_at - time.time()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await lane.poked.wait()

    async def _settle(self, lane: _Lane, report: Report) -> Grant:
        self.settles += 1
        if self.store.blocking and self._run_blocking is not None:
            return await self._run_blocking(
                self.store.settle, lane.key, self.holder, report, lane.limits, self.lease_seconds
            )
        return self.store.settle(lane.key, self.holder, report, lane.limits, self.lease_seconds)

    def _apply(self, lane: _Lane, grant: Grant) -> None:
        lane.settled = True
        lane.cap = grant.cap
        lane.granted_at = grant.at
        lane.paused_until = max(lane.paused_until, grant.paused_until)
        lane.more_at = grant.more_at
        unrated = [waiter for waiter in lane.waiters if not waiter.rated]
        for waiter in unrated[: grant.requests]:
            waiter.rated = True

    def leave(self) -> None:
        """Give back this process's leases (from outside the loop, once its
        calls have ended), so its part goes to the others at once."""
        for lane in self._lanes.values():
            if lane.settled:
                lane.in_flight = 0
                lane.waiters.clear()
                self.store.settle(
                    lane.key, self.holder, lane.report(leaving=True), lane.limits, self.lease_seconds
                )
                lane.settled = False


def local_gate(limits: LimitsConfig | None = None, *, endpoint: str = "local") -> SharingGate:
    """A gate whose lanes live in this process only."""
    return SharingGate(MemoryStore(), endpoint=endpoint, limits=limits)
