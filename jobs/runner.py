"""One chunk task's work on a job.

The calling thread owns the database: it claims rows, records each result
the moment it arrives and re-reads the job row at least every poll
interval. LLM calls run on an asyncio loop in a helper thread, up to the
job's max_workers at once. When the job stops running (cancelled, failed,
or done by another worker) every call in flight is cancelled, which closes
its connection, and its answer is never stored.
"""

import asyncio
import logging
import os
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

from django.conf import settings

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

from . import services
from .models import ExtractJob, JobState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerSettings:
    chunk_size: int
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
    # Stop claiming after this long, so a task ends well within django-q2's timeout.
    claim_seconds: float = 1800.0

    @classmethod
    def from_django(cls) -> "RunnerSettings":
        return cls(
            chunk_size=settings.STRINGSIGHT_CHUNK_SIZE,
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

    def submit(self, coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self, client) -> None:
        self.submit(_cancel_everything(client)).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


async def _cancel_everything(client) -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()


class ChunkRunner:
    def __init__(self, job_id, config: RunnerSettings):
        self.job_id = job_id
        self.config = config
        name = config.worker_name or socket.gethostname()
        self.worker_id = f"{name}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.in_flight: dict[int, Future] = {}
        self.recorded = 0

    def run(self) -> str:
        job = ExtractJob.objects.filter(pk=self.job_id, state=JobState.RUNNING).first()
        if job is None:
            return "job is not running: nothing to do"
        self.job = job
        self.spec = extraction_spec(job, self.config)
        self.cache_keys = CacheKeys(self.spec, base_url=self.config.base_url)
        self.loop_thread = _LoopThread()
        self.client = make_client(
            api_key=self.config.api_key, base_url=self.config.base_url, timeout=self.config.llm_timeout
        )
        try:
            stopped_because = self._work()
        finally:
            # Cancelling the tasks closes their connections before we return.
            self.loop_thread.close(self.client)
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
        max_workers = self.job.max_workers
        # Claiming costs a transaction, so wait until a few slots are free,
        # but never so many that the job runs well below its concurrency.
        claim_batch = max(1, max_workers // 16)
        claimed = 0
        pending_left = True
        last_check = last_lease = started = time.monotonic()
        while True:
            free = max_workers - len(self.in_flight)
            quota = self.config.chunk_size - claimed
            if time.monotonic() - started > self.config.claim_seconds:
                quota = 0  # the rest is left to the job's other tasks (or the sweep)
            if pending_left and quota > 0 and free > 0 and (free >= claim_batch or not self.in_flight):
                claim = services.claim_rows(
                    job_id=self.job_id, worker_id=self.worker_id, limit=min(free, quota)
                )
                last_check = time.monotonic()
                if not claim.job_running:
                    return "the job stopped running"
                claimed += len(claim.rows)
                pending_left = claim.pending_left
                stop = self._dispatch(claim.rows)
                if stop:
                    return stop
                if not claim.rows and not self.in_flight and pending_left:
                    # Other workers hold all of the job's slots; they make
                    # room as their calls finish, so ask again soon.
                    time.sleep(min(poll, 0.02))
                    continue
            if not self.in_flight:
                if pending_left and quota > 0:
                    continue  # every claimed row came from the cache: claim more
                return "no rows left to claim" if not pending_left else "chunk quota reached"

            stop = self._record_arrivals(timeout=poll)
            if stop:
                return stop
            now = time.monotonic()
            if now - last_check >= poll:
                last_check = now
                state = services.job_state(job_id=self.job_id)
                if state != JobState.RUNNING:
                    return f"the job is {state}"
            if now - last_lease >= self.config.lease_seconds / 3:
                last_lease = now
                services.renew_leases(job_id=self.job_id, worker_id=self.worker_id)

    def _dispatch(self, rows: list[services.ClaimedRow]) -> str | None:
        """Answer rows from the completion cache where it can, and start an
        LLM call for every other row."""
        prepared = [(row, build_messages(row.data, self.spec)) for row in rows]
        keys = {row.id: self.cache_keys.key(messages) for row, messages in prepared}
        hits = services.cached_answers(keys=list(keys.values())) if self.job.use_cache else {}
        answered = []
        for row, messages in prepared:
            key = keys[row.id]
            if key in hits:
                outcome = outcome_from_answer(
                    hits[key], row.data, question_id=row.question_id, spec=self.spec
                )
                answered.append((row, outcome))
                continue
            call = extract_row(
                self.client, row.data, question_id=row.question_id, spec=self.spec, messages=messages, key=key
            )
            future = self.loop_thread.submit(call)
            self.in_flight[row.id] = future
            future.add_done_callback(lambda done, row=row: self.results.put((row, done)))
        return self._record(answered)

    def _record_arrivals(self, timeout: float) -> str | None:
        """Record every result that has arrived, waiting up to `timeout` for
        the first. Returns why to stop, or None to go on."""
        try:
            arrivals = [self.results.get(timeout=timeout)]
        except queue.Empty:
            return None
        while True:
            try:
                arrivals.append(self.results.get_nowait())
            except queue.Empty:
                break
        results = []
        for row, future in arrivals:
            self.in_flight.pop(row.id, None)
            if future.cancelled():
                continue
            exc = future.exception()
            if isinstance(exc, LLMCallError):
                # Fatal for the job (bad credentials, unknown model): keep
                # what arrived with it, then end the job.
                self._record(results)
                services.job_fail(job_id=self.job_id, error=str(exc))
                return f"the job failed: {exc}"
            if exc is not None:
                log.error("job %s row %d: extraction crashed", self.job_id, row.index, exc_info=exc)
                results.append(
                    (row, RowOutcome(error=f"internal error while extracting: {type(exc).__name__}"))
                )
            else:
                results.append((row, future.result()))
        return self._record(results)

    def _record(self, results: list[tuple[services.ClaimedRow, RowOutcome]]) -> str | None:
        if not results:
            return None
        recorded = services.record_row_results(
            job_id=self.job_id, worker_id=self.worker_id, results=results, model_name=self.job.model_name
        )
        self.recorded += recorded.stored
        if recorded.job_running:
            return None
        return f"the job is {services.job_state(job_id=self.job_id)}"
