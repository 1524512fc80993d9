"""One chat completion against any OpenAI-compatible endpoint, with a retry
budget of our own.

The SDK's retries are off (`max_retries=0`) so that `max_attempts` is the
real number of calls, and every wait is an `asyncio.sleep` that a cancel
interrupts at once.

Every call passes through a gate (extraction.gate): the endpoint's shared
limits decide when it may start, and hear how it went. An answer that says
the endpoint's rate is exceeded does not spend one of the row's attempts:
the gate slows every caller of the endpoint down instead. Answers that
every other row would get too (a spent quota, a refused key, an unknown
model) end the job.
"""

import asyncio
import email.utils
import functools
import random
import re
import time
import urllib.parse
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import openai
from openai._constants import RAW_RESPONSE_HEADER
from openai.types.chat import ChatCompletion

from stringsight_site import perf

from .gate import OPEN_GATE, Gate, RateLimitInfo


@dataclass(frozen=True)
class CallSettings:
    model: str
    temperature: float
    top_p: float
    max_tokens: int
    timeout: float = 120.0
    max_attempts: int = 4
    # Answers refused for the endpoint's rate (not counted in max_attempts)
    # that one call may meet before its row fails.
    rate_limit_attempts: int = 16
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
    other row would hit too (a spent quota, bad credentials, unknown model).
    `rate_limit` is what the endpoint's headers said of its limits."""

    def __init__(
        self,
        message: str,
        *,
        fatal_for_job: bool,
        attempts: int,
        raw_answer: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        rate_limit: RateLimitInfo | None = None,
    ):
        super().__init__(message)
        self.rate_limit = rate_limit
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
    client: openai.AsyncOpenAI, messages: list[dict[str, Any]], call: CallSettings, gate: Gate = OPEN_GATE
) -> Completion:
    body = request_body(messages, call)
    # What the endpoint's token rate counts for a call: its prompt (about
    # four bytes a token, as providers estimate it before the call) and
    # the answer it may get.
    rate_tokens = len(body) // 4 + call.max_tokens
    attempt = calls = rate_limited = 0
    while True:
        attempt += 1
        failure: openai.APIError | None = None
        info: RateLimitInfo | None = None
        async with gate.call(call.model, rate_tokens) as permit:
            calls += 1
            try:
                # The SDK's typed create() walks every request through its
                # TypedDict transform (a third of a call's CPU); ours is plain
                # JSON already, so it goes through the SDK's generic post(), as
                # bytes (its `content`) that the SDK sends as they are. The raw
                # response keeps the headers, which tell the gate the
                # endpoint's limits.
                raw = await client.post(
                    "/chat/completions",
                    content=body,
                    cast_to=ChatCompletion,
                    options={"headers": {RAW_RESPONSE_HEADER: "true"}},
                )
            except openai.APIError as exc:
                failure = exc
                info = rate_limit_info(getattr(getattr(exc, "response", None), "headers", None))
                if info is not None or is_rate_limited(exc):
                    permit.report(rate_limit=info, rate_limited=is_rate_limited(exc))
            else:
                response = raw.parse()
                usage = response.usage
                permit.report(
                    rate_limit=rate_limit_info(raw.headers),
                    tokens=(usage.prompt_tokens + usage.completion_tokens) if usage else 0,
                )
                return completion_from(response, calls)
        fatal = fatal_message(failure, call.model, client.api_key)
        if fatal is not None:
            raise LLMCallError(fatal, fatal_for_job=True, attempts=calls, rate_limit=info) from None
        if is_rate_limited(failure):
            # The gate has slowed the endpoint down (and paused it, if the
            # answer said until when): asking again spends no attempt.
            attempt -= 1
            rate_limited += 1
            if rate_limited >= call.rate_limit_attempts:
                raise LLMCallError(
                    f"{describe(failure, client.api_key)}; gave up after {rate_limited} answers refused "
                    "for the endpoint's rate limit",
                    fatal_for_job=False,
                    attempts=calls,
                    rate_limit=info,
                ) from None
            await asyncio.sleep(backoff_seconds(rate_limited, retry_after_seconds(failure), call))
            continue
        if isinstance(failure, RETRYABLE):
            if attempt >= call.max_attempts:
                raise LLMCallError(
                    f"{describe(failure, client.api_key)}; gave up after {attempt} attempts",
                    fatal_for_job=False,
                    attempts=calls,
                ) from None
            await asyncio.sleep(backoff_seconds(attempt, retry_after_seconds(failure), call))
            continue
        if (
            isinstance(failure, openai.BadRequestError)
            and call.response_format is not None
            and rejects_response_format(failure)
        ):
            # Endpoints without structured outputs say so with a 400; the
            # parser reads free text, so ask again without it.
            call = replace(call, response_format=None)
            body = request_body(messages, call)
            continue
        raise LLMCallError(describe(failure, client.api_key), fatal_for_job=False, attempts=calls) from None


def is_rate_limited(exc: Exception) -> bool:
    """A 429 for the endpoint's rate, not for a spent quota."""
    return isinstance(exc, openai.RateLimitError) and not _quota_spent(exc)


def _error_field(exc: openai.APIError, name: str) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    value = body.get(name) if isinstance(body, dict) else None
    return str(value or "")


def _quota_spent(exc: openai.APIError) -> bool:
    return "insufficient_quota" in (_error_field(exc, "code"), _error_field(exc, "type"))


def fatal_message(exc: openai.APIError, model: str, api_key: str | None = None) -> str | None:
    """Why the job cannot go on, when the answer is one every other row
    would get too; None otherwise. The provider's own words are kept,
    with the key struck out."""
    said = _provider_words(exc, api_key)
    if isinstance(exc, openai.RateLimitError) and _quota_spent(exc):
        return f"the LLM provider says the key's quota is spent: {said}"
    if isinstance(exc, openai.AuthenticationError):
        return f"the LLM provider refused the API key (401): {said}; check OPENAI_API_KEY"
    if isinstance(exc, openai.PermissionDeniedError):
        return f"the LLM provider refused the API key (403): {said}"
    if isinstance(exc, openai.NotFoundError):
        return f"the LLM provider has no model {model!r} (404): {said}; check model_name and OPENAI_BASE_URL"
    return None


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
    return f"LLM error {status}: {_provider_words(exc, api_key)}"


def _provider_words(exc: openai.APIError, api_key: str | None) -> str:
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    message = str(message or getattr(exc, "message", "") or exc).strip().rstrip(".")
    return redact(message, api_key)[:300]


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


def rate_limit_info(headers) -> RateLimitInfo | None:
    """What an answer's headers say of the endpoint's limits (OpenAI's
    retry-after, retry-after-ms and x-ratelimit-* headers), or None when
    they say nothing."""
    if not headers:
        return None
    found = {
        "retry_after": retry_after_seconds(SimpleNamespace(response=SimpleNamespace(headers=headers))),
        "reset_requests": duration_seconds(headers.get("x-ratelimit-reset-requests")),
        "reset_tokens": duration_seconds(headers.get("x-ratelimit-reset-tokens")),
        "remaining_requests": _count(headers.get("x-ratelimit-remaining-requests")),
        "remaining_tokens": _count(headers.get("x-ratelimit-remaining-tokens")),
        "limit_requests": _count(headers.get("x-ratelimit-limit-requests")),
        "limit_tokens": _count(headers.get("x-ratelimit-limit-tokens")),
    }
    if all(value is None for value in found.values()):
        return None
    return RateLimitInfo(**found)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(value: str | None) -> float | None:
    """OpenAI's reset durations ("1s", "6m0s", "250ms", "1h2m3.5s"), or a bare number of seconds."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _count(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def backoff_seconds(attempt: int, retry_after: float | None, call: CallSettings) -> float:
    """Exponential backoff with full jitter; a server's Retry-After is a
    floor. Both are capped by retry_max so a row's wait stays bounded."""
    jittered = random.uniform(0, min(call.retry_max, call.retry_base * 2 ** (attempt - 1)))
    if retry_after is not None:
        return min(call.retry_max, max(retry_after, jittered))
    return jittered
