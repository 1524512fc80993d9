"""Importing a batch that has ended: its output file, then its error file,
one transaction per chunk of lines, recorded as the online engine records
a row (sql.finish_rows, sql.insert_properties, the cache, the job's
counters, the row events). Then the rows that got no answer: sent again
while attempts are left, else failed (or cancelled, with their job).

Idempotent: a line is recorded only if its row is still running and still
this batch's, checked in the statement that finishes it, under the job's
lock; the batch is `imported` only after every line. An import killed
half way is simply run again by a later poll.
"""

import itertools
from dataclasses import dataclass, field

import openai
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from django_q.tasks import async_task

from extraction.extract import (
    NO_PROPERTY,
    CacheKeys,
    RowOutcome,
    asked_twice,
    build_messages,
    unusable_answer,
)
from extraction.llm import redact

from ..events import log_event
from ..models import (
    ACTIVE_STATES,
    ExtractJob,
    ExtractRow,
    JobState,
    ProviderBatch,
    ProviderBatchState,
    RowStatus,
)
from ..services.cache import remember_answers
from ..services.claims import log_row_event, storable
from ..services.sql import ClaimedRow, finish_rows, insert_properties
from ..worker.engine import WorkerSettings, extraction_spec
from .lines import ResultLine, outcome_of, read_result_line
from .provider import BatchProvider
from .records import OPEN_STATES, worker_id_for

# Lines recorded per transaction.
LINES_PER_CHUNK = 500


@dataclass(frozen=True)
class FirstAsk:
    """A row's first answer, which gave no valid property."""

    error: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class LineResults:
    """A chunk's lines, sorted by what becomes of their rows."""

    answered: list[tuple[ClaimedRow, RowOutcome]] = field(default_factory=list)
    ask_again: list[tuple[ClaimedRow, RowOutcome]] = field(default_factory=list)
    failed: list[tuple[ClaimedRow, str]] = field(default_factory=list)
    # Row id: the tokens of its first answer, counted in the job already.
    counted: dict[int, tuple[int, int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.answered or self.ask_again or self.failed)


@dataclass
class Importer:
    batch: ProviderBatch
    job: ExtractJob
    provider: BatchProvider

    def __post_init__(self):
        config = WorkerSettings.from_django()
        self.spec = extraction_spec(self.job, config)
        self.keys = CacheKeys(self.spec, base_url=config.base_url)
        self.worker_id = worker_id_for(self.batch)

    def run(self) -> None:
        for file_id in (self.batch.output_file_id, self.batch.error_file_id):
            if not file_id:
                continue
            lines = (
                line
                for raw in self.provider.lines(file_id)
                if (line := read_result_line(raw, job_id=self.job.pk, api_key=self.provider.api_key))
            )
            while chunk := list(itertools.islice(lines, LINES_PER_CHUNK)):
                self.record(chunk)
                # The lease of this import: another poll leaves the batch alone meanwhile.
                ProviderBatch.objects.filter(pk=self.batch.pk).update(updated_at=timezone.now())
        self.settle_unanswered()

    def rows_of(self, indexes: list[int]) -> dict[int, tuple[ClaimedRow, int, FirstAsk | None]]:
        """The batch's rows still waiting for these lines, each with its
        attempts so far and its first answer when that one gave no
        property (see record)."""
        rows = ExtractRow.objects.filter(
            job_id=self.job.pk, index__in=indexes, status=RowStatus.RUNNING, claimed_by=self.worker_id
        ).values_list(
            "id",
            "index",
            "question_id",
            "data",
            "input_index",
            "attempts",
            "error",
            "prompt_tokens",
            "completion_tokens",
        )
        data = ExtractRow._meta.get_field("data")
        found = {}
        for row_id, index, question_id, text, input_index, attempts, error, prompt, completion in rows:
            first = FirstAsk(error, prompt, completion) if error.startswith(NO_PROPERTY) else None
            row = ClaimedRow(row_id, index, question_id, data.to_python(text), input_index)
            found[index] = (row, attempts, first)
        return found

    def record(self, lines: list[ResultLine]) -> None:
        """One chunk of lines: answers parsed first (outside the
        transaction), then recorded in one transaction.

        As online (extraction.extract), an answer with no valid property
        is asked once more: its row goes out again in the follow-up batch,
        and the second answer is recorded with both calls' tokens."""
        rows = self.rows_of([line.row_index for line in lines])
        results = LineResults()
        for line in lines:
            if line.row_index not in rows:
                continue  # recorded already, or sent again by another batch
            row, attempts, first = rows[line.row_index]
            if line.completion is None:
                results.failed.append((row, line.failure))
                continue
            key = self.keys.key(build_messages(row.data, self.spec))
            outcome = outcome_of(line, row, self.spec, api_key=self.provider.api_key, cache_key=key)
            if first is not None:
                asked = RowOutcome(
                    prompt_tokens=first.prompt_tokens,
                    completion_tokens=first.completion_tokens,
                    error=first.error,
                )
                outcome = asked_twice(asked, outcome)
                results.counted[row.id] = (first.prompt_tokens, first.completion_tokens)
            elif unusable_answer(outcome) and attempts + 1 < settings.STRINGSIGHT_MAX_ATTEMPTS:
                results.ask_again.append((row, storable(outcome)))
                continue
            results.answered.append((row, storable(outcome)))
        if results:
            record_lines(job_id=self.job.pk, worker_id=self.worker_id, results=results)

    def settle_unanswered(self) -> None:
        """Rows of the batch that got no line (an expired, cancelled or
        failed batch): sent again, or failed, like a failed line."""
        reason = _no_line_reason(self.batch, self.provider)
        rows = ExtractRow.objects.filter(
            provider_batch=self.batch, status=RowStatus.RUNNING, claimed_by=self.worker_id
        ).values_list("id", "index", "question_id", "input_index")
        # Each chunk recorded leaves the batch's running rows, so the next
        # read gives the next chunk.
        while chunk := list(rows.order_by("index")[:LINES_PER_CHUNK]):
            failed = [
                (ClaimedRow(row_id, index, question_id, None, input_index), reason)
                for row_id, index, question_id, input_index in chunk
            ]
            record_lines(job_id=self.job.pk, worker_id=self.worker_id, results=LineResults(failed=failed))


def import_batch(batch: ProviderBatch, provider: BatchProvider) -> None:
    """Record an ended batch's lines, then mark it imported, end the job if
    that was its last work, or submit what is left to send."""
    job = ExtractJob.objects.get(pk=batch.job_id)
    Importer(batch, job, provider).run()
    now = timezone.now()
    ProviderBatch.objects.filter(pk=batch.pk, state=ProviderBatchState.SUBMITTED).update(
        state=ProviderBatchState.IMPORTED, updated_at=now
    )
    log_event("batch_imported", job_id=job.pk, batch=str(batch.pk), batch_id=batch.batch_id)
    if finish_if_complete(job_id=job.pk, now=now):
        return
    if ExtractRow.objects.filter(job_id=job.pk, status=RowStatus.PENDING).exists() and (
        ExtractJob.objects.filter(pk=job.pk, state__in=ACTIVE_STATES).update(work_enqueued_at=now)
    ):
        # Lines to send again, or rows the budget held back until now.
        async_task("jobs.tasks.submit_batches", str(job.pk))


def finish_if_complete(*, job_id, now) -> bool:
    """A batch job is done when every row has finished and no batch of it
    is open (the provider holds nothing of it we have not imported)."""
    open_batches = ProviderBatch.objects.filter(job_id=job_id, state__in=OPEN_STATES)
    done = (
        ExtractJob.objects.filter(
            pk=job_id, state=JobState.RUNNING, count_total=F("count_done") + F("count_failed")
        )
        .exclude(pk__in=open_batches.values("job_id"))
        .update(state=JobState.DONE, finished_at=now)
    )
    if done:
        log_event("job_done", job_id=job_id)
    return bool(done)


def record_lines(*, job_id, worker_id: str, results: LineResults) -> None:
    """One transaction: the answered rows finished with their properties,
    tokens, cost and cache entries, as the online engine records them; the
    rows to ask again pending, with their first answer; the failed lines'
    rows sent again while attempts are left (pending), else failed, or
    cancelled if the job no longer runs. Only rows still running and still
    this batch's are touched (the statements check it), with the job
    locked, so a chunk recorded twice changes nothing the second time."""
    now = timezone.now()
    with transaction.atomic():
        job = ExtractJob.objects.select_for_update().filter(pk=job_id).values("state", "model_name").first()
        if job is None:
            return
        running = job["state"] == JobState.RUNNING
        answered, ask_again = results.answered, results.ask_again
        if not running:
            answered, ask_again = answered + ask_again, []  # no follow-up batch will ask
        mine = finish_rows(answered, worker_id=worker_id, now=now) if answered else []
        insert_properties(job_id, mine)
        outcomes = [outcome for _, outcome in mine]
        asked = _ask_again(ask_again, worker_id=worker_id)
        failed_rows = _settle_failed_lines(
            results.failed, job_id=job_id, worker_id=worker_id, running=running, now=now
        )
        failed_answers = sum(outcome.error is not None for outcome in outcomes)
        # Tokens of a first answer were counted when it arrived (they are
        # spent whatever comes next); the row's own count includes them.
        counted = [results.counted.get(row.id, (0, 0)) for row, _ in mine]
        ExtractJob.objects.filter(pk=job_id).update(
            count_done=F("count_done") + len(outcomes) - failed_answers,
            count_failed=F("count_failed") + failed_answers + failed_rows,
            properties_count=F("properties_count") + sum(len(outcome.properties) for outcome in outcomes),
            prompt_tokens=F("prompt_tokens")
            + sum(outcome.prompt_tokens for outcome in outcomes + asked)
            - sum(prompt for prompt, _ in counted),
            completion_tokens=F("completion_tokens")
            + sum(outcome.completion_tokens for outcome in outcomes + asked)
            - sum(completion for _, completion in counted),
        )
        remember_answers(
            model_name=job["model_name"], outcomes=[outcome for outcome in outcomes if outcome.cache_key]
        )
    for row, outcome in mine:
        log_row_event(job_id, row.index, outcome)


def _ask_again(ask_again: list[tuple[ClaimedRow, RowOutcome]], *, worker_id: str) -> list[RowOutcome]:
    """Rows whose answer gave no property go out once more, keeping that
    answer (its error, text and tokens) for when the second arrives.
    Returns the outcomes of the rows that were still ours."""
    asked = []
    for row, outcome in ask_again:
        if ExtractRow.objects.filter(pk=row.id, status=RowStatus.RUNNING, claimed_by=worker_id).update(
            status=RowStatus.PENDING,
            claimed_by="",
            started_at=None,
            attempts=F("attempts") + outcome.attempts,
            error=outcome.error,
            raw_answer=outcome.raw_answer,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
        ):
            asked.append(outcome)
    return asked


def _settle_failed_lines(
    failed: list[tuple[ClaimedRow, str]], *, job_id, worker_id: str, running: bool, now
) -> int:
    """A failed line's row: pending again (a follow-up batch sends it, with
    attempt + 1) while the job runs and STRINGSIGHT_MAX_ATTEMPTS allows,
    else failed with the reason; cancelled if the job no longer runs.
    Returns the rows failed."""
    by_reason: dict[str, list[int]] = {}
    for row, reason in failed:
        by_reason.setdefault(reason, []).append(row.id)
    failed_rows = 0
    for reason, ids in by_reason.items():
        mine = ExtractRow.objects.filter(pk__in=ids, status=RowStatus.RUNNING, claimed_by=worker_id)
        if not running:
            mine.update(status=RowStatus.CANCELLED, attempts=F("attempts") + 1, error=reason, finished_at=now)
            continue
        again = mine.filter(attempts__lt=settings.STRINGSIGHT_MAX_ATTEMPTS - 1).update(
            status=RowStatus.PENDING, attempts=F("attempts") + 1, error=reason, claimed_by="", started_at=None
        )
        failed_here = mine.update(
            status=RowStatus.FAILED, attempts=F("attempts") + 1, error=reason, finished_at=now
        )
        failed_rows += failed_here
        log_event("batch_lines_failed", job_id=job_id, sent_again=again, failed=failed_here, reason=reason)
    return failed_rows


def _no_line_reason(batch: ProviderBatch, provider: BatchProvider) -> str:
    batch.refresh_from_db(fields=["provider_status"])
    status = batch.provider_status
    if status == "expired":
        return "the provider's batch expired (24h window) before answering this line"
    if status == "cancelled":
        return "the provider's batch was cancelled before answering this line"
    if status == "failed":
        return (
            f"the provider's batch failed: {_batch_errors(batch, provider) or 'its input file was refused'}"
        )
    return f"the provider's batch ended ({status}) without a line for this row"


def _batch_errors(batch: ProviderBatch, provider: BatchProvider) -> str:
    """What the provider said of a failed batch (its input file's errors), key struck out."""
    try:
        errors = provider.retrieve(batch.batch_id).errors
    except openai.APIError:
        return ""
    said = "; ".join(error.message for error in (errors.data or []) if error.message) if errors else ""
    return redact(said, provider.api_key)[:300]
