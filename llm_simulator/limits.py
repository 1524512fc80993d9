"""The provider's own limits, answered as OpenAI answers them: calls in
flight (``max_concurrency``), requests and tokens per minute (``rpm``,
``tpm``, with OpenAI's ``x-ratelimit-*`` headers on every answer and a 429
with ``retry-after`` beyond them), a spent quota (``quota_spent``: 429
``insufficient_quota``) and a key refused for the region (``forbidden``:
403). Each can be switched at run time through ``/_sim/config``.

A minute's allowance is a bucket that starts full and refills evenly, as
OpenAI describes its limits; tokens are counted as OpenAI counts them
before a call: the prompt at four characters a token, plus ``max_tokens``.
"""

from __future__ import annotations

import math
import time

QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)
FORBIDDEN_MESSAGE = "Country, region, or territory not supported"
LIMIT_OPTIONS = ("max_concurrency", "rpm", "tpm")


class _Bucket:
    """A minute's allowance, refilled evenly; starts full."""

    def __init__(self):
        self.limit: int | None = None
        self.level = 0.0
        self.at = 0.0

    def refill(self, limit: int, now: float) -> None:
        if limit != self.limit:
            self.limit, self.level, self.at = limit, float(limit), now
            return
        self.level = min(float(limit), self.level + (now - self.at) * limit / 60.0)
        self.at = now

    def wait_for(self, units: float) -> float:
        """Seconds until `units` are in the bucket."""
        return max(0.0, (units - self.level) * 60.0 / self.limit)

    def reset_seconds(self) -> float:
        """Seconds until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        return (self.limit - self.level) * 60.0 / self.limit


class ProviderLimits:
    def __init__(self):
        self.requests = _Bucket()
        self.tokens = _Bucket()

    def refused_before_the_model(self, options) -> tuple[int, str, str, str | None] | None:
        """(status, message, type, code) for a key the provider refuses whatever the request."""
        if options.forbidden:
            return 403, FORBIDDEN_MESSAGE, "request_forbidden", "unsupported_country_region_territory"
        if options.quota_spent:
            return 429, QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota"
        return None

    def take(self, options, request: dict, in_flight: int) -> tuple[str, dict] | None:
        """Take the request from the allowances; (message, headers) of its
        429 when it is beyond one of them (nothing is taken then)."""
        now = time.monotonic()
        model = request.get("model")
        if options.max_concurrency is not None and in_flight > options.max_concurrency:
            return (
                f"Rate limit reached for {model} (simulated): {options.max_concurrency} requests in flight "
                f"at most, {in_flight} asked.",
                {},
            )
        tokens = _request_tokens(request)
        for bucket, limit in ((self.requests, options.rpm), (self.tokens, options.tpm)):
            if limit is not None:
                bucket.refill(limit, now)
        checks = (
            (self.requests, options.rpm, 1, "requests per min (RPM)"),
            (self.tokens, options.tpm, tokens, "tokens per min (TPM)"),
        )
        for bucket, limit, units, name in checks:
            if limit is not None and bucket.level < units:
                wait = bucket.wait_for(units)
                headers = self.headers(options)
                headers["retry-after"] = str(max(1, math.ceil(wait)))
                headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
                message = (
                    f"Rate limit reached for {model} in organization org-sim on {name}: Limit {limit}, "
                    f"Used {limit - int(bucket.level)}, Requested {units}. "
                    f"Please try again in {duration(wait)}."
                )
                return message, headers
        if options.rpm is not None:
            self.requests.level -= 1
        if options.tpm is not None:
            self.tokens.level -= tokens
        return None

    def headers(self, options) -> dict:
        """OpenAI's x-ratelimit-* headers for the limits that are set."""
        headers = {}
        for bucket, limit, kind in (
            (self.requests, options.rpm, "requests"),
            (self.tokens, options.tpm, "tokens"),
        ):
            if limit is not None and bucket.limit is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(bucket.level)))
                headers[f"x-ratelimit-reset-{kind}"] = duration(bucket.reset_seconds())
        return headers


def _request_tokens(request: dict) -> int:
    chars = 0
    for message in request.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
    limit = request.get("max_tokens") or request.get("max_completion_tokens") or 0
    return math.ceil(chars / 4) + (limit if isinstance(limit, int) else 0)


def duration(seconds: float) -> str:
    """As OpenAI writes its resets: "120ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest):d}s"
