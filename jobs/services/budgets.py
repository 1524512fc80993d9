"""What a job may spend: prices, the estimate at start, a job's token and
cost budgets, and the daily budget of each user."""

from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db.models import F, FloatField, Sum
from django.utils import timezone

from extraction.render import render_row

from ..events import log_event
from ..models import (
    ACTIVE_STATES,
    ExtractJob,
    JobState,
    RowStatus,
)
from .errors import InvalidInput, LimitReached
from .limits import lock_owner
from .sql import close_unfinished_rows

if TYPE_CHECKING:
    from .lifecycle import JobParams


def price_for(model_name: str) -> tuple[float, float] | None:
    """(input, output) USD per million tokens, or None when unknown."""
    return settings.STRINGSIGHT_PRICES.get(model_name)


def require_price(model_name: str) -> None:
    """A cost budget (max_cost_usd) can be kept only for a model with a price."""
    if price_for(model_name) is None:
        raise InvalidInput(
            "max_cost_usd",
            f"no price is known for model {model_name!r}, so a cost budget cannot be kept; "
            "add it to STRINGSIGHT_PRICES or use max_total_tokens",
        )


def model_allowed(model_name: str) -> bool:
    """Whether the operator lets jobs use this model (STRINGSIGHT_ALLOWED_MODELS)."""
    allowed = settings.STRINGSIGHT_ALLOWED_MODELS
    return "*" in allowed or model_name in allowed


DAILY_BUDGET_EXCEEDED = "daily_budget_exceeded"


def estimate_cost(params: "JobParams", texts: list[str]) -> float | None:
    """The most a job of these rows (their JSON texts) may cost, or None
    without a price: a row's prompt is about its JSON text (a little more
    than what is rendered), four characters a token; its answer at most
    max_tokens."""
    price_input, price_output = price_for(params.model_name) or (None, None)
    if price_input is None:
        return None
    prompt_chars = len(texts) * len(params.resolved_system_prompt) + sum(map(len, texts))
    prompt_tokens = prompt_chars / 4 + len(texts)
    return (prompt_tokens * price_input + len(texts) * params.max_tokens * price_output) / 1e6


def _start_of_day(now=None):
    return (now or timezone.now()).replace(hour=0, minute=0, second=0, microsecond=0)


def _jobs_of_today(owner_id):
    jobs = ExtractJob.objects.filter(created_at__gte=_start_of_day())
    return jobs.filter(owner_id=owner_id) if owner_id is not None else jobs.filter(owner__isnull=True)


_COST = (
    F("prompt_tokens") * F("price_input_per_mtok") + F("completion_tokens") * F("price_output_per_mtok")
) / 1e6


def spent_today(*, owner_id) -> float:
    """What the owner's jobs started today (UTC) have cost so far; anonymous
    callers share one budget."""
    return _jobs_of_today(owner_id).aggregate(spent=Sum(_COST, output_field=FloatField()))["spent"] or 0.0


def check_daily_budget(*, owner, model_name: str, estimate: float | None) -> None:
    """At start: the owner's spend today, plus what their running jobs may
    still spend (their estimates less their cost so far), plus this job's
    estimate, must stay within STRINGSIGHT_USER_DAILY_BUDGET_USD, else
    LimitReached. The owner is locked meanwhile, so two starts cannot both
    take the last of it."""
    limit = settings.STRINGSIGHT_USER_DAILY_BUDGET_USD
    if limit is None:
        return
    if estimate is None:
        raise LimitReached(
            DAILY_BUDGET_EXCEEDED,
            f"no price is known for model {model_name!r}, so STRINGSIGHT_USER_DAILY_BUDGET_USD "
            "cannot be kept; add it to STRINGSIGHT_PRICES",
        )
    owner_id = owner.pk if owner is not None else None
    lock_owner(owner_id)
    jobs = _jobs_of_today(owner_id)
    reserved = sum(
        max(0.0, (job.estimated_cost_usd or 0.0) - (job.cost_usd or 0.0))
        for job in jobs.filter(state__in=ACTIVE_STATES).only(
            "estimated_cost_usd",
            "prompt_tokens",
            "completion_tokens",
            "price_input_per_mtok",
            "price_output_per_mtok",
        )
    )
    spent = spent_today(owner_id=owner_id)
    if spent + reserved + estimate > limit:
        raise LimitReached(
            DAILY_BUDGET_EXCEEDED,
            f"daily budget exceeded: ${spent:.4f} spent today and ${reserved:.4f} held by running jobs, "
            f"and this job may cost up to ${estimate:.4f}, more than the ${limit:.4f} a user may spend "
            "a day (STRINGSIGHT_USER_DAILY_BUDGET_USD)",
        )


def within_budget(
    job: ExtractJob, rows: list[dict], running: int, daily_left: float | None = None
) -> list[dict]:
    """The leading rows whose calls the budget can still pay for, counting
    the calls already in flight. A call's cost is estimated: its prompt from
    the rendered messages (about four characters a token), its answer from
    the average so far, or max_tokens before any answer is in. `daily_left`
    is what the owner's daily budget has left beyond this job's cost so far."""
    calls = job.count_done + job.count_failed - job.cache_hits
    answer_tokens = job.completion_tokens / calls if calls > 0 else job.max_tokens
    estimates = [(estimate_prompt_tokens(job, row["data"]), answer_tokens) for row in rows]
    if calls > 0:
        in_flight = (job.prompt_tokens / calls, answer_tokens)
    else:
        in_flight = estimates[0] if estimates else (0, answer_tokens)
    tokens_left = cost_left = float("inf")
    if job.max_total_tokens is not None:
        tokens_left = job.max_total_tokens - job.total_tokens - running * sum(in_flight)
    if job.max_cost_usd is not None:
        cost_left = job.max_cost_usd - job.cost_usd - running * job.cost_of(*in_flight)
    if daily_left is not None:
        cost_left = min(cost_left, daily_left - running * job.cost_of(*in_flight))
    affordable = []
    for row, (prompt, answer) in zip(rows, estimates, strict=True):
        tokens_left -= prompt + answer
        if job.max_cost_usd is not None or daily_left is not None:
            cost_left -= job.cost_of(prompt, answer)
        if tokens_left < 0 or cost_left < 0:
            break
        affordable.append(row)
    return affordable


def estimate_prompt_tokens(job: ExtractJob, row: dict[str, Any]) -> int:
    rendered = render_row(row, job.method, include_scores=job.include_scores_in_prompt)
    return (len(job.resolved_system_prompt) + len(rendered)) // 4 + 1


def end_over_budget(job: ExtractJob, *, now, daily_left: float | None = None) -> None:
    unfinished = job.count_total - job.count_done - job.count_failed
    daily = settings.STRINGSIGHT_USER_DAILY_BUDGET_USD
    job_budget_left = job.max_cost_usd - job.cost_usd if job.max_cost_usd is not None else float("inf")
    if daily_left is not None and daily_left < job_budget_left:
        error = (
            f"daily budget exceeded: ${daily - daily_left:.4f} of STRINGSIGHT_USER_DAILY_BUDGET_USD "
            f"${daily:.4f} spent today; the next call would go over it, so {unfinished} rows were not run"
        )
        end_job(job, error=error, now=now)
        return
    spent = []
    if job.max_cost_usd is not None:
        spent.append(f"${job.cost_usd:.4f} of max_cost_usd ${job.max_cost_usd:.4f} spent")
    if job.max_total_tokens is not None:
        spent.append(f"{job.total_tokens:,} of max_total_tokens {job.max_total_tokens:,} tokens used")
    error = (
        f"budget exceeded: {' and '.join(spent)}; the next call would go over it, "
        f"so {unfinished} rows were not run"
    )
    end_job(job, error=error, now=now)


def end_job(job: ExtractJob, *, error: str, now) -> None:
    ExtractJob.objects.filter(pk=job.pk, state=JobState.RUNNING).update(
        state=JobState.ERROR, error=error, finished_at=now
    )
    close_unfinished_rows(job_id=job.pk, status=RowStatus.CANCELLED, now=now)
    log_event("job_failed", job_id=job.pk, error=error)
