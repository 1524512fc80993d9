"""A row as a Batch API request line, and a result line back as the row's
outcome. The request body is the online call's (extraction.llm), and an
answer is parsed as an online answer is (extraction.extract), so the two
modes differ only in transport and price."""

from dataclasses import dataclass
from typing import Any

import orjson
from openai.types.chat import ChatCompletion

from extraction.extract import ExtractionSpec, RowOutcome, outcome_from_answer
from extraction.llm import LLMCallError, completion_from, redact, request_arguments
from stringsight_site import perf

from ..services.sql import ClaimedRow

CHAT_URL = "/v1/chat/completions"


def custom_id(job_id, row_index: int, attempt: int) -> str:
    return f"{job_id}:{row_index}:{attempt}"


def request_line(
    *, job_id, row_index: int, attempt: int, messages: list[dict], spec: ExtractionSpec
) -> bytes:
    return (
        perf.json_dumps(
            {
                "custom_id": custom_id(job_id, row_index, attempt),
                "method": "POST",
                "url": CHAT_URL,
                "body": request_arguments(messages, spec.call),
            }
        )
        + b"\n"
    )


@dataclass(frozen=True)
class ResultLine:
    """One line of a batch's output or error file: the chat completion the
    provider answered, or why it has none."""

    row_index: int
    completion: dict[str, Any] | None = None
    failure: str | None = None


def read_result_line(raw: bytes, *, job_id, api_key: str | None) -> ResultLine | None:
    """None for a line that names no row of this job (not ours to record)."""
    try:
        line = orjson.loads(raw)
        job, row_index, _attempt = str(line["custom_id"]).split(":")
        row_index = int(row_index)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if job != str(job_id):
        return None
    response = line.get("response") or {}
    status = response.get("status_code")
    body = response.get("body")
    if status == 200 and isinstance(body, dict) and not line.get("error"):
        return ResultLine(row_index=row_index, completion=body)
    return ResultLine(row_index=row_index, failure=redact(_failure_reason(line, status, body), api_key))


def _failure_reason(line: dict, status, body) -> str:
    error = line.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    code = error.get("code") or (f"status {status}" if status else "no answer")
    message = str(error.get("message") or "").strip().rstrip(".")
    return f"the provider's batch failed this line ({code}){': ' + message if message else ''}"[:500]


def outcome_of(
    line: ResultLine, row: ClaimedRow, spec: ExtractionSpec, *, api_key: str | None, cache_key: str | None
) -> RowOutcome:
    """The row's outcome from its answered line, as extraction.extract
    makes it from a live answer: a refusal or an answer with no choice
    fails the row with its tokens; an answer is parsed and validated;
    only an answer that gave properties is worth caching."""
    response = ChatCompletion.construct(**line.completion)
    try:
        completion = completion_from(response, attempts=1)
    except LLMCallError as exc:
        return RowOutcome(
            raw_answer=redact(exc.raw_answer, api_key),
            prompt_tokens=exc.prompt_tokens,
            completion_tokens=exc.completion_tokens,
            attempts=exc.attempts,
            error=str(exc),
        )
    text = redact(completion.text, api_key)
    outcome = outcome_from_answer(
        text, row.data, question_id=row.question_id, spec=spec, completion=completion
    )
    if outcome.error is None:
        outcome.cache_key = cache_key
    return outcome
