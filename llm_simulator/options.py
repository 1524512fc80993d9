"""The simulator's options: fault rates, latency, the models it serves, and checks that
name a bad option."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from llm_simulator.limits import LIMIT_OPTIONS

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4.1", "gpt-4o", "sim-model")


class OptionError(ValueError):
    """A bad simulator option: the message names it."""


@dataclass
class SimulatorOptions:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_bad_json: float = 0.0
    rate_truncated: float = 0.0
    rate_refusal: float = 0.0
    # Bad JSON for the first answer to a request only (by its user message):
    # the same request asked again is answered as usual.
    rate_bad_json_first: float = 0.0
    retry_after: int = 1
    seed: int = 0
    api_key: str | None = None
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    # False plays an endpoint without structured outputs: a request with
    # response_format gets a 400, as such endpoints answer.
    structured_output: bool = True
    # While true, answers wait (a request still arrives, is logged, and is
    # aborted if its client leaves): lets a test hold a job open.
    paused: bool = False
    # The provider's limits (llm_simulator.limits): None is no limit.
    max_concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    # Every chat request answers 429 insufficient_quota, or 403, while true.
    quota_spent: bool = False
    forbidden: bool = False
    # The Batch API (llm_simulator.batches). False plays a provider without one:
    # /v1/files and /v1/batches answer 404.
    batch_api: bool = True
    batch_lines_per_second: float = 2000.0
    batch_validating_seconds: float = 0.2
    # The share of lines answered with a 500 in the error file.
    batch_rate_failed: float = 0.0
    # A batch created now expires this long after (OpenAI's window is 24 h).
    batch_expiry_seconds: float = 86400.0
    # How long a batch stays cancelling before it is cancelled; its lines go on meanwhile.
    batch_cancel_seconds: float = 0.2
    # How long POST /v1/batches waits before answering; the batch is created first, so
    # a client that dies meanwhile leaves a batch it never learnt the id of.
    batch_create_delay_seconds: float = 0.0

    def __post_init__(self):
        for name in ("latency_ms", "jitter_ms"):
            _check_number(name, getattr(self, name), maximum=math.inf)
        for name in (
            "rate_429",
            "rate_500",
            "rate_bad_json",
            "rate_truncated",
            "rate_refusal",
            "rate_bad_json_first",
        ):
            _check_number(name, getattr(self, name), maximum=1.0)
        for name in ("retry_after", "seed"):
            if type(getattr(self, name)) is not int:
                raise OptionError(f"{name} must be an integer")
        if self.retry_after < 0:
            raise OptionError("retry_after must be >= 0")
        if self.api_key is not None and not isinstance(self.api_key, str):
            raise OptionError("api_key must be a string or null")
        if not isinstance(self.models, list) or not all(isinstance(m, str) for m in self.models):
            raise OptionError("models must be a list of strings")
        for name in ("structured_output", "paused"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be true or false")
        check_limit_options(self)
        check_batch_options(self)

    def updated(self, changes: dict) -> SimulatorOptions:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise OptionError(f"unknown option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_number(name, value, maximum):
    # bool is an int subclass; "rate_500": true is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= maximum:
        bound = "a number >= 0" if maximum == math.inf else f"a number between 0 and {maximum}"
        raise OptionError(f"{name} must be {bound}")


def check_limit_options(options) -> None:
    """Raise OptionError naming a bad limit option."""
    for name in LIMIT_OPTIONS:
        value = getattr(options, name)
        if value is not None and (type(value) is not int or value < 1):
            raise OptionError(f"{name} must be a whole number >= 1, or null for no limit")
    for name in ("quota_spent", "forbidden"):
        if not isinstance(getattr(options, name), bool):
            raise OptionError(f"{name} must be true or false")


def check_batch_options(options) -> None:
    """Raise OptionError naming a bad Batch API option."""
    if not isinstance(options.batch_api, bool):
        raise OptionError("batch_api must be true or false")
    for name in ("batch_validating_seconds", "batch_cancel_seconds", "batch_create_delay_seconds"):
        _check_number(name, getattr(options, name), maximum=math.inf)
    _check_number("batch_rate_failed", options.batch_rate_failed, maximum=1.0)
    for name in ("batch_lines_per_second", "batch_expiry_seconds"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise OptionError(f"{name} must be a number > 0")
