"""A task's work on a job.

The calling thread owns the database: it claims rows, records results as
they arrive (those within 50 ms of each other in one transaction) and
re-reads the job at least every poll interval.
LLM calls run on an asyncio loop in a helper thread, as many at once as the
worker's slot grant: its share of the job's max_workers, kept in the
database so that the job's workers together never exceed it. The loop
starts the next call from a small reserve of claimed rows the moment one
ends, so a slot is a call in flight, not a row waiting to be claimed or
recorded. When the job stops running (cancelled, failed, or done by another
worker) no call starts any more and every call in flight is cancelled,
which closes its connection; its answer is never stored.
"""

import asyncio
import collections
import functools
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from django.conf import settings
from django.db import DatabaseError

from extraction.extract import (
    CacheKeys,
    ExtractionSpec,
    RowOutcome,
    build_messages,
    extract_row,
    outcome_from_answer,
)
from extraction.llm import CallSettings, LLMCallError, make_client
from extraction.prompts import response_format

from .models import ExtractJob, JobState
from .services import cache, claims, grants, lifecycle, provider_limits, sql

log = logging.getLogger(__name__)

RECORD_SECONDS = 0.05


@dataclass(frozen=True)
class RunnerSettings:
    poll_seconds: float
    lease_seconds: float
    api_key: str | None
    base_url: str | None
    llm_timeout: float
    max_attempts: int
    retry_base: float
    retry_max: float
    structured_output: bool
    worker_name: str = ""
    # Stop claiming after this long, so a task ends well within django-q2's
    # timeout; the job's other tasks (or the sweep) take the rest.
    claim_seconds: float = 1800.0

    @classmethod
    def from_django(cls) -> "RunnerSettings":
        return cls(
            poll_seconds=settings.STRINGSIGHT_CANCEL_POLL_SECONDS,
            lease_seconds=settings.STRINGSIGHT_LEASE_SECONDS,
            api_key=os.environ.get("OPENAI_API_KEY"),
            base_url=os.environ.get("OPENAI_BASE_URL") or None,
            llm_timeout=settings.STRINGSIGHT_LLM_TIMEOUT,
            max_attempts=settings.STRINGSIGHT_MAX_ATTEMPTS,
            retry_base=settings.STRINGSIGHT_RETRY_BASE_SECONDS,
            retry_max=settings.STRINGSIGHT_RETRY_MAX_SECONDS,
            structured_output=settings.STRINGSIGHT_STRUCTURED_OUTPUT,
            worker_name=settings.STRINGSIGHT_WORKER_NAME,
            claim_seconds=settings.Q_TASK_TIMEOUT / 2,
        )


def extraction_spec(job: ExtractJob, config: RunnerSettings) -> ExtractionSpec:
    return ExtractionSpec(
        method=job.method,
        system_prompt=job.resolved_system_prompt,
        include_scores=job.include_scores_in_prompt,
        max_properties=settings.STRINGSIGHT_MAX_PROPERTIES_PER_ROW,
        call=CallSettings(
            model=job.model_name,
            temperature=job.temperature,
            top_p=job.top_p,
            max_tokens=job.max_tokens,
            timeout=config.llm_timeout,
            max_attempts=config.max_attempts,
            retry_base=config.retry_base,
            retry_max=config.retry_max,
            response_format=response_format(job.method) if config.structured_output else None,
        ),
    )


class _LoopThread:
    """An asyncio loop on a daemon thread, fed from the calling thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="llm-calls", daemon=True)
        self._thread.start()

    def close(self, client) -> None:
        asyncio.run_coroutine_threadsafe(_cancel_everything(client), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


async def _cancel_everything(client) -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()


Call = Callable[[], Awaitable[RowOutcome]]


class _CallPool:
    """The runner's LLM calls, started on the event loop. Claimed rows wait
    in a reserve, and the loop starts the next call the moment one ends, up
    to the worker's slot grant, without waiting for the database thread.
    The lock makes "start a call" and "lower the cap" exclusive, so once
    lower_cap returns no call starts beyond the new cap."""

    def __init__(self, loop: asyncio.AbstractEventLoop, results: queue.SimpleQueue):
        self._loop = loop
        self._results = results
        self._lock = threading.Lock()
        self._cap = 0
        self._stopped = False
        self._in_flight = 0
        self._reserve: collections.deque[tuple[sql.ClaimedRow, Call]] = collections.deque()

    # From the database thread.

    def add(self, calls: list[tuple[sql.ClaimedRow, Call]]) -> None:
        with self._lock:
            if self._stopped:
                return
            self._reserve.extend(calls)
        self._loop.call_soon_threadsafe(self._fill)

    def counts(self) -> tuple[int, int]:
        """Calls in flight, and rows waiting for a slot."""
        with self._lock:
            return self._in_flight, len(self._reserve)

    def lower_cap(self, cap: int) -> int:
        """Start no call beyond `cap` from now on; returns the calls in flight."""
        with self._lock:
            self._cap = min(self._cap, cap)
            return self._in_flight

    def set_cap(self, cap: int) -> None:
        with self._lock:
            raised = cap > self._cap
            self._cap = cap
        if raised:  # waking the loop costs both threads the GIL
            self._loop.call_soon_threadsafe(self._fill)

    def stop(self) -> None:
        """No call starts after this returns, whatever is added or allowed later."""
        with self._lock:
            self._stopped = True
            self._reserve.clear()

    # On the event loop.

    def _fill(self) -> None:
        while True:
            with self._lock:
                if self._stopped or self._in_flight >= self._cap or not self._reserve:
                    return
                row, call = self._reserve.popleft()
                self._in_flight += 1
            self._loop.create_task(call()).add_done_callback(functools.partial(self._done, row))

    def _done(self, row: sql.ClaimedRow, task: asyncio.Task) -> None:
        # The result is queued before the call stops counting as in flight,
        # so a runner that sees nothing in flight has every result queued.
        if not task.cancelled():
            answer = task.exception() or task.result()
            if isinstance(answer, LLMCallError):
                self.stop()  # fatal for the job: start no other call
            self._results.put((row, answer))
        with self._lock:
            self._in_flight -= 1
        self._fill()


class ChunkRunner:
    def __init__(self, job_id, config: RunnerSettings):
        self.job_id = job_id
        self.config = config
        name = config.worker_name or socket.gethostname()
        self.worker_id = f"{name}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.recorded = 0

    def run(self) -> str:
        job = ExtractJob.objects.filter(pk=self.job_id, state=JobState.RUNNING).first()
        if job is None:
            return "job is not running: nothing to do"
        self.job = job
        # With a budget a claim commits it to a call, so no rows are kept
        # ready (they would commit it before the answers so far tell what
        # a call costs), and each result is recorded before the next claim.
        budgeted = (
            job.max_total_tokens is not None
            or job.max_cost_usd is not None
            or settings.STRINGSIGHT_USER_DAILY_BUDGET_USD is not None
        )
        self.keeps_rows_ready = not budgeted
        self.record_seconds = 0.0 if budgeted else RECORD_SECONDS
        self.spec = extraction_spec(job, self.config)
        self.cache_keys = CacheKeys(self.spec, base_url=self.config.base_url)
        self.loop_thread = _LoopThread()
        self.pool = _CallPool(self.loop_thread.loop, self.results)
        self.client = make_client(
            api_key=self.config.api_key, base_url=self.config.base_url, timeout=self.config.llm_timeout
        )
        self.gate = provider_limits.shared_gate(api_key=self.config.api_key, base_url=self.config.base_url)
        try:
            stopped_because = self._work()
        finally:
            self.pool.stop()
            # Cancelling the tasks closes their connections before we return.
            self.loop_thread.close(self.client)
            self.gate.close()
            try:
                grants.release_slots(job_id=self.job_id, worker_id=self.worker_id)
            except DatabaseError:
                # Not to hide why the task ended; the grant lapses with its leases.
                log.exception("job %s worker %s: could not give back its slots", self.job_id, self.worker_id)
        log.info(
            "job %s worker %s recorded %d rows: %s",
            self.job_id,
            self.worker_id,
            self.recorded,
            stopped_because,
        )
        return f"recorded {self.recorded} rows; {stopped_because}"

    def _work(self) -> str:
        poll = self.config.poll_seconds
        pending_left = True
        cap = 0
        arrived: list[tuple[sql.ClaimedRow, RowOutcome | BaseException]] = []
        started = last_lease = time.monotonic()
        last_sync = last_record = started - poll
        while True:
            now = time.monotonic()
            # A task works on the job until its rows run out. A quota per
            # task made every task of a job stop together, and the job's
            # calls in flight dropped by a fifth until the next ones started.
            may_claim = pending_left and now - started < self.config.claim_seconds
            in_flight, waiting = self.pool.counts()
            got_rows = False
            if now - last_sync >= poll:
                last_sync = now
                cap = self._sync_slots(wants=may_claim or waiting > 0)
                if cap is None:
                    return f"the job is {lifecycle.job_state(job_id=self.job_id)}"
            if may_claim and cap > 0:
                # Keep as many rows again ready to call, claimed half a grant
                # at a time: a claim costs a transaction.
                ready = cap if self.keeps_rows_ready else 0
                wanted = cap + ready - in_flight - waiting
                if wanted >= max(1, cap // 2) or not (in_flight or waiting):
                    claim = claims.claim_rows(job_id=self.job_id, worker_id=self.worker_id, limit=wanted)
                    if not claim.job_running:
                        return "the job stopped running"
                    pending_left = claim.pending_left
                    got_rows = bool(claim.rows)
                    stop = self._dispatch(claim.rows)
                    if stop:
                        return stop
                    in_flight, waiting = self.pool.counts()
            if not (in_flight or waiting or arrived) and self.results.empty():
                if may_claim and pending_left:
                    if got_rows:
                        continue  # every claimed row came from the cache: claim more
                    # Other workers hold the job's slots (or its budget's
                    # calls) and free them as their calls end; ask again
                    # next poll.
                else:
                    return "no rows left to claim" if not pending_left else "claim time is up"

            # Results that arrive within record_seconds of each other are
            # recorded together: a transaction per result was a third of
            # this thread's time, and recording no longer holds a slot.
            wake = last_sync + poll
            if arrived:
                wake = min(wake, last_record + self.record_seconds)
            arrived += self._arrivals(timeout=wake - time.monotonic())
            if arrived and time.monotonic() - last_record >= self.record_seconds:
                last_record = time.monotonic()
                stop = self._record_arrivals(arrived)
                arrived = []
                if stop:
                    return stop
            # The heartbeat: on this thread's clock, whatever the calls are
            # doing (a call may outlast a lease); the loop comes round at
            # least every poll interval.
            if time.monotonic() - last_lease >= self.config.lease_seconds / claims.RENEWALS_PER_LEASE:
                last_lease = time.monotonic()
                claims.renew_leases(job_id=self.job_id, worker_id=self.worker_id)

    def _sync_slots(self, *, wants: bool) -> int | None:
        """Read the job's grants, take this worker's fair share of its
        max_workers (as the others' shares free up) and return how many
        calls it may have in flight; None once the job stopped running."""
        view = grants.slot_view(job_id=self.job_id)
        if view is None:
            return None
        share = view.fair_share(self.worker_id, wants=wants)
        # Lower first: a grant never drops below the calls that are running.
        in_flight = self.pool.lower_cap(share)
        wanted = max(share, in_flight)
        granted = view.grants.get(self.worker_id, (None, None))
        if granted != (wanted, wants):
            slots = grants.set_slots(
                job_id=self.job_id, worker_id=self.worker_id, slots=wanted, in_flight=in_flight, wants=wants
            )
            if slots is None:
                return None
        else:
            slots = wanted
        cap = min(share, slots)
        self.pool.set_cap(cap)
        return cap

    def _dispatch(self, rows: list[sql.ClaimedRow]) -> str | None:
        """Answer rows from the completion cache where it can, and start an
        LLM call for every other row."""
        prepared = [(row, build_messages(row.data, self.spec)) for row in rows]
        keys = {row.id: self.cache_keys.key(messages) for row, messages in prepared}
        hits = cache.cached_answers(keys=list(keys.values())) if self.job.use_cache else {}
        answered, calls = [], []
        for row, messages in prepared:
            key = keys[row.id]
            if key in hits:
                outcome = outcome_from_answer(
                    hits[key], row.data, question_id=row.question_id, spec=self.spec
                )
                answered.append((row, outcome))
                continue
            calls.append((row, functools.partial(self._call, row, messages, key)))
        self.pool.add(calls)
        return self._record(answered)

    def _call(self, row: sql.ClaimedRow, messages: list[dict], key: str) -> Awaitable[RowOutcome]:
        return extract_row(
            self.client,
            row.data,
            question_id=row.question_id,
            spec=self.spec,
            messages=messages,
            key=key,
            gate=self.gate,
        )

    def _arrivals(self, timeout: float) -> list:
        """The calls' results that have arrived, waiting up to `timeout` for the first."""
        try:
            arrivals = [self.results.get(timeout=max(0.0, timeout))]
        except queue.Empty:
            return []
        while True:
            try:
                arrivals.append(self.results.get_nowait())
            except queue.Empty:
                return arrivals

    def _record_arrivals(self, arrivals: list) -> str | None:
        """Record the results; returns why to stop, or None to go on."""
        results = []
        for row, answer in arrivals:
            if isinstance(answer, LLMCallError):
                # Fatal for the job (bad credentials, unknown model): keep
                # what arrived with it, then end the job.
                self._record(results)
                lifecycle.job_fail(job_id=self.job_id, error=str(answer))
                return f"the job failed: {answer}"
            if isinstance(answer, BaseException):
                log.error("job %s row %d: extraction crashed", self.job_id, row.index, exc_info=answer)
                results.append(
                    (row, RowOutcome(error=f"internal error while extracting: {type(answer).__name__}"))
                )
            else:
                results.append((row, answer))
        return self._record(results)

    def _record(self, results: list[tuple[sql.ClaimedRow, RowOutcome]]) -> str | None:
        if not results:
            return None
        recorded = claims.record_row_results(
            job_id=self.job_id, worker_id=self.worker_id, results=results, model_name=self.job.model_name
        )
        self.recorded += recorded.stored
        if recorded.job_running:
            return None
        return f"the job is {lifecycle.job_state(job_id=self.job_id)}"
