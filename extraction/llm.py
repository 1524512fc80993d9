"""One chat completion against any OpenAI-compatible endpoint, with a retry
budget of our own.

The SDK's retries are off (`max_retries=0`) so that `max_attempts` is the
real number of calls, and every wait is an `asyncio.sleep` that a cancel
interrupts at once.
"""

import asyncio
import email.utils
import functools
import random
import re
import time
import urllib.parse
from dataclasses import dataclass, replace
from typing import Any

import openai
from openai.types.chat import ChatCompletion

from stringsight_site import perf


@dataclass(frozen=True)
class CallSettings:
    model: str
    temperature: float
    top_p: float
    max_tokens: int
    timeout: float = 120.0
    max_attempts: int = 4
    retry_base: float = 1.0
    retry_max: float = 60.0
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int


class LLMCallError(Exception):
    """A call that failed for good. `fatal_for_job` marks failures that every
    other row would hit too (bad credentials, unknown model)."""

    def __init__(
        self,
        message: str,
        *,
        fatal_for_job: bool,
        attempts: int,
        raw_answer: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ):
        super().__init__(message)
        self.fatal_for_job = fatal_for_job
        self.attempts = attempts
        self.raw_answer = raw_answer
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)


def make_client(*, api_key: str | None, base_url: str | None, timeout: float) -> openai.AsyncOpenAI:
    """The SDK over its aiohttp transport, which costs a worker much less
    CPU per call than the default httpx one (BENCHMARKS.md, "What changed"). A missing key is the
    endpoint's to refuse (401), so the job reports it like any other bad
    credential instead of crashing the worker."""
    return openai.AsyncOpenAI(
        api_key=api_key or "missing",
        base_url=base_url,
        timeout=timeout,
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(timeout=timeout),
    )


async def complete(
    client: openai.AsyncOpenAI, messages: list[dict[str, Any]], call: CallSettings
) -> Completion:
    attempt = 0
    while True:
        attempt += 1
        try:
            # The SDK's typed create() walks every request through its
            # TypedDict transform (a large part of a call's CPU); ours is plain
            # JSON already, so it goes through the SDK's generic post(), as
            # bytes (its `content`) that the SDK sends as they are.
            response = await client.post(
                "/chat/completions", content=request_body(messages, call), cast_to=ChatCompletion
            )
        except RETRYABLE as exc:
            if attempt >= call.max_attempts:
                raise LLMCallError(
                    f"{describe(exc, client.api_key)}; gave up after {attempt} attempts",
                    fatal_for_job=False,
                    attempts=attempt,
                ) from None
            await asyncio.sleep(backoff_seconds(attempt, retry_after_seconds(exc), call))
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise LLMCallError(
                f"LLM authentication failed ({exc.status_code}): check OPENAI_API_KEY",
                fatal_for_job=True,
                attempts=attempt,
            ) from None
        except openai.NotFoundError:
            raise LLMCallError(
                f"LLM model not found (404): check model_name {call.model!r} and OPENAI_BASE_URL",
                fatal_for_job=True,
                attempts=attempt,
            ) from None
        except openai.BadRequestError as exc:
            if call.response_format is not None and rejects_response_format(exc):
                # Endpoints without structured outputs say so with a 400; the
                # parser reads free text, so ask again without it.
                call = replace(call, response_format=None)
                continue
            raise LLMCallError(describe(exc, client.api_key), fatal_for_job=False, attempts=attempt) from None
        except openai.APIStatusError as exc:
            raise LLMCallError(describe(exc, client.api_key), fatal_for_job=False, attempts=attempt) from None
        else:
            return completion_from(response, attempt)


def request_arguments(messages: list[dict[str, Any]], call: CallSettings) -> dict[str, Any]:
    arguments = {
        "model": call.model,
        "messages": messages,
        "temperature": call.temperature,
        "top_p": call.top_p,
        "max_tokens": call.max_tokens,
    }
    if call.response_format is not None:
        arguments["response_format"] = call.response_format
    return arguments


def request_body(messages: list[dict[str, Any]], call: CallSettings) -> bytes:
    """The request as the JSON the SDK would send (json.dumps, compact,
    non-ASCII as it is), written by orjson (perf.json_dumps): with json's
    encoder it would be a visible part of a worker's CPU per row (#2)."""
    return perf.json_dumps(request_arguments(messages, call))


def completion_from(response: Any, attempts: int) -> Completion:
    usage = response.usage
    prompt_tokens = usage.prompt_tokens if usage else 0
    completion_tokens = usage.completion_tokens if usage else 0
    if not response.choices:
        raise LLMCallError(
            "the LLM answered with no choices",
            fatal_for_job=False,
            attempts=attempts,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
    choice = response.choices[0]
    text = choice.message.content or ""
    refusal = getattr(choice.message, "refusal", None)
    if refusal:
        raise LLMCallError(
            f"the LLM refused: {refusal}",
            fatal_for_job=False,
            attempts=attempts,
            raw_answer=text or refusal,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
    return Completion(
        text=text,
        finish_reason=choice.finish_reason or "",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        attempts=attempts,
    )


def describe(exc: openai.APIError, api_key: str | None = None) -> str:
    """A short reason for a row's error, safe to store and show: the
    endpoint's own words can quote credentials back, so those are redacted."""
    if isinstance(exc, openai.APITimeoutError):
        return "LLM call timed out"
    if isinstance(exc, openai.APIConnectionError):
        return "could not connect to the LLM endpoint"
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    message = str(message or getattr(exc, "message", "") or exc).strip().rstrip(".")
    return f"LLM error {status}: {redact(message, api_key)[:300]}"


_CREDENTIALS = re.compile(r"(?i)\b(?:bearer\s+\S+|sk-[a-z0-9_\-*]{6,})")
# A run this long of the key is taken for the key: enough to cut a guess
# at it short, too long to strike ordinary words.
KEY_FRAGMENT = 8


def redact(text: str, api_key: str | None = None) -> str:
    """`text` with the key struck out: the whole key, any run of
    KEY_FRAGMENT or more of its characters, its URL-encoded forms, and
    anything that looks like a bearer token or an OpenAI key."""
    if api_key and text:
        spans = sorted(span for pattern in _key_patterns(api_key) for span in _runs(text, *pattern))
        parts, position = [], 0
        for start, end in spans:
            if end <= position:
                continue
            if start > position:
                parts.append(text[position:start])
            if not parts or parts[-1] != "[redacted]":
                parts.append("[redacted]")
            position = end
        parts.append(text[position:])
        text = "".join(parts)
    return _CREDENTIALS.sub("[redacted]", text)


@functools.lru_cache(maxsize=8)
def _key_patterns(api_key: str) -> tuple[tuple[re.Pattern, str], ...]:
    """For the key and each URL-encoded spelling of it: a pattern finding
    any KEY_FRAGMENT characters of it, and the spelling."""
    patterns = []
    for key in {api_key, urllib.parse.quote(api_key, safe=""), urllib.parse.quote_plus(api_key)}:
        run = min(KEY_FRAGMENT, len(key))
        grams = sorted({key[at : at + run] for at in range(len(key) - run + 1)})
        patterns.append((re.compile("|".join(map(re.escape, grams))), key))
    return tuple(patterns)


def _runs(text: str, fragments: re.Pattern, key: str) -> list[tuple[int, int]]:
    """Where runs of `key`'s characters stand in `text`: each fragment found,
    stretched as far as the run goes on matching the key."""
    spans, position = [], 0
    while found := fragments.search(text, position):
        start, end = found.span()
        while end < len(text) and text[start : end + 1] in key:
            end += 1
        spans.append((start, end))
        position = end
    return spans


def rejects_response_format(exc: openai.BadRequestError) -> bool:
    text = f"{getattr(exc, 'message', '')} {exc.body}".lower()
    return "response_format" in text or "json_schema" in text


def retry_after_seconds(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    if (value := headers.get("retry-after-ms")) is not None:
        try:
            return float(value) / 1000
        except ValueError:
            return None
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def backoff_seconds(attempt: int, retry_after: float | None, call: CallSettings) -> float:
    """Exponential backoff with full jitter; a server's Retry-After is a
    floor. Both are capped by retry_max so a row's wait stays bounded."""
    jittered = random.uniform(0, min(call.retry_max, call.retry_base * 2 ** (attempt - 1)))
    if retry_after is not None:
        return min(call.retry_max, max(retry_after, jittered))
    return jittered
