"""One row in, one outcome out: render, call the LLM (or reuse a cached
answer), parse, validate."""

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import openai

from .gate import OPEN_GATE, Gate
from .llm import CallSettings, Completion, LLMCallError, complete, redact
from .parse import parse_properties
from .render import render_row

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
NO_PROPERTY = "no valid property in the LLM answer"


@dataclass(frozen=True)
class ExtractionSpec:
    method: str
    system_prompt: str
    call: CallSettings
    include_scores: bool = False
    # An answer's properties beyond this many are dropped (and counted as
    # dropped): one answer could otherwise fill a job with thousands.
    max_properties: int = 50


@dataclass
class RowOutcome:
    """What a row's extraction produced. `error` set means the row failed;
    its raw answer and token usage are kept all the same. `cache_key` is set
    when the answer came from the LLM just now and is worth caching.
    `problems` says what the parser could not use in the answer."""

    properties: list[dict[str, Any]] = field(default_factory=list)
    raw_answer: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    dropped: int = 0
    error: str | None = None
    cached: bool = False
    cache_key: str | None = None
    problems: list[str] = field(default_factory=list)


def build_messages(row: dict[str, Any], spec: ExtractionSpec) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": spec.system_prompt},
        {"role": "user", "content": render_row(row, spec.method, include_scores=spec.include_scores)},
    ]


class CacheKeys:
    """Identical requests to the same endpoint share a key: the endpoint,
    model, every sampling parameter and the messages. The fixed part is
    hashed once per job; each row adds only its messages."""

    def __init__(self, spec: ExtractionSpec, *, base_url: str | None):
        call = spec.call
        fixed = {
            "endpoint": (base_url or OPENAI_DEFAULT_BASE_URL).rstrip("/"),
            "model": call.model,
            "temperature": call.temperature,
            "top_p": call.top_p,
            "max_tokens": call.max_tokens,
            "response_format": call.response_format,
        }
        self._fixed = hashlib.sha256(json.dumps(fixed, sort_keys=True, separators=(",", ":")).encode())

    def key(self, messages: list[dict[str, str]]) -> str:
        digest = self._fixed.copy()
        for message in messages:
            # Lengths delimit the parts, so no two message lists hash alike.
            for part in (message["role"], message["content"]):
                encoded = part.encode()
                digest.update(len(encoded).to_bytes(8, "big"))
                digest.update(encoded)
        return digest.hexdigest()


def model_names(row: dict[str, Any], method: str) -> tuple[str, ...]:
    if method == "side_by_side":
        return (str(row["model_a"]), str(row["model_b"]))
    return (str(row["model"]),)


def outcome_from_answer(
    text: str,
    row: dict[str, Any],
    *,
    question_id: str,
    spec: ExtractionSpec,
    completion: Completion | None = None,
) -> RowOutcome:
    """Parse an answer, fresh (`completion` given) or from the cache."""
    parsed = parse_properties(
        text, method=spec.method, model_names=model_names(row, spec.method), question_id=question_id
    )
    kept = parsed.properties[: spec.max_properties]
    beyond = len(parsed.properties) - len(kept)
    outcome = RowOutcome(
        properties=kept, raw_answer=text, dropped=parsed.dropped + beyond, problems=parsed.problems
    )
    if completion is None:
        outcome.cached = True
    else:
        outcome.prompt_tokens = completion.prompt_tokens
        outcome.completion_tokens = completion.completion_tokens
        outcome.attempts = completion.attempts
    if not parsed.properties:
        reasons = "; ".join(parsed.problems[:5]) or "the answer held no property"
        if completion is not None and completion.finish_reason == "length":
            reasons = f"cut off at max_tokens (finish_reason: length); {reasons}"
        outcome.error = f"{NO_PROPERTY}: {reasons}"
    return outcome


async def extract_row(
    client: openai.AsyncOpenAI,
    row: dict[str, Any],
    *,
    question_id: str,
    spec: ExtractionSpec,
    messages: list[dict[str, str]] | None = None,
    key: str | None = None,
    gate: Gate = OPEN_GATE,
) -> RowOutcome:
    """A row's outcome from the LLM (never from the cache). An answer that
    yields no valid property (prose instead of JSON, no item passing
    validation, cut off by max_tokens with nothing usable) is asked once
    more before the row fails: a model slips like that now and then, and
    the second answer usually parses. Both calls count in `attempts` and
    the tokens. Raises LLMCallError only when the failure is fatal for the
    whole job. Each call passes through `gate`, the endpoint's limits."""
    messages = messages or build_messages(row, spec)
    first = await _ask(client, messages, row, question_id=question_id, spec=spec, gate=gate)
    outcome = first
    if unusable_answer(first):
        second = await _ask(client, messages, row, question_id=question_id, spec=spec, gate=gate)
        outcome = asked_twice(first, second)
    # Only answers that gave properties are worth reusing: a failed answer
    # should be asked again next time.
    if outcome.error is None:
        outcome.cache_key = key
    return outcome


async def _ask(
    client: openai.AsyncOpenAI,
    messages: list[dict[str, str]],
    row: dict[str, Any],
    *,
    question_id: str,
    spec: ExtractionSpec,
    gate: Gate = OPEN_GATE,
) -> RowOutcome:
    try:
        completion = await complete(client, messages, spec.call, gate)
    except LLMCallError as exc:
        if exc.fatal_for_job:
            raise
        return RowOutcome(
            raw_answer=redact(exc.raw_answer, client.api_key),
            prompt_tokens=exc.prompt_tokens,
            completion_tokens=exc.completion_tokens,
            attempts=exc.attempts,
            error=str(exc),
        )
    # An answer can quote the key back (from a transcript, or a prompt
    # that asks for it): what is stored, cached and shown never holds it.
    text = redact(completion.text, client.api_key)
    return outcome_from_answer(text, row, question_id=question_id, spec=spec, completion=completion)


def unusable_answer(outcome: RowOutcome) -> bool:
    """The LLM answered, but with no valid property (not a refusal, nor a
    call that failed for good: asking again would not change those)."""
    return outcome.error is not None and outcome.error.startswith(NO_PROPERTY)


def asked_twice(first: RowOutcome, second: RowOutcome) -> RowOutcome:
    """The second answer's outcome, paying for both calls; if it failed
    too, its error gives both reasons."""
    second.attempts += first.attempts
    second.prompt_tokens += first.prompt_tokens
    second.completion_tokens += first.completion_tokens
    if second.error is not None:
        again = second.error.removeprefix(f"{NO_PROPERTY}: ")
        second.error = (
            f"{NO_PROPERTY}, asked twice. First answer: {first.error.removeprefix(f'{NO_PROPERTY}: ')}. "
            f"Second answer: {again}"
        )
    return second
