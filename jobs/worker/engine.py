"""A worker process serving every running job at once.

One django-q2 task (jobs.tasks.serve_jobs) runs an Engine; the process's
LLM calls in flight (STRINGSIGHT_WORKER_CONCURRENCY) are divided between
owners, then between each owner's jobs (jobs.worker.shares), and each job's
part is a slot grant in the database, so a job's workers never together
exceed its max_workers whatever the number of processes and machines.

The engine's thread owns the database. Every poll interval it reads the
running and queued jobs with their grants (one query), takes its shares,
claims rows for the jobs that need them and hands them to the call pool;
in between it records the calls' results as they arrive (those within
RECORD_SECONDS of each other together) and renews its leases on a clock
of its own. A job that stops running (cancelled, failed, done) has its
calls stopped at the next poll; the other jobs' calls go on.
"""

import enum
import functools
import logging
import math
import os
import queue
import socket
import time
import uuid
from dataclasses import dataclass, field

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

from ..models import ExtractJob, JobMode, JobState
from ..services import cache, claims, grants, lifecycle, provider_limits
from ..services.claims import RENEWALS_PER_LEASE
from ..services.sql import ClaimedRow
from .callpool import CallPool, LoopThread
from .shares import Demand, owner_then_job_shares

log = logging.getLogger(__name__)

# Results that arrive within this long of each other are recorded in one
# transaction: a transaction per result was a large part of the database
# thread's time at high throughput.
RECORD_SECONDS = 0.05
# While jobs want more calls than this worker can make, it asks for one more
# worker process at most this often.
HELP_WANTED_SECONDS = 2.0
# Rows a job keeps ready beyond its calls in flight, however small its cap
# on this worker, so that a job with a few calls here claims a few rows at a
# time rather than one per call.
READY_ROWS = 8
# The most claims in a row for a job whose rows all came from the cache.
CACHED_CLAIMS_PER_POLL = 20


class StopReason(enum.Enum):
    NOTHING_TO_DO = "no job has rows left to claim"
    TIME_UP = "claim time is up"
    JOB_ENDED = "the job stopped running"


@dataclass(frozen=True)
class WorkerSettings:
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
    # timeout; another task takes its place if work is left.
    claim_seconds: float = 1800.0
    # LLM calls in flight in this process, across all jobs.
    concurrency: int = 64
    # An owner's calls in flight across all their jobs and all workers.
    user_max_concurrency: int | None = None
    # How long a worker with nothing to do waits for new work before its task ends.
    idle_seconds: float = 0.5

    @classmethod
    def from_django(cls) -> "WorkerSettings":
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
            concurrency=settings.STRINGSIGHT_WORKER_CONCURRENCY,
            user_max_concurrency=settings.STRINGSIGHT_USER_MAX_CONCURRENCY,
        )


def extraction_spec(job: ExtractJob, config: WorkerSettings) -> ExtractionSpec:
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


def new_worker_id(name: str = "") -> str:
    return f"{name or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class _Served:
    """A job this worker takes part in."""

    job: ExtractJob
    spec: ExtractionSpec
    cache_keys: CacheKeys
    # With a budget a claim commits it to a call, so no rows are kept ready
    # (they would commit it before the answers so far tell what a call
    # costs), and each result is recorded before the next claim.
    budgeted: bool
    pending_left: bool = True
    cap: int = 0
    arrived: list = field(default_factory=list)
    last_record: float = 0.0


class Engine:
    """Serves every running job (or only `job_id`) until none has rows
    left for it, or its claim time is up."""

    def __init__(self, config: WorkerSettings, *, job_id=None):
        self.config = config
        self.only_job = job_id
        self.worker_id = new_worker_id(config.worker_name)
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.served: dict[uuid.UUID, _Served] = {}
        self.recorded = 0
        # Claim time counts from the first poll, not from the setup before it.
        self.started: float | None = None
        self.last_poll = self.last_renewal = self.last_help = -math.inf
        self.idle_since: float | None = None
        self.loop_thread: LoopThread | None = None
        self.pool: CallPool | None = None
        self.client = None
        self.gate = None

    def run(self) -> str:
        self.loop_thread = LoopThread()
        self.pool = CallPool(
            self.loop_thread.loop, self.results, is_fatal=lambda answer: isinstance(answer, LLMCallError)
        )
        self.client = make_client(
            api_key=self.config.api_key, base_url=self.config.base_url, timeout=self.config.llm_timeout
        )
        # Every call passes the endpoint's limits, shared with every worker.
        self.gate = provider_limits.shared_gate(api_key=self.config.api_key, base_url=self.config.base_url)
        try:
            reason = self._serve()
            if reason is StopReason.TIME_UP and self.only_job is None:
                lifecycle.wake_a_worker()  # to take this task's place
        finally:
            for job_id in self.served:
                self.pool.stop(job_id)
            # Cancelling the calls closes their connections before we return.
            self.loop_thread.close(self.client.close)
            self.gate.close()
            self._leave()
        log.info("worker %s recorded %d rows: %s", self.worker_id, self.recorded, reason.value)
        return f"recorded {self.recorded} rows; {reason.value}"

    def _leave(self) -> None:
        try:
            claims.give_back_rows(worker_id=self.worker_id)
            grants.release_worker(worker_id=self.worker_id)
        except DatabaseError:
            # Not to hide why the task ended; grants and rows lapse with their leases.
            log.exception("worker %s: could not give back its rows and slots", self.worker_id)

    # The loop.

    def _serve(self) -> StopReason:
        while True:
            now = time.monotonic()
            if now - self.last_poll >= self.config.poll_seconds:
                self.last_poll = now
                stop = self._poll()
                if stop is not None:
                    return stop
            self._wait_for_results()
            self._record_due()
            self._renew_if_due()

    def _poll(self) -> StopReason | None:
        """Read the jobs, take this worker's shares, claim rows where needed."""
        if self.started is None:
            self.started = time.monotonic()
        may_claim = time.monotonic() - self.started < self.config.claim_seconds
        jobs = grants.jobs_to_serve(only_job=self.only_job)
        if self.only_job is not None and not jobs:
            return StopReason.JOB_ENDED
        seen = {job.job_id for job in jobs}
        for job_id in [job_id for job_id in self.served if job_id not in seen]:
            self._drop(job_id)
        demands, limits, wanting = [], {}, {}
        for job in jobs:
            served = self.served.get(job.job_id)
            if served is not None:
                # Rows come back to pending (a dead worker's, or a leaving
                # one's) after a claim found none left.
                served.pending_left = served.pending_left or job.has_pending
            in_flight, waiting = self.pool.counts(job.job_id)
            wants_rows = may_claim and (served.pending_left if served else job.has_pending)
            wanting[job.job_id] = wants_rows or waiting > 0
            limits[job.job_id] = job.slots.fair_share(self.worker_id, wants=wanting[job.job_id])
            demands.append(
                Demand(
                    job=job.job_id,
                    owner=job.owner_id,
                    wants=limits[job.job_id] if wanting[job.job_id] else in_flight,
                    rank=(job.created_at, str(job.job_id)),
                )
            )
        shares = owner_then_job_shares(
            self.config.concurrency, demands, owner_cap=self.config.user_max_concurrency
        )
        for job in jobs:
            self._take_share(job, shares[job.job_id], wants=wanting[job.job_id])
        for job_id in list(self.served):
            self._claim_for(job_id, may_claim)
        self._ask_for_help_if_short(
            sum(
                job.slots.max_workers - job.slots.held_by_others(self.worker_id)
                for job in jobs
                if wanting[job.job_id]
            )
        )
        return self._stop_reason(may_claim)

    def _take_share(self, job: grants.JobToServe, share: int, *, wants: bool) -> None:
        """Set the job's cap on this worker to its share, as far as its grant
        allows. A cap is lowered before the grant, and a grant never drops
        below the calls running."""
        held = job.slots.grants.get(self.worker_id)
        in_flight = self.pool.lower_cap(job.job_id, share)
        wanted = max(share, in_flight)
        if held is None and wanted == 0:
            return
        if job.job_id not in self.served and (wanted == 0 or not self._serve_job(job)):
            return
        if job.state == JobState.QUEUED:
            lifecycle.job_mark_running(job_id=job.job_id)
        if held == (wanted, wants):
            granted = wanted
        else:
            granted = grants.set_slots(
                job_id=job.job_id, worker_id=self.worker_id, slots=wanted, in_flight=in_flight, wants=wants
            )
            if granted is None:  # no longer running
                self._drop(job.job_id)
                return
        cap = min(share, granted)
        self.served[job.job_id].cap = cap
        self.pool.set_cap(job.job_id, cap)

    def _serve_job(self, job: grants.JobToServe) -> bool:
        # Never a batch job (grants.jobs_to_serve leaves them out): its rows are the provider's batches'.
        found = ExtractJob.objects.filter(pk=job.job_id, mode=JobMode.ONLINE).first()
        if found is None:
            return False
        spec = extraction_spec(found, self.config)
        self.served[job.job_id] = _Served(
            job=found,
            spec=spec,
            cache_keys=CacheKeys(spec, base_url=self.config.base_url),
            budgeted=(
                found.max_total_tokens is not None
                or found.max_cost_usd is not None
                or settings.STRINGSIGHT_USER_DAILY_BUDGET_USD is not None
            ),
        )
        return True

    def _drop(self, job_id) -> None:
        """The job stopped running, or this worker leaves it: no call of it
        starts any more and its calls in flight are cancelled."""
        self.pool.stop(job_id)
        self.pool.forget(job_id)
        served = self.served.pop(job_id, None)
        if served is not None and served.arrived:
            self._record(job_id, served, served.arrived)
        grants.release_slots(job_id=job_id, worker_id=self.worker_id)

    def _claim_for(self, job_id, may_claim: bool) -> None:
        """Claim rows so the job's calls never wait for this thread: as many
        as its cap again, unless it has a budget."""
        for _ in range(CACHED_CLAIMS_PER_POLL):
            served = self.served.get(job_id)
            if served is None or not (may_claim and served.pending_left and served.cap > 0):
                return
            in_flight, waiting = self.pool.counts(job_id)
            ready = 0 if served.budgeted else max(served.cap, READY_ROWS)
            wanted = served.cap + ready - in_flight - waiting
            if wanted < max(1, ready // 2) and (in_flight or waiting):
                return
            claim = claims.claim_rows(job_id=job_id, worker_id=self.worker_id, limit=wanted)
            if not claim.job_running:
                self._drop(job_id)
                return
            served.pending_left = claim.pending_left
            if not self._dispatch(job_id, served, claim.rows):
                return  # calls started: the next claim can wait for the next poll

    def _dispatch(self, job_id, served: _Served, rows: list[ClaimedRow]) -> bool:
        """Answer rows from the completion cache where it can, and hand every
        other row to the pool. True when every row was answered at once."""
        prepared = [(row, build_messages(row.data, served.spec)) for row in rows]
        keys = {row.id: served.cache_keys.key(messages) for row, messages in prepared}
        hits = cache.cached_answers(keys=list(keys.values())) if served.job.use_cache else {}
        answered, calls = [], []
        for row, messages in prepared:
            key = keys[row.id]
            if key in hits:
                outcome = outcome_from_answer(
                    hits[key], row.data, question_id=row.question_id, spec=served.spec
                )
                answered.append((row, outcome))
            else:
                calls.append((row, functools.partial(self._call, served.spec, row, messages, key)))
        self.pool.add(job_id, calls)
        if answered:
            self._record(job_id, served, answered)
        return bool(rows) and not calls

    def _call(self, spec: ExtractionSpec, row: ClaimedRow, messages: list[dict], key: str):
        return extract_row(
            self.client,
            row.data,
            question_id=row.question_id,
            spec=spec,
            messages=messages,
            key=key,
            gate=self.gate,
        )

    def _ask_for_help_if_short(self, wanted: int) -> None:
        """The jobs' max_workers not held by other workers add up to more
        calls than this one makes: one more worker process (on any machine)
        may take part, if the broker has no task waiting already."""
        now = time.monotonic()
        if self.only_job is not None or wanted <= self.config.concurrency:
            return
        if now - self.last_help < HELP_WANTED_SECONDS:
            return
        self.last_help = now
        lifecycle.wake_a_worker()

    def _stop_reason(self, may_claim: bool) -> StopReason | None:
        busy = self.pool.total_in_flight() or any(
            served.arrived or (may_claim and served.pending_left) or self.pool.counts(job_id)[1]
            for job_id, served in self.served.items()
        )
        if busy:
            self.idle_since = None
            return None
        now = time.monotonic()
        if self.idle_since is None:
            self.idle_since = now
        if now - self.idle_since < self.config.idle_seconds:
            return None
        if not may_claim:
            return StopReason.TIME_UP
        return StopReason.NOTHING_TO_DO

    # Results.

    def _wait_for_results(self) -> None:
        """Wait for results until the next poll or the next record is due."""
        wake = self.last_poll + self.config.poll_seconds
        for served in self.served.values():
            if served.arrived:
                wake = min(wake, served.last_record + (0.0 if served.budgeted else RECORD_SECONDS))
        try:
            arrivals = [self.results.get(timeout=max(0.0, wake - time.monotonic()))]
        except queue.Empty:
            return
        while True:
            try:
                arrivals.append(self.results.get_nowait())
            except queue.Empty:
                break
        for job_id, row, answer in arrivals:
            served = self.served.get(job_id)
            if served is not None:  # else the job was dropped: its answers are not stored
                served.arrived.append((row, answer))

    def _record_due(self) -> None:
        now = time.monotonic()
        for job_id, served in list(self.served.items()):
            if served.arrived and (served.budgeted or now - served.last_record >= RECORD_SECONDS):
                arrived, served.arrived = served.arrived, []
                served.last_record = now
                self._record(job_id, served, arrived)

    def _record(self, job_id, served: _Served, arrived: list) -> None:
        """Store the results; a fatal answer (bad credentials, unknown model)
        ends the job after what arrived with it is stored."""
        results = []
        for row, answer in arrived:
            if isinstance(answer, LLMCallError):
                self._store(job_id, served, results)
                lifecycle.job_fail(job_id=job_id, error=str(answer))
                self._drop(job_id)
                return
            if isinstance(answer, BaseException):
                log.error("job %s row %d: extraction crashed", job_id, row.index, exc_info=answer)
                answer = RowOutcome(error=f"internal error while extracting: {type(answer).__name__}")
            results.append((row, answer))
        if not self._store(job_id, served, results):
            self._drop(job_id)

    def _store(self, job_id, served: _Served, results: list) -> bool:
        """False once the job is no longer running."""
        if not results:
            return True
        recorded = claims.record_row_results(
            job_id=job_id, worker_id=self.worker_id, results=results, model_name=served.job.model_name
        )
        self.recorded += recorded.stored
        return recorded.job_running

    def _renew_if_due(self) -> None:
        """The heartbeat: on this thread's clock, whatever the calls are
        doing (a call may outlast a lease); it also tells the status how
        many calls each job has in flight."""
        now = time.monotonic()
        if now - self.last_renewal < min(1.0, self.config.lease_seconds / RENEWALS_PER_LEASE):
            return
        self.last_renewal = now
        claims.renew_leases(
            worker_id=self.worker_id,
            in_flight={job_id: self.pool.counts(job_id)[0] for job_id in self.served},
        )
