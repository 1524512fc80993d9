"""Properties as downloadable files: JSONL, CSV and Parquet.

JSONL and CSV stream chunk by chunk from a database cursor, so memory stays
bounded however many properties a job has; Parquet is written by pandas
(pyarrow) from the whole set, as the format needs.
"""

import io
import json
from collections.abc import Iterable, Iterator
from itertools import islice

import pandas as pd

EXPORT_FIELDS = (
    "id",
    "job_id",
    "row_index",
    "question_id",
    "model",
    "property_description",
    "category",
    "reason",
    "evidence",
    "behavior_type",
    "contains_errors",
    "unexpected_behavior",
)
CHUNK = 2000

CONTENT_TYPES = {
    "jsonl": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}


def property_records(properties) -> Iterator[dict]:
    """Each property as a plain dict, in job and input order, read in chunks."""
    rows = properties.order_by("job_id", "row_index", "position").values_list(*EXPORT_FIELDS)
    for values in rows.iterator(chunk_size=CHUNK):
        record = dict(zip(EXPORT_FIELDS, values, strict=True))
        record["id"] = str(record["id"])
        record["job_id"] = str(record["job_id"])
        yield record


def jsonl_chunks(records: Iterable[dict]) -> Iterator[str]:
    for chunk in _chunked(records):
        yield "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in chunk)


def csv_chunks(records: Iterable[dict]) -> Iterator[str]:
    """CSV with `evidence` as a JSON list in its cell, so it reads back exactly."""
    header = True
    for chunk in _chunked(records):
        frame = pd.DataFrame.from_records(chunk, columns=list(EXPORT_FIELDS))
        frame["evidence"] = frame["evidence"].map(lambda quotes: json.dumps(quotes, ensure_ascii=False))
        yield frame.to_csv(index=False, header=header)
        header = False
    if header:
        yield ",".join(EXPORT_FIELDS) + "\n"


def parquet_bytes(records: Iterable[dict]) -> bytes:
    frame = pd.DataFrame.from_records(list(records), columns=list(EXPORT_FIELDS))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def read_export(data: bytes, export_format: str) -> pd.DataFrame:
    """The inverse of the writers above, for clients and tests."""
    if export_format == "jsonl":
        return pd.read_json(io.BytesIO(data), lines=True, dtype={"question_id": str})
    if export_format == "csv":
        frame = pd.read_csv(io.BytesIO(data), dtype={"question_id": str}, keep_default_na=False)
        frame["evidence"] = frame["evidence"].map(json.loads)
        return frame
    return pd.read_parquet(io.BytesIO(data))


def _chunked(records: Iterable[dict]) -> Iterator[list[dict]]:
    iterator = iter(records)
    while chunk := list(islice(iterator, CHUNK)):
        yield chunk
