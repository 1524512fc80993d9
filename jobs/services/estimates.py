"""What a job would cost before it is started: no LLM call, no job stored.

Prompt tokens are counted as the budget counts them (the model's own
encoding where one ships with us, else four characters a token; see
extraction.tokens). Rows whose answer is in the completion cache cost
nothing. The answers' length and the calls' latency are what this server
has seen of the model lately; without that history they are null.
"""

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import DurationField, ExpressionWrapper, F
from django.utils import timezone

from extraction.extract import CacheKeys, ExtractionSpec, build_messages
from extraction.llm import CallSettings
from extraction.prompts import response_format
from extraction.rows import sample_indexes
from extraction.tokens import prompt_counter

from ..models import CompletionCache, ExtractJob, ExtractRow, JobMode, JobState, RowStatus
from .budgets import price_for
from .provider_limits import endpoint_id, lane_state, limits_config

# How much history the expected answer length and latency are taken from.
RECENT_JOBS = 20
RECENT_ROWS = 200
RECENT_DAYS = 7


@dataclass(frozen=True)
class History:
    completion_tokens_per_call: float | None
    seconds_per_call: float | None


def job_estimate(*, rows: list[dict[str, Any]], params, encoded_rows: list[str] | None = None) -> dict:
    """The start body's cost, as `{rows, cached_rows, calls, prompt_tokens,
    completion_tokens: {expected, max}, mode, cost_usd: {low, expected,
    high}, cost_usd_by_mode: {online: {...}, batch: {...}}, duration_s:
    {expected}}`: cost_usd at the price of the start's mode, and each
    mode's beside it. Takes what StartJobSerializer validated."""
    picked = sample_indexes(len(rows), params.sample_size)
    structured = settings.STRINGSIGHT_STRUCTURED_OUTPUT
    spec = ExtractionSpec(
        method=params.method,
        system_prompt=params.resolved_system_prompt,
        include_scores=params.include_scores_in_prompt,
        call=CallSettings(
            model=params.model_name,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            response_format=response_format(params.method) if structured else None,
        ),
    )
    base_url = os.environ.get("OPENAI_BASE_URL") or None
    cache_keys = CacheKeys(spec, base_url=base_url)
    messages = [build_messages(rows[at], spec) for at in picked]
    cached = set()
    if params.use_cache:
        keys = [cache_keys.key(row_messages) for row_messages in messages]
        cached_keys = set()
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            cached_keys.update(CompletionCache.objects.filter(key__in=batch).values_list("key", flat=True))
        cached = {at for at, key in enumerate(keys) if key in cached_keys}
    counter = prompt_counter(params.model_name)
    prompt_tokens = sum(
        counter.messages(row_messages) for at, row_messages in enumerate(messages) if at not in cached
    )
    calls = len(picked) - len(cached)
    history = recent_history(params.model_name)
    expected_completion = (
        None
        if history.completion_tokens_per_call is None
        else round(min(params.max_tokens, history.completion_tokens_per_call) * calls)
    )
    max_completion = calls * params.max_tokens
    answers = max_completion if expected_completion is None else expected_completion
    by_mode = {
        mode: _costs(params.model_name, mode, prompt_tokens, expected_completion, max_completion)
        for mode in JobMode.values
    }
    return {
        "rows": len(picked),
        "cached_rows": len(cached),
        "calls": calls,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": {"expected": expected_completion, "max": max_completion},
        "mode": params.mode,
        "cost_usd": dict(by_mode[params.mode]),
        "cost_usd_by_mode": by_mode,
        "duration_s": {
            # A batch's results come within the provider's window, not at our rate.
            "expected": None
            if params.mode == JobMode.BATCH
            else expected_duration(
                calls=calls,
                tokens=prompt_tokens + answers,
                max_workers=params.max_workers,
                model=params.model_name,
                base_url=base_url,
                seconds_per_call=history.seconds_per_call,
            )
        },
    }


def _costs(model: str, mode: str, prompt: int, expected: int | None, most: int) -> dict:
    price = price_for(model, mode)
    if price is None:
        return {"low": None, "expected": None, "high": None}
    price_input, price_output = price

    def cost(completion: int) -> float:
        return round((prompt * price_input + completion * price_output) / 1e6, 6)

    return {"low": cost(0), "expected": None if expected is None else cost(expected), "high": cost(most)}


def recent_history(model: str) -> History:
    """The model's answers per call, and seconds per call, over its recent
    jobs and rows (not answers from the cache; seconds from online jobs only)."""
    since = timezone.now() - timedelta(days=RECENT_DAYS)
    jobs = ExtractJob.objects.filter(model_name=model, created_at__gte=since).exclude(
        state__in=[JobState.QUEUED]
    )
    completion = calls = 0
    for job in jobs.order_by("-created_at").only(
        "completion_tokens", "count_done", "count_failed", "cache_hits"
    )[:RECENT_JOBS]:
        completion += job.completion_tokens
        calls += job.count_done + job.count_failed - job.cache_hits
    durations = list(
        ExtractRow.objects.filter(
            # A batch-mode row's time is the provider's window, not a call's latency.
            job__mode=JobMode.ONLINE,
            job__model_name=model,
            job__created_at__gte=since,
            status=RowStatus.DONE,
            cached=False,
            started_at__isnull=False,
            finished_at__isnull=False,
        )
        .annotate(took=ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField()))
        .order_by("-finished_at")
        .values_list("took", "attempts")[:RECENT_ROWS]
    )
    seconds = sum(took.total_seconds() for took, _ in durations)
    attempts = sum(max(1, tries) for _, tries in durations)
    return History(
        completion_tokens_per_call=completion / calls if calls > 0 else None,
        seconds_per_call=seconds / attempts if attempts else None,
    )


def expected_duration(
    *,
    calls: int,
    tokens: int,
    max_workers: int,
    model: str,
    base_url: str | None,
    seconds_per_call: float | None,
) -> float | None:
    """Seconds the calls take at the concurrency the job and the endpoint
    allow and within the endpoint's request and token rates; None without
    a recent latency to go by."""
    if calls == 0:
        return 0.0
    if seconds_per_call is None:
        return None
    config = limits_config()
    _, limits = config.lane(model)
    concurrency = max_workers
    if limits.max_concurrency is not None:
        concurrency = min(concurrency, limits.max_concurrency)
    gate_key = endpoint_id(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY"))
    lane_name, _ = config.lane(model)
    state = lane_state(f"{gate_key}:{lane_name}" if lane_name else gate_key)
    if state is not None and state.allowed is not None and not state.slow_start:
        concurrency = min(concurrency, max(1, int(state.allowed)))
    seconds = math.ceil(calls / concurrency) * seconds_per_call
    if limits.rpm is not None:
        seconds = max(seconds, calls * 60.0 / limits.rpm)
    if limits.tpm is not None:
        seconds = max(seconds, tokens * 60.0 / limits.tpm)
    return round(seconds, 3)
