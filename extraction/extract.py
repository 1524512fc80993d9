"""One row in, one outcome out: render, call the LLM, parse, validate."""

from dataclasses import dataclass, field
from typing import Any

import openai

from .llm import CallSettings, LLMCallError, complete
from .parse import parse_properties
from .render import render_row


@dataclass(frozen=True)
class ExtractionSpec:
    method: str
    system_prompt: str
    call: CallSettings
    include_scores: bool = False


@dataclass
class RowOutcome:
    """What a row's extraction produced. `error` set means the row failed;
    its raw answer and token usage are kept all the same."""

    properties: list[dict[str, Any]] = field(default_factory=list)
    raw_answer: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    dropped: int = 0
    error: str | None = None


def build_messages(row: dict[str, Any], spec: ExtractionSpec) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": spec.system_prompt},
        {"role": "user", "content": render_row(row, spec.method, include_scores=spec.include_scores)},
    ]


def model_names(row: dict[str, Any], method: str) -> tuple[str, ...]:
    if method == "side_by_side":
        return (str(row["model_a"]), str(row["model_b"]))
    return (str(row["model"]),)


async def extract_row(
    client: openai.AsyncOpenAI, row: dict[str, Any], *, question_id: str, spec: ExtractionSpec
) -> RowOutcome:
    """Raises LLMCallError only when the failure is fatal for the whole job."""
    try:
        completion = await complete(client, build_messages(row, spec), spec.call)
    except LLMCallError as exc:
        if exc.fatal_for_job:
            raise
        return RowOutcome(
            raw_answer=exc.raw_answer,
            prompt_tokens=exc.prompt_tokens,
            completion_tokens=exc.completion_tokens,
            attempts=exc.attempts,
            error=str(exc),
        )
    parsed = parse_properties(
        completion.text,
        method=spec.method,
        model_names=model_names(row, spec.method),
        question_id=question_id,
    )
    outcome = RowOutcome(
        properties=parsed.properties,
        raw_answer=completion.text,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        attempts=completion.attempts,
        dropped=parsed.dropped,
    )
    if not parsed.properties:
        reasons = "; ".join(parsed.problems[:5]) or "the answer held no property"
        outcome.error = f"no valid property in the LLM answer: {reasons}"
    return outcome
