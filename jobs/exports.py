"""Properties as downloadable files: JSONL, CSV and Parquet.

Every format streams chunk by chunk from a database cursor, so memory stays
bounded however many properties a job has: Parquet is written a row group
per chunk.
"""

import io
import json
import re
from collections.abc import Iterable, Iterator
from itertools import islice

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from django.db.models import F, TextField
from django.db.models.functions import Cast, Coalesce

from .models import PROPERTY_CONTENT

# row_index: the row's position in the job; input_index: the caller's own
# index of it (its `__index`, else its position in the request).
EXPORT_FIELDS = ("id", "job_id", "row_index", "input_index", *PROPERTY_CONTENT)
CHUNK = 2000

CONTENT_TYPES = {
    "jsonl": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}


class JSONText(str):
    """A value that is JSON text already, written out as it is."""


def property_records(properties, *, evidence_as_json: bool = False) -> Iterator[dict]:
    """Each property as a plain dict, in job and input order, read in chunks.

    Ids and evidence are read as text: Django's converters (a UUID object
    per id, a JSON decode per evidence list) would otherwise take most of an
    export's time (#4 in BENCHMARKS.md).
    With `evidence_as_json` the evidence stays the JSON text it is stored as."""
    rows = (
        properties.order_by("job_id", "row_index", "position")
        .annotate(
            id_text=Cast("id", TextField()),
            job_text=Cast("job_id", TextField()),
            evidence_text=Cast("evidence", TextField()),
            # Null for properties stored before it was recorded.
            caller_index=Coalesce(F("input_index"), F("row_index")),
        )
        .values_list(
            "id_text", "job_text", "row_index", "caller_index", *EXPORT_FIELDS[4:-1], "evidence_text"
        )
    )
    for values in rows.iterator(chunk_size=CHUNK):
        record = dict(zip(EXPORT_FIELDS, values, strict=True))
        record["id"] = _dashed(record["id"])
        record["job_id"] = _dashed(record["job_id"])
        evidence = record["evidence"]
        if not evidence_as_json:
            record["evidence"] = json.loads(evidence)
        elif "\\u" in evidence:
            # SQLite stores JSON with non-ASCII escaped; a spreadsheet should show "ü".
            record["evidence"] = JSONText(json.dumps(json.loads(evidence), ensure_ascii=False))
        else:
            record["evidence"] = JSONText(evidence)
        yield record


def _dashed(uuid_text: str) -> str:
    # SQLite keeps UUIDs as 32 hex digits; PostgreSQL's text has the dashes.
    if len(uuid_text) == 32:
        return f"{uuid_text[:8]}-{uuid_text[8:12]}-{uuid_text[12:16]}-{uuid_text[16:20]}-{uuid_text[20:]}"
    return uuid_text


def jsonl_chunks(records: Iterable[dict]) -> Iterator[str]:
    for chunk in _chunked(records):
        yield "".join(_jsonl_line(record) for record in chunk)


def _jsonl_line(record: dict) -> str:
    # orjson: the standard library's encoder would take most of an export's
    # time (#4 in BENCHMARKS.md).
    evidence = record["evidence"]
    if not isinstance(evidence, JSONText):
        return orjson.dumps(record).decode() + "\n"
    head = orjson.dumps({key: value for key, value in record.items() if key != "evidence"}).decode()
    return f'{head[:-1]},"evidence":{evidence}}}\n'


# A cell a spreadsheet would read as a formula (=, +, -, @, or a tab or CR
# before one) gets a leading apostrophe, as OWASP advises; so does a cell
# that already starts with apostrophes before one, so that taking one
# leading apostrophe off always gives the value back.
_FORMULA = re.compile(r"'*[=+\-@\t\r]")


def csv_safe(value):
    if isinstance(value, str) and _FORMULA.match(value):
        return "'" + value
    return value


def csv_chunks(records: Iterable[dict]) -> Iterator[str]:
    """CSV with `evidence` as a JSON list in its cell, so it reads back exactly."""
    header = True
    for chunk in _chunked(records):
        for record in chunk:
            evidence = record["evidence"]
            if not isinstance(evidence, JSONText):
                record["evidence"] = json.dumps(evidence, ensure_ascii=False)
            for name, value in record.items():
                record[name] = csv_safe(value)
        frame = pd.DataFrame.from_records(chunk, columns=list(EXPORT_FIELDS))
        # CRLF, as RFC 4180 has it: then a cell holding a lone CR is quoted
        # too, where with LF lines it split the row.
        yield frame.to_csv(index=False, header=header, lineterminator="\r\n")
        header = False
    if header:
        yield ",".join(EXPORT_FIELDS) + "\r\n"


# The text formats, by name; parquet is binary (parquet_chunks).
TEXT_WRITERS = {"jsonl": jsonl_chunks, "csv": csv_chunks}


def export_records(properties, export_format: str) -> Iterator[dict]:
    """property_records in the form `export_format`'s writer takes: the
    text formats write the evidence's stored JSON text as it is."""
    return property_records(properties, evidence_as_json=export_format in TEXT_WRITERS)


PARQUET_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("job_id", pa.string()),
        ("row_index", pa.int64()),
        ("input_index", pa.int64()),
        ("question_id", pa.string()),
        ("model", pa.string()),
        ("property_description", pa.string()),
        ("category", pa.string()),
        ("reason", pa.string()),
        ("behavior_type", pa.string()),
        ("contains_errors", pa.bool_()),
        ("unexpected_behavior", pa.bool_()),
        ("evidence", pa.list_(pa.string())),
    ]
)


class _Sink(io.RawIOBase):
    """Where ParquetWriter writes: the bytes are handed on after each row group."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


def parquet_chunks(records: Iterable[dict]) -> Iterator[bytes]:
    """A Parquet file written a row group per chunk of records, its bytes
    handed on as they are written, so memory stays bounded however many
    properties there are."""
    sink = _Sink()
    with pq.ParquetWriter(sink, PARQUET_SCHEMA) as writer:
        for chunk in _chunked(records):
            writer.write_table(pa.Table.from_pylist(chunk, schema=PARQUET_SCHEMA))
            yield sink.take()
    yield sink.take()


def _chunked(records: Iterable[dict]) -> Iterator[list[dict]]:
    iterator = iter(records)
    while chunk := list(islice(iterator, CHUNK)):
        yield chunk
