"""Every body the API answers about a job, and what the CLI shows, built
here once. Each body is a table of its fields, each field with what the
API's schema says of it (a DRF serializer field) and how to read it from
the job, row or property: `Body.of` builds the body from the table and
jobs.api.serializers documents the same table, so the two cannot differ.

A status is one row read (a batch-mode job's provider batches one more);
a list reads each job's standing in the list's own query
(services.standing.with_standing) and the batch-mode jobs' provider
batches in one more; properties are read as plain values, in input
order, and a result is streamed a batch at a time."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter
from typing import Any

import orjson
from django.db.models import F, Prefetch, prefetch_related_objects
from django.db.models.functions import Coalesce
from django.utils import timezone
from rest_framework import serializers

from extraction.extract import RowOutcome
from extraction.rows import INDEX_COLUMN

from .models import (
    ExtractJob,
    ExtractRow,
    JobKind,
    JobMode,
    JobState,
    Method,
    ProviderBatch,
    ProviderBatchState,
    RowStatus,
)
from .services import standing
from .services.lifecycle import CancelOutcome


@dataclass(frozen=True)
class Out:
    """One field of a body: its schema, and how to read it from the body's
    source (by default the source's attribute of the field's name)."""

    schema: serializers.Field
    read: Callable[[Any], Any] | None = None


class Body:
    """A body's fields, in order; `serializer` documents it (the class name
    less "Serializer" is the schema component's name)."""

    def __init__(self, name: str, fields: dict[str, Out]):
        self.fields = fields
        self._reads = [(field, out.read or attrgetter(field)) for field, out in fields.items()]
        self.serializer = type(
            f"{name}Serializer",
            (serializers.Serializer,),
            {field: out.schema for field, out in fields.items()},
        )
        # DRF orders fields by when they were made; the schema keeps the table's order.
        self.serializer._declared_fields = {field: out.schema for field, out in fields.items()}

    def of(self, source, *, leaving_out: tuple[str, ...] = ()) -> dict:
        return {field: read(source) for field, read in self._reads if field not in leaving_out}

    def nested(self, **options) -> serializers.Serializer:
        return self.serializer(**options)


USAGE = Body(
    "Usage",
    {
        "prompt_tokens": Out(serializers.IntegerField()),
        "completion_tokens": Out(serializers.IntegerField()),
        "total_tokens": Out(serializers.IntegerField()),
    },
)
REQUEST_COUNTS = Body(
    "RequestCounts",
    {
        name: Out(serializers.IntegerField(), lambda counts, name=name: counts.get(name, 0))
        for name in ("total", "completed", "failed")
    },
)
PROVIDER_BATCH = Body(
    "ProviderBatch",
    {
        "id": Out(serializers.CharField(help_text="The provider's batch id."), attrgetter("batch_id")),
        "status": Out(
            serializers.CharField(
                help_text="The provider's status: validating, in_progress, finalizing, completed, "
                "failed, expired, cancelling or cancelled."
            ),
            attrgetter("provider_status"),
        ),
        "request_counts": Out(
            REQUEST_COUNTS.nested(help_text="The provider's count of the batch's requests."),
            lambda batch: REQUEST_COUNTS.of(batch.request_counts or {}),
        ),
    },
)
# A job's batches with a provider id, as the status lists them.
LISTED_BATCHES = ProviderBatch.objects.exclude(batch_id="").order_by("created_at", "attempt")


def with_provider_batches(jobs: list[ExtractJob]) -> list[ExtractJob]:
    """The jobs (a page, or one), each batch-mode job with its provider
    batches read afresh, in one query for all of them; none for online jobs."""
    batch_jobs = [job for job in jobs if job.mode == JobMode.BATCH]
    for job in batch_jobs:
        vars(job).pop("listed_batches", None)  # a job polled again (the CLI's) reads them again
    if batch_jobs:
        prefetch_related_objects(
            batch_jobs, Prefetch("provider_batches", queryset=LISTED_BATCHES, to_attr="listed_batches")
        )
    return jobs


def listed_batches(job: ExtractJob) -> list[ProviderBatch]:
    if job.mode != JobMode.BATCH:
        return []
    if "listed_batches" not in vars(job):
        with_provider_batches([job])
    return job.listed_batches


def holds_results(batch: ProviderBatch) -> bool:
    """Whether the provider holds results of this batch not imported yet:
    it was created there, and is neither imported nor given up."""
    return bool(batch.batch_id) and batch.state not in (
        ProviderBatchState.IMPORTED,
        ProviderBatchState.ABANDONED,
    )


def pending_provider_results(job: ExtractJob) -> bool:
    return any(holds_results(batch) for batch in listed_batches(job))


BUDGET = Body(
    "Budget",
    {
        "max_cost_usd": Out(serializers.FloatField(allow_null=True)),
        "max_total_tokens": Out(serializers.IntegerField(allow_null=True)),
    },
)
STATUS = Body(
    "JobStatus",
    {
        "job_id": Out(serializers.UUIDField(), attrgetter("id")),
        "state": Out(serializers.ChoiceField(choices=JobState.choices)),
        "kind": Out(
            serializers.ChoiceField(
                choices=JobKind.choices,
                help_text="rows: rows run by workers; single: one row extracted by /extract/single.",
            )
        ),
        "mode": Out(
            serializers.ChoiceField(
                choices=JobMode.choices,
                help_text="online: live calls. batch: the provider's Batch API, at its batch price.",
            )
        ),
        "progress": Out(
            serializers.FloatField(help_text="Finished rows (done or failed) over all rows, 0..1.")
        ),
        "count_done": Out(serializers.IntegerField()),
        "count_failed": Out(serializers.IntegerField()),
        "count_total": Out(serializers.IntegerField()),
        "properties_count": Out(serializers.IntegerField()),
        "error": Out(serializers.CharField(allow_null=True), lambda job: job.error or None),
        "method": Out(serializers.ChoiceField(choices=Method.choices)),
        "model_name": Out(serializers.CharField()),
        "created_at": Out(serializers.DateTimeField()),
        "started_at": Out(serializers.DateTimeField(allow_null=True)),
        "finished_at": Out(serializers.DateTimeField(allow_null=True)),
        "cancelled_at": Out(serializers.DateTimeField(allow_null=True)),
        "usage": Out(USAGE.nested(), USAGE.of),
        "cost_usd": Out(
            serializers.FloatField(
                allow_null=True,
                help_text="Estimated from the tokens used; null when no price is known for the model.",
            )
        ),
        "cache_hits": Out(
            serializers.IntegerField(help_text="Rows answered from the completion cache, with no LLM call.")
        ),
        "sample_size": Out(serializers.IntegerField(allow_null=True)),
        "budget": Out(BUDGET.nested(), BUDGET.of),
        "queue_position": Out(
            serializers.IntegerField(
                allow_null=True,
                help_text="While queued: the queued jobs (of every user) created before this one, "
                "which workers take up first. Null otherwise.",
            ),
            standing.queue_position,
        ),
        "calls_in_flight": Out(
            serializers.IntegerField(
                help_text="While running: the job's LLM calls in flight across all workers. 0 otherwise."
            ),
            standing.calls_in_flight,
        ),
        "provider_batches": Out(
            PROVIDER_BATCH.nested(
                many=True,
                help_text="Batch mode: the job's batches at the provider, oldest first. "
                "Empty for online jobs.",
            ),
            lambda job: [PROVIDER_BATCH.of(batch) for batch in listed_batches(job)],
        ),
        "pending_provider_results": Out(
            serializers.BooleanField(
                help_text="Batch mode: the provider holds results not imported yet, so the counts and "
                "properties may still grow, also after a cancel (results the provider completed before "
                "it acknowledged the cancel). Always false for online jobs."
            ),
            pending_provider_results,
        ),
    },
)


def status_payload(job: ExtractJob) -> dict:
    return STATUS.of(with_provider_batches([job])[0])


def status_payloads(jobs) -> list[dict]:
    """A page of statuses: the batch-mode jobs' provider batches are read
    for the whole page at once."""
    return [STATUS.of(job) for job in with_provider_batches(list(jobs))]


def row_outcomes(job: ExtractJob) -> dict:
    """A count per row outcome. Only in-flight rows are counted (at most
    max_workers of them, from an index); every other count follows from
    the counters."""
    running = job.rows.filter(status=RowStatus.RUNNING).count() if job.is_active else 0
    unfinished = job.count_total - job.count_finished
    return {
        "done": job.count_done,
        "failed": job.count_failed,
        "running": running,
        "pending": unfinished - running if job.is_active else 0,
        "cancelled": 0 if job.is_active else unfinished,
    }


def rows_per_second(job: ExtractJob) -> float | None:
    if job.state != JobState.RUNNING or not job.started_at or not job.count_finished:
        return None
    elapsed = (timezone.now() - job.started_at).total_seconds()
    return job.count_finished / elapsed if elapsed > 0 else None


def eta_seconds(job: ExtractJob) -> float | None:
    rate = rows_per_second(job)
    return (job.count_total - job.count_finished) / rate if rate else None


OUTCOMES = Body(
    "Outcomes",
    {
        "done": Out(serializers.IntegerField()),
        "failed": Out(serializers.IntegerField()),
        "running": Out(serializers.IntegerField()),
        "pending": Out(serializers.IntegerField()),
        "cancelled": Out(serializers.IntegerField()),
    },
)
DETAIL = Body(
    "JobDetail",
    {
        **STATUS.fields,
        "outcomes": Out(
            OUTCOMES.nested(help_text="Rows per outcome; they add up to count_total."), row_outcomes
        ),
        "rows_per_second": Out(
            serializers.FloatField(allow_null=True, help_text="While running: rows finished per second."),
            rows_per_second,
        ),
        "eta_seconds": Out(
            serializers.FloatField(allow_null=True, help_text="While running: seconds until the last row."),
            eta_seconds,
        ),
    },
)


def detail_payload(job: ExtractJob) -> dict:
    """The status plus a count per row outcome and, while running, the rate and an ETA."""
    return DETAIL.of(with_provider_batches([job])[0])


CANCEL = Body(
    "CancelResponse",
    {
        "job_id": Out(serializers.UUIDField(), lambda outcome: outcome.job.id),
        "state": Out(serializers.ChoiceField(choices=JobState.choices), lambda outcome: outcome.job.state),
        "message": Out(serializers.CharField()),
        "properties_count": Out(
            serializers.IntegerField(
                help_text="Final for an online job: it never changes after the cancel. A batch-mode "
                "job's grows while its status says pending_provider_results: the provider's results "
                "completed before it acknowledged the cancel are imported when it hands them over."
            ),
            lambda outcome: outcome.job.properties_count,
        ),
    },
)


def cancel_payload(outcome: CancelOutcome) -> dict:
    return CANCEL.of(outcome)


CALLER_INDEX_HELP = (
    "The caller's index of the row: its __index when it had one, else its position in the request."
)
ROW = Body(
    "RowOutcome",
    {
        "index": Out(serializers.IntegerField()),
        "input_index": Out(
            serializers.IntegerField(help_text=CALLER_INDEX_HELP),
            # Rows stored before it was recorded have none: their position stands in.
            lambda row: row.index if row.input_index is None else row.input_index,
        ),
        "question_id": Out(serializers.CharField()),
        "status": Out(serializers.ChoiceField(choices=RowStatus.choices)),
        "attempts": Out(serializers.IntegerField(help_text="LLM calls made for the row.")),
        "error": Out(serializers.CharField(allow_blank=True)),
        "raw_answer": Out(
            serializers.CharField(allow_blank=True, help_text="The LLM's answer, kept once per row.")
        ),
        "properties_dropped": Out(
            serializers.IntegerField(help_text="Invalid items in the answer that were dropped.")
        ),
        "cached": Out(serializers.BooleanField()),
        "prompt_tokens": Out(serializers.IntegerField()),
        "completion_tokens": Out(serializers.IntegerField()),
        "claimed_by": Out(
            serializers.CharField(allow_blank=True, help_text="The worker that holds or last held the row.")
        ),
        "started_at": Out(serializers.DateTimeField(allow_null=True)),
        "finished_at": Out(serializers.DateTimeField(allow_null=True)),
    },
)


def row_items(rows) -> list[dict]:
    """A page of a job's rows (ExtractRow), each with its outcome."""
    return [ROW.of(row) for row in rows]


def rows_for_page(job: ExtractJob):
    """The row columns ROW reads, and no others: not the transcript. (Not
    `job.rows`: its rows would each read their deferred job_id, one query
    a row, to be linked to the job.)"""
    return ExtractRow.objects.filter(job_id=job.pk).only(*ROW.fields)


# What a property says, as the API lists it; its source is a record of
# property_values (the caller's index of its row read as `caller_index`).
PROPERTY_CONTENT = {
    "id": Out(serializers.UUIDField()),
    "question_id": Out(serializers.CharField()),
    "model": Out(serializers.CharField()),
    "property_description": Out(serializers.CharField()),
    "category": Out(serializers.CharField(allow_blank=True)),
    "reason": Out(serializers.CharField(allow_blank=True)),
    "evidence": Out(serializers.ListField(child=serializers.CharField(allow_blank=True))),
    "behavior_type": Out(serializers.CharField()),
    "contains_errors": Out(serializers.BooleanField()),
    "unexpected_behavior": Out(serializers.BooleanField()),
}
# The RESTful API reports a row's position in the job as `row_index` and
# the caller's index of the row as `input_index`.
PROPERTY = Body(
    "Property",
    {
        **PROPERTY_CONTENT,
        "row_index": Out(
            serializers.IntegerField(help_text="The row's position in the job (after sampling).")
        ),
        "input_index": Out(serializers.IntegerField(help_text=CALLER_INDEX_HELP)),
    },
)
# The seed paths report the caller's index as `row_index` and `__index`, as
# upstream StringSight does: the StringSight frontend opens the
# conversation whose `__index` equals them.
SEED_PROPERTY = Body(
    "SeedProperty",
    {
        **PROPERTY_CONTENT,
        "row_index": Out(serializers.IntegerField(help_text=CALLER_INDEX_HELP)),
        INDEX_COLUMN: Out(serializers.IntegerField(help_text="The same as row_index.")),
    },
)
# Properties stored before input_index was recorded have none: their
# position in the job stands in for it.
CALLER_INDEX = Coalesce(F("input_index"), F("row_index"))


def property_values(properties):
    """The properties as records of the columns PROPERTY reads."""
    return properties.annotate(caller_index=CALLER_INDEX).values(*PROPERTY.fields, "caller_index")


def as_listed(record: dict, *, seed: bool) -> dict:
    """A record of property_values as PROPERTY (or, with `seed`, SEED_PROPERTY) lists it."""
    caller_index = record.pop("caller_index")
    if seed:
        del record["input_index"]
        record["row_index"] = record[INDEX_COLUMN] = caller_index
    else:
        record["input_index"] = caller_index
    return record


def property_payloads(properties, *, seed: bool) -> list[dict]:
    return [as_listed(record, seed=seed) for record in property_values(properties)]


def in_input_order(job: ExtractJob):
    return job.properties.order_by("row_index", "position")


RESULT = Body(
    "Result",
    {
        "job_id": Out(serializers.UUIDField(), attrgetter("id")),
        "state": Out(serializers.ChoiceField(choices=JobState.choices)),
        "cancelled": Out(serializers.BooleanField(), lambda job: job.state == JobState.CANCELLED),
        # A finished job's properties no longer change: the count read first is the count sent.
        "count": Out(serializers.IntegerField(), lambda job: in_input_order(job).count()),
        "properties": Out(
            PROPERTY.nested(many=True), lambda job: property_payloads(in_input_order(job), seed=False)
        ),
    },
)
SEED_RESULT = Body(
    "SeedResult",
    {
        **RESULT.fields,
        "properties": Out(
            SEED_PROPERTY.nested(many=True), lambda job: property_payloads(in_input_order(job), seed=True)
        ),
    },
)


def result_payload(job: ExtractJob, *, seed: bool = False) -> dict:
    return (SEED_RESULT if seed else RESULT).of(job)


RESULT_CHUNK = 2000


def result_chunks(job: ExtractJob, *, seed: bool = False) -> Iterator[bytes]:
    """result_payload as the bytes DRF's JSONRenderer writes for it, a batch
    of properties at a time from a database cursor."""
    head = (SEED_RESULT if seed else RESULT).of(job, leaving_out=("properties",))
    yield _as_drf_writes(orjson.dumps(head)[:-1] + b',"properties":[')
    records = property_values(in_input_order(job)).iterator(chunk_size=RESULT_CHUNK)
    separator = b""
    while batch := list(islice(records, RESULT_CHUNK)):
        encoded = b",".join(orjson.dumps(as_listed(record, seed=seed)) for record in batch)
        yield separator + _as_drf_writes(encoded)
        separator = b","
    yield b"]}"


def _as_drf_writes(data: bytes) -> bytes:
    # DRF's renderer escapes these two for JavaScript; orjson writes them as they are.
    return data.replace("\u2028".encode(), b"\\u2028").replace("\u2029".encode(), b"\\u2029")


FAILURES_SHOWN = 5  # as upstream: the first parse failures, with return_debug


@dataclass(frozen=True)
class SingleExtraction:
    """A row extracted by /extract/single, for its answer."""

    job: ExtractJob
    outcome: RowOutcome
    properties: list[dict]
    return_debug: bool


SINGLE_DEBUG = Body(
    "ExtractSingleDebug",
    {
        "raw_answer": Out(serializers.CharField(allow_blank=True), lambda single: single.outcome.raw_answer),
        "prompt_tokens": Out(serializers.IntegerField(), lambda single: single.job.prompt_tokens),
        "completion_tokens": Out(serializers.IntegerField(), lambda single: single.job.completion_tokens),
        "total_tokens": Out(serializers.IntegerField(), lambda single: single.job.total_tokens),
        "cost_usd": Out(
            serializers.FloatField(allow_null=True, help_text="Null when no price is known for the model."),
            lambda single: single.job.cost_usd,
        ),
        "cached": Out(
            serializers.BooleanField(help_text="The answer came from the completion cache."),
            lambda single: single.outcome.cached,
        ),
        "attempts": Out(serializers.IntegerField(), lambda single: single.outcome.attempts),
        "dropped": Out(
            serializers.IntegerField(help_text="Items of the answer that were not valid properties."),
            lambda single: single.outcome.dropped,
        ),
    },
)
PROPERTY_COUNTS = Body(
    "PropertyCounts", {"properties": Out(serializers.IntegerField(), lambda single: len(single.properties))}
)


def _failures(single: SingleExtraction) -> list[str]:
    if not single.return_debug:
        return []
    failures = single.outcome.problems or ([single.outcome.error] if single.outcome.error else [])
    return failures[:FAILURES_SHOWN]


SINGLE = Body(
    "ExtractSingleResponse",
    {
        "job_id": Out(
            serializers.UUIDField(help_text="The one-row job (kind single) that records this extraction."),
            lambda single: single.job.id,
        ),
        "properties": Out(SEED_PROPERTY.nested(many=True)),
        "counts": Out(PROPERTY_COUNTS.nested(), PROPERTY_COUNTS.of),
        "failures": Out(
            serializers.ListField(
                child=serializers.CharField(), help_text="With return_debug: up to 5 parse failures."
            ),
            _failures,
        ),
        "error": Out(
            serializers.CharField(
                allow_null=True, help_text="Why the row failed (no valid property, or the LLM call failed)."
            ),
            lambda single: single.outcome.error,
        ),
        "debug": Out(
            SINGLE_DEBUG.nested(required=False, help_text="Only with return_debug."),
            lambda single: SINGLE_DEBUG.of(single) if single.return_debug else None,
        ),
    },
)


def single_payload(job: ExtractJob, outcome: RowOutcome, *, return_debug: bool) -> dict:
    """/extract/single's answer for a row whose outcome is recorded: its
    properties in the seed paths' shape, and with return_debug what the
    call cost and how its answer parsed."""
    properties = property_payloads(job.properties.order_by("position"), seed=True)
    body = SINGLE.of(SingleExtraction(job, outcome, properties, return_debug))
    if not return_debug:
        del body["debug"]
    return body
