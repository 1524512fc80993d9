"""One row extracted inside a web request (/extract/single, the StringSight
frontend's "Extract on Row N").

It is a one-row job that the request runs itself instead of a worker, with
a worker's own steps: the completion cache first, then the LLM call with
its retries, the parser, and the same recording of the result (tokens,
cost, properties). The call runs on an asyncio loop in the request's
thread, stepped a poll interval at a time; between steps the request
checks that its client is still connected, that the job still runs (a
cancel from the admin or the API stops it) and that the deadline has not
passed. Stopping cancels the call, which closes its connection.
"""

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extraction.extract import CacheKeys, RowOutcome, build_messages, extract_row, outcome_from_answer
from extraction.llm import LLMCallError, make_client

from .models import ExtractJob, JobState
from .services import cache, claims, lifecycle, provider_limits, sql
from .services.params import JobParams
from .worker.engine import WorkerSettings, extraction_spec

log = logging.getLogger(__name__)


class Ended:
    """How a single extraction ended, beside a recorded result."""

    HUNG_UP = "hung_up"  # the client left: the job is cancelled
    CANCELLED = "cancelled"  # the job was cancelled (or failed) by someone else
    TIMED_OUT = "timed_out"  # no answer within the deadline: the row failed
    LLM_FAILED = "llm_failed"  # the LLM refused the job (credentials, model): the job is in error
    RECORDED = "recorded"  # the row's outcome (done, or failed) is stored


@dataclass(frozen=True)
class SingleResult:
    job: ExtractJob
    ended: str
    outcome: RowOutcome | None = None


def deadline_seconds(config: WorkerSettings) -> float:
    """How long a single extraction may take: one call's full timeout plus
    the longest wait before a retry. Retries after quick failures (a 429, a
    500) fit in it; a second full-length call does not, since a browser
    waits for the answer."""
    return config.llm_timeout + config.retry_max


def extract_single(
    *,
    owner,
    row: dict[str, Any],
    params: JobParams,
    encoded_row: str,
    hung_up: Callable[[], bool] = lambda: False,
    config: WorkerSettings | None = None,
) -> SingleResult:
    config = config or WorkerSettings.from_django()
    worker_id = f"web:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    job, claimed = lifecycle.single_row_start(
        owner=owner, row=row, params=params, encoded_row=encoded_row, worker_id=worker_id
    )
    if claimed is None:
        return SingleResult(job=job, ended=Ended.CANCELLED)
    try:
        outcome, ended = _extract(job, claimed, config, worker_id, hung_up)
    except LLMCallError as exc:
        failed = lifecycle.job_fail(job_id=job.id, error=str(exc))
        job.refresh_from_db()
        # Not failed: a cancel got there first.
        return SingleResult(job=job, ended=Ended.LLM_FAILED if failed else Ended.CANCELLED)
    except BaseException as exc:
        # The job must not stay running with nobody working on it.
        lifecycle.job_fail(job_id=job.id, error=f"internal error while extracting: {type(exc).__name__}")
        raise
    if ended == Ended.HUNG_UP:
        lifecycle.job_cancel(job=job)
        log.info("job %s: the client hung up; the extraction was cancelled", job.id)
    elif outcome is not None:
        recorded = claims.record_row_results(
            job_id=job.id, worker_id=worker_id, results=[(claimed, outcome)], model_name=job.model_name
        )
        if not recorded.stored:
            ended = Ended.CANCELLED
    job.refresh_from_db()
    return SingleResult(job=job, ended=ended, outcome=outcome)


def _extract(
    job: ExtractJob,
    row: sql.ClaimedRow,
    config: WorkerSettings,
    worker_id: str,
    hung_up: Callable[[], bool],
) -> tuple[RowOutcome | None, str]:
    spec = extraction_spec(job, config)
    messages = build_messages(row.data, spec)
    key = CacheKeys(spec, base_url=config.base_url).key(messages)
    if job.use_cache and (answer := cache.cached_answers(keys=[key]).get(key)) is not None:
        return outcome_from_answer(answer, row.data, question_id=row.question_id, spec=spec), Ended.RECORDED
    deadline = time.monotonic() + deadline_seconds(config)
    loop = asyncio.new_event_loop()
    client = call = gate = None
    try:
        client = make_client(api_key=config.api_key, base_url=config.base_url, timeout=config.llm_timeout)
        # The endpoint's limits hold for this call too, as for the workers'.
        gate = provider_limits.shared_gate(api_key=config.api_key, base_url=config.base_url)
        call = loop.create_task(
            extract_row(
                client,
                row.data,
                question_id=row.question_id,
                spec=spec,
                messages=messages,
                key=key,
                gate=gate,
            )
        )
        last_lease = time.monotonic()
        while True:
            # The loop runs only inside this step, so the checks between
            # steps may use the database (Django refuses it under a running loop).
            loop.run_until_complete(asyncio.wait([call], timeout=config.poll_seconds))
            if call.done():
                return call.result(), Ended.RECORDED
            if hung_up():
                return None, Ended.HUNG_UP
            if lifecycle.job_state(job_id=job.id) != JobState.RUNNING:
                return None, Ended.CANCELLED
            if time.monotonic() >= deadline:
                return _timed_out(config), Ended.TIMED_OUT
            if time.monotonic() - last_lease >= config.lease_seconds / 3:
                # So that the sweep never takes the row for a dead worker's.
                last_lease = time.monotonic()
                claims.renew_leases(worker_id=worker_id, in_flight={job.id: 1})
    finally:
        # Cancelling the call closes its connection: the LLM endpoint sees it end.
        if call is not None:
            call.cancel()
            loop.run_until_complete(asyncio.gather(call, return_exceptions=True))
        if client is not None:
            loop.run_until_complete(client.close())
        # The gate's settles with the store, if one is under way.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            # (gather() of nothing would make its future on another loop.)
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
        if gate is not None:
            gate.close()


def _timed_out(config: WorkerSettings) -> RowOutcome:
    return RowOutcome(
        error=f"no answer within {deadline_seconds(config):g} s "
        "(STRINGSIGHT_LLM_TIMEOUT + STRINGSIGHT_RETRY_MAX_SECONDS); the call was cancelled",
        attempts=1,
    )
