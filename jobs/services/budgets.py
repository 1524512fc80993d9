"""What a job may spend: prices, the estimate at start, a job's token and
cost budgets, and the daily budget of each user."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db.models import Count, F, FloatField, Q, Sum
from django.db.models.functions import Length
from django.utils import timezone

from extraction.render import render_row
from extraction.tokens import prompt_counter

from ..events import log_event
from ..models import (
    ACTIVE_STATES,
    ExtractJob,
    ExtractRow,
    JobMode,
    JobState,
    RowStatus,
)
from .errors import InvalidInput, LimitReached
from .limits import lock_owner
from .sql import close_unfinished_rows

if TYPE_CHECKING:
    from .params import JobParams


# What the providers' Batch APIs charge, as a share of the list price.
BATCH_PRICE_SHARE = 0.5


def price_for(model_name: str, mode: str = JobMode.ONLINE) -> tuple[float, float] | None:
    """(input, output) USD per million tokens in this mode, or None when
    unknown. A batch price is half the list price unless STRINGSIGHT_PRICES
    gives the model its own (an entry of four prices: the list's, then the
    batch's, None for one it leaves out)."""
    price = settings.STRINGSIGHT_PRICES.get(model_name)
    if price is None:
        return None
    if mode == JobMode.ONLINE:
        return price[0], price[1]
    if mode == JobMode.BATCH:
        listed, given = price[:2], (price[2:] or (None, None))
        return tuple(
            listed_price * BATCH_PRICE_SHARE if batch_price is None else batch_price
            for listed_price, batch_price in zip(listed, given, strict=True)
        )
    raise ValueError(f"no price for mode {mode!r}")


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
    """The most a job of these rows (their JSON texts) may cost at its
    mode's price, or None without a price: a row's prompt is about its JSON text (a little more
    than what is rendered), four characters a token; its answer at most
    max_tokens."""
    return _estimate(
        price_for(params.model_name, params.mode),
        system_prompt=params.resolved_system_prompt,
        max_tokens=params.max_tokens,
        rows=len(texts),
        row_chars=sum(map(len, texts)),
    )


def _estimate(
    prices: tuple[float, float] | None, *, system_prompt: str, max_tokens: int, rows: int, row_chars: int
) -> float | None:
    if prices is None:
        return None
    price_input, price_output = prices
    prompt_tokens = (rows * len(system_prompt) + row_chars) / 4 + rows
    return (prompt_tokens * price_input + rows * max_tokens * price_output) / 1e6


def _start_of_day(now=None):
    return (now or timezone.now()).replace(hour=0, minute=0, second=0, microsecond=0)


def _jobs_of_today(owner_id):
    """Jobs started today, and jobs resumed today that started earlier
    (daily_since is only ever set after the start's day)."""
    start = _start_of_day()
    jobs = ExtractJob.objects.filter(Q(created_at__gte=start) | Q(daily_since__gte=start))
    return jobs.filter(owner_id=owner_id) if owner_id is not None else jobs.filter(owner__isnull=True)


_COST = (
    F("prompt_tokens") * F("price_input_per_mtok") + F("completion_tokens") * F("price_output_per_mtok")
) / 1e6


def spent_today(*, owner_id) -> float:
    """What the owner's jobs have cost so far today (UTC): those started
    today, and what those resumed today have cost since; anonymous callers
    share one budget."""
    spent = Sum(_COST - F("daily_cost_before_usd"), output_field=FloatField())
    return _jobs_of_today(owner_id).aggregate(spent=spent)["spent"] or 0.0


def held_by_other_jobs(*, owner_id, job_id) -> float:
    """What the calls in flight of the owner's other jobs of today reserved,
    in USD: the daily budget holds them as a job's budget holds its own."""
    jobs = _jobs_of_today(owner_id).filter(state=JobState.RUNNING).exclude(pk=job_id)
    rows = ExtractRow.objects.filter(job__in=jobs, status=RowStatus.RUNNING)
    held = (
        F("reserved_prompt_tokens") * F("job__price_input_per_mtok")
        + F("reserved_completion_tokens") * F("job__price_output_per_mtok")
    ) / 1e6
    return rows.aggregate(held=Sum(held, output_field=FloatField()))["held"] or 0.0


def daily_budget_on_resume(job: ExtractJob, rows, *, now) -> dict[str, Any]:
    """Inside a resume, with the job locked and `rows` (a queryset) the rows
    it reopens: the job's changes so that its owner's daily budget keeps
    it as it keeps a start. A job that started on an earlier day counts
    towards today from now on; with a daily budget, its estimate becomes
    its cost so far plus the reopened rows', checked as a start's is
    (LimitReached)."""
    changes: dict[str, Any] = {}
    if (job.daily_since or job.created_at) < _start_of_day(now):
        changes.update(daily_since=now, daily_cost_before_usd=job.cost_usd or 0.0)
    if settings.STRINGSIGHT_USER_DAILY_BUDGET_USD is None:
        return changes
    reopened = rows.aggregate(count=Count("id"), chars=Sum(Length("data")))
    estimate = _estimate(
        (job.price_input_per_mtok, job.price_output_per_mtok) if job.has_prices else None,
        system_prompt=job.resolved_system_prompt,
        max_tokens=job.max_tokens,
        rows=reopened["count"],
        row_chars=reopened["chars"] or 0,
    )
    check_daily_budget(owner_id=job.owner_id, model_name=job.model_name, estimate=estimate)
    changes["estimated_cost_usd"] = None if estimate is None else job.cost_usd + estimate
    return changes


def check_daily_budget(*, owner_id, model_name: str, estimate: float | None) -> None:
    """At start (or resume): the owner's spend today, plus what their
    running jobs may still spend (their estimates less their cost so far),
    plus this job's estimate, must stay within
    STRINGSIGHT_USER_DAILY_BUDGET_USD, else LimitReached. The owner is
    locked meanwhile, so two starts cannot both take the last of it."""
    limit = settings.STRINGSIGHT_USER_DAILY_BUDGET_USD
    if limit is None:
        return
    if estimate is None:
        raise LimitReached(
            DAILY_BUDGET_EXCEEDED,
            f"no price is known for model {model_name!r}, so STRINGSIGHT_USER_DAILY_BUDGET_USD "
            "cannot be kept; add it to STRINGSIGHT_PRICES",
        )
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


# An unusable first answer is asked again (extraction.extract), so a row
# may make two calls: its reservation covers both.
ASKS_PER_ROW = 2


@dataclass(frozen=True)
class Reservation:
    """Tokens set aside for calls in flight: their prompts, and max_tokens of answer each."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: "Reservation") -> "Reservation":
        return Reservation(
            self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens
        )


def prompt_tokens_for(job: ExtractJob, data: dict[str, Any]) -> int:
    """The row's prompt as the LLM will count it: with the model's own
    encoding where one ships with us (extraction.tokens), else estimated."""
    rendered = render_row(data, job.method, include_scores=job.include_scores_in_prompt)
    messages = [
        {"role": "system", "content": job.resolved_system_prompt},
        {"role": "user", "content": rendered},
    ]
    return prompt_counter(job.model_name).messages(messages)


def reservation_for(job: ExtractJob, data: dict[str, Any]) -> Reservation:
    return Reservation(prompt_tokens_for(job, data) * ASKS_PER_ROW, job.max_tokens * ASKS_PER_ROW)


def within_budget(
    job: ExtractJob, rows: list[dict], reserved: Reservation, daily_left: float | None = None
) -> list[tuple[dict, Reservation]]:
    """The leading rows whose calls the budget can hold: what is spent, plus
    what the calls in flight have reserved (`reserved`), plus each row's own
    reservation, must stay within max_total_tokens and max_cost_usd; and
    the cost of the reservations within `daily_left`, what the owner's
    daily budget has left beyond this job's cost so far. Each row comes
    with its reservation."""
    affordable = []
    for row in rows:
        mine = reservation_for(job, row["data"])
        held = reserved + mine
        if job.max_total_tokens is not None and (
            job.total_tokens + held.prompt_tokens + held.completion_tokens > job.max_total_tokens
        ):
            break
        if job.has_prices:
            cost = job.cost_of(held.prompt_tokens, held.completion_tokens)
            if job.max_cost_usd is not None and job.cost_usd + cost > job.max_cost_usd:
                break
            if daily_left is not None and cost > daily_left:
                break
        reserved = held
        affordable.append((row, mine))
    return affordable


def end_over_budget(
    job: ExtractJob, *, now, daily_left: float | None = None, held_elsewhere: float = 0.0
) -> None:
    unfinished = job.count_total - job.count_done - job.count_failed
    daily = settings.STRINGSIGHT_USER_DAILY_BUDGET_USD
    job_budget_left = job.max_cost_usd - job.cost_usd if job.max_cost_usd is not None else float("inf")
    if daily_left is not None and daily_left < job_budget_left:
        held = ""
        if held_elsewhere:
            held = f" and ${held_elsewhere:.4f} held by your other jobs' calls in flight"
        error = (
            f"daily budget exceeded: ${daily - daily_left - held_elsewhere:.4f} of "
            f"STRINGSIGHT_USER_DAILY_BUDGET_USD ${daily:.4f} spent today{held}; the next call would go "
            f"over it, so {unfinished} rows were not run"
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
