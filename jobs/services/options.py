"""What a start may ask for: the caller's rows and values with
StringSight's defaults and the operator's rules applied, before anything
is stored. Every interface (both start paths, /extract/single, the CLI,
/detect-and-validate) accepts a start here; what the owner may still start
(active jobs, the daily budget) is decided by lifecycle.job_start."""

import re
from dataclasses import dataclass, fields
from typing import Any

from django.conf import settings

from extraction.prompts import UnknownPromptError, resolve_system_prompt
from extraction.rows import RowError, encode_row, nul_path, validate_rows

from ..models import JobMode
from .budgets import model_allowed, price_for, require_price
from .errors import InvalidInput
from .params import JobParams

# Upstream StringSight's frontend sends these; a caller who omits a value
# (or sends null) gets the same.
DEFAULTS = {
    "system_prompt": "default",
    "task_description": "",
    "temperature": 0.6,
    "top_p": 0.95,
    "max_tokens": 2048,
    "max_workers": 16,
    "include_scores_in_prompt": False,
    "use_cache": True,
}

# C0 and C1 controls and DEL: a model id is sent in a JSON body, logged and
# shown; CR, LF or ESC in it could forge log lines or terminal output.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class StartRequest:
    """A start as the caller sent it: None wherever it sent nothing (or null)."""

    rows: Any
    method: str | None = None
    system_prompt: str | None = None
    custom_system_prompt: str | None = None
    task_description: str | None = None
    model_name: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_workers: int | None = None
    include_scores_in_prompt: bool | None = None
    sample_size: int | None = None
    use_cache: bool | None = None
    max_cost_usd: float | None = None
    max_total_tokens: int | None = None
    mode: str | None = None

    @classmethod
    def of(cls, values: dict[str, Any]) -> "StartRequest":
        """From a request's values, ignoring those a start does not take."""
        names = {field.name for field in fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in names})


@dataclass(frozen=True)
class AcceptedStart:
    """A start that may be stored: its rows, each row's JSON text (as it is
    stored and as its size was measured) and the job's parameters."""

    rows: list[dict[str, Any]]
    encoded_rows: list[str]
    params: JobParams


def accept_start(request: StartRequest) -> AcceptedStart:
    """Apply the defaults and rules to a start; raises InvalidInput naming
    the first field that breaks one."""
    encoded_rows = _checked_rows(request.rows)
    for name in ("system_prompt", "custom_system_prompt", "task_description"):
        _check_prompt_size(name, getattr(request, name))
    _check_cap("max_tokens", request.max_tokens, "STRINGSIGHT_MAX_TOKENS_CAP")
    _check_cap("max_workers", request.max_workers, "STRINGSIGHT_MAX_WORKERS")
    if request.model_name is not None and CONTROL_CHARACTERS.search(request.model_name):
        raise InvalidInput(
            "model_name", "a model id holds no control characters (such as CR, LF, tab or ESC)"
        )
    mode = JobMode.ONLINE if request.mode is None else request.mode
    if mode not in JobMode.values:
        raise InvalidInput(
            "mode", f"{str(mode)[:100]!r} is not a mode; use one of {', '.join(JobMode.values)}"
        )
    values = {name: getattr(request, name) for name in DEFAULTS}
    for name, default in DEFAULTS.items():
        if values[name] is None:
            values[name] = default
    try:
        method = validate_rows(request.rows, request.method)
    except RowError as exc:
        raise InvalidInput(exc.field, exc.message) from None
    try:
        resolved = resolve_system_prompt(
            values["system_prompt"],
            method,
            task_description=values["task_description"] or None,
            custom_system_prompt=request.custom_system_prompt or None,
        )
    except UnknownPromptError as exc:
        raise InvalidInput("system_prompt", str(exc)) from None
    model_name = request.model_name or settings.STRINGSIGHT_DEFAULT_MODEL
    if not model_allowed(model_name):
        raise InvalidInput(
            "model_name",
            f"{model_name!r} is not an allowed model; allowed: "
            f"{', '.join(settings.STRINGSIGHT_ALLOWED_MODELS)} (STRINGSIGHT_ALLOWED_MODELS)",
        )
    max_cost_usd = request.max_cost_usd
    if max_cost_usd is not None:
        require_price(model_name)
    elif price_for(model_name) is not None:
        max_cost_usd = settings.STRINGSIGHT_DEFAULT_MAX_COST_USD
    params = JobParams(
        method=method,
        system_prompt=request.custom_system_prompt or values["system_prompt"],
        resolved_system_prompt=resolved,
        task_description=values["task_description"],
        model_name=model_name,
        temperature=values["temperature"],
        top_p=values["top_p"],
        max_tokens=values["max_tokens"],
        max_workers=values["max_workers"],
        include_scores_in_prompt=values["include_scores_in_prompt"],
        sample_size=request.sample_size,
        use_cache=values["use_cache"],
        max_cost_usd=max_cost_usd,
        max_total_tokens=request.max_total_tokens,
        mode=str(mode),
    )
    return AcceptedStart(rows=request.rows, encoded_rows=encoded_rows, params=params)


def accept_single_row(request: StartRequest) -> AcceptedStart:
    """accept_start for /extract/single, whose one row (`rows[0]` here) the
    caller sent as `row`: its errors name `row`. It answers within the
    request, so its call is a live one: online mode only."""
    if request.mode not in (None, JobMode.ONLINE):
        raise InvalidInput(
            "mode",
            "/extract/single answers within the request, so it runs online only; "
            "start a job (POST /api/jobs/) for batch mode",
        )
    try:
        return accept_start(request)
    except InvalidInput as exc:
        raise exc.renamed("rows[0]", "row") from None


def _checked_rows(rows) -> list[str]:
    """Each row's JSON text, after the limits on rows: how many, how large,
    and no NUL character (PostgreSQL cannot store it). Anything but a list
    is left to validate_rows to name."""
    if not isinstance(rows, list):
        return []
    limit = settings.STRINGSIGHT_MAX_ROWS
    if len(rows) > limit:
        raise InvalidInput(
            "rows", f"{len(rows)} rows are more than the limit of {limit} per job (STRINGSIGHT_MAX_ROWS)"
        )
    row_limit = settings.STRINGSIGHT_MAX_ROW_BYTES
    encoded_rows = [encode_row(row) for row in rows]
    for index, encoded in enumerate(encoded_rows):
        # orjson writes NUL as \u0000: a cheap test before the walk.
        if "\\u0000" in encoded and (where := nul_path(rows[index])) is not None:
            raise InvalidInput(
                f"rows[{index}].{where}", "holds a NUL character (\\u0000), which cannot be stored"
            )
        size = len(encoded.encode())
        if size > row_limit:
            raise InvalidInput(
                f"rows[{index}]",
                f"{size} bytes is more than the limit of {row_limit} bytes per row "
                "(STRINGSIGHT_MAX_ROW_BYTES)",
            )
    return encoded_rows


def _check_prompt_size(name: str, value: str | None) -> None:
    """A prompt is copied into every LLM call in flight: its size is a
    worker's memory and every call's cost."""
    limit = settings.STRINGSIGHT_MAX_PROMPT_BYTES
    if value is not None and len(value) * 4 > limit and (size := len(value.encode())) > limit:
        raise InvalidInput(
            name, f"{size} bytes is more than the limit of {limit} bytes (STRINGSIGHT_MAX_PROMPT_BYTES)"
        )


def _check_cap(name: str, value: int | None, setting: str) -> None:
    cap = getattr(settings, setting)
    if value is not None and value > cap:
        raise InvalidInput(name, f"{value} is above the limit of {cap} ({setting})")
