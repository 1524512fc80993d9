"""Response bodies as plain dicts: a job's status is one row read, and a
result is one query over the job's properties in input order."""

from collections.abc import Iterator
from itertools import islice

import orjson
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone

from extraction.rows import INDEX_COLUMN

from ..models import PROPERTY_CONTENT, ExtractJob, JobState, RowStatus

PROPERTY_FIELDS = ("id", "row_index", "input_index", *PROPERTY_CONTENT)
# Properties stored before input_index was recorded have none: their
# position in the job stands in for it.
CALLER_INDEX = Coalesce(F("input_index"), F("row_index"))


def status_payload(job: ExtractJob) -> dict:
    return {
        "job_id": job.id,
        "state": job.state,
        "kind": job.kind,
        "progress": job.progress,
        "count_done": job.count_done,
        "count_failed": job.count_failed,
        "count_total": job.count_total,
        "properties_count": job.properties_count,
        "error": job.error or None,
        "method": job.method,
        "model_name": job.model_name,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "cancelled_at": job.cancelled_at,
        "usage": {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.total_tokens,
        },
        "cost_usd": job.cost_usd,
        "cache_hits": job.cache_hits,
        "sample_size": job.sample_size,
        "budget": {"max_cost_usd": job.max_cost_usd, "max_total_tokens": job.max_total_tokens},
    }


def result_payload(job: ExtractJob, *, seed: bool = False) -> dict:
    properties = property_payloads(job.properties.order_by("row_index", "position"), seed=seed)
    return {
        "job_id": job.id,
        "state": job.state,
        "cancelled": job.state == JobState.CANCELLED,
        "count": len(properties),
        "properties": properties,
    }


def property_payloads(properties, *, seed: bool) -> list[dict]:
    """Properties as the API lists them. The RESTful API reports a row's
    position in the job as `row_index` and the caller's index of the row as
    `input_index`. The seed paths report the caller's index as `row_index`
    and `__index`, as upstream StringSight does: the StringSight frontend
    opens the conversation whose `__index` equals them."""
    return [as_listed(record, seed=seed) for record in _property_values(properties)]


def _property_values(properties):
    return properties.annotate(caller_index=CALLER_INDEX).values("caller_index", *PROPERTY_FIELDS)


def as_listed(record: dict, *, seed: bool) -> dict:
    caller_index = record.pop("caller_index")
    if seed:
        del record["input_index"]
        record["row_index"] = record[INDEX_COLUMN] = caller_index
    else:
        record["input_index"] = caller_index
    return record


RESULT_CHUNK = 2000


def result_chunks(job: ExtractJob, *, seed: bool = False) -> Iterator[bytes]:
    """result_payload as the bytes DRF's JSONRenderer writes for it, a batch
    of properties at a time from a database cursor. A finished job's
    properties no longer change, so the count read first is the count sent."""
    properties = job.properties.order_by("row_index", "position")
    head = {
        "job_id": job.id,
        "state": job.state,
        "cancelled": job.state == JobState.CANCELLED,
        "count": properties.count(),
    }
    yield _as_drf_writes(orjson.dumps(head)[:-1] + b',"properties":[')
    rows = _property_values(properties).iterator(chunk_size=RESULT_CHUNK)
    separator = b""
    while batch := list(islice(rows, RESULT_CHUNK)):
        encoded = b",".join(orjson.dumps(as_listed(record, seed=seed)) for record in batch)
        yield separator + _as_drf_writes(encoded)
        separator = b","
    yield b"]}"


def _as_drf_writes(data: bytes) -> bytes:
    # DRF's renderer escapes these two for JavaScript; orjson writes them as they are.
    return data.replace("\u2028".encode(), b"\\u2028").replace("\u2029".encode(), b"\\u2029")


ROW_FIELDS = (
    "index",
    "input_index",
    "question_id",
    "status",
    "attempts",
    "error",
    "raw_answer",
    "properties_dropped",
    "cached",
    "prompt_tokens",
    "completion_tokens",
    "claimed_by",
    "started_at",
    "finished_at",
)


def detail_payload(job: ExtractJob) -> dict:
    """The status plus a count per row outcome and, while running, the rate
    and an ETA. Only in-flight rows are counted (at most max_workers of
    them, from an index); every other count follows from the counters."""
    running = job.rows.filter(status=RowStatus.RUNNING).count() if job.is_active else 0
    unfinished = job.count_total - job.count_finished
    outcomes = {
        "done": job.count_done,
        "failed": job.count_failed,
        "running": running,
        "pending": unfinished - running if job.is_active else 0,
        "cancelled": 0 if job.is_active else unfinished,
    }
    rate = eta = None
    if job.state == JobState.RUNNING and job.started_at and job.count_finished:
        elapsed = (timezone.now() - job.started_at).total_seconds()
        rate = job.count_finished / elapsed if elapsed > 0 else None
        eta = unfinished / rate if rate else None
    return {**status_payload(job), "outcomes": outcomes, "rows_per_second": rate, "eta_seconds": eta}
