"""Rows from a JSONL, JSON, CSV or Parquet file, as the API would receive
them: what `manage.py extract` reads from disk and /detect-and-validate
reads from an upload."""

import datetime
import decimal
import json
import math
from pathlib import PurePosixPath
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from extraction.rows import LONE_SURROGATE, holds_lone_surrogates

INPUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
RESPONSE_COLUMNS = ("model_response", "model_a_response", "model_b_response")
# Read as text from CSV, so that a question id "007" or a model named "4" stays as written.
TEXT_COLUMNS = ("prompt", "model", "model_a", "model_b", "question_id", "winner", *RESPONSE_COLUMNS)


class RowFileError(ValueError):
    """A file that cannot be read as rows; the message says why, without the file's name."""


def input_format(name: str) -> str:
    """The format a file's name says it is in."""
    suffix = PurePosixPath(name).suffix.lower()
    kind = INPUT_FORMATS.get(suffix)
    if kind is None:
        raise RowFileError(
            f"unknown input format {suffix or '(no extension)'!r}; use .jsonl, .json, .csv or .parquet"
        )
    return kind


def read_rows(stream: BinaryIO, kind: str, *, max_values: int | None = None, max_bytes: int | None = None):
    """The rows in `stream`: a list, unless a JSON file holds something else.
    With `max_values`, a table holding more values (its rows and their cells,
    as a start's JSON would) is refused before its rows are built; a Parquet
    file from its metadata before it is read, and with `max_bytes` while it
    is decoded: its few kilobytes can hold millions of rows, or one long
    value repeated in each."""
    try:
        if kind == "jsonl":
            return _read_jsonl(stream)
        if kind == "json":
            return _read_json(stream)
        if kind == "csv":
            frame = pd.read_csv(
                stream,
                dtype=dict.fromkeys(TEXT_COLUMNS, str),
                keep_default_na=False,
                na_values=[""],
                # Every row is a value: past the limit, the rest need not be read.
                nrows=max_values,
            )
        else:
            frame = _read_parquet(stream, max_values=max_values, max_bytes=max_bytes)
    except RowFileError:
        raise
    # A RecursionError: JSON nested thousands deep.
    except (ValueError, OSError, RecursionError) as exc:
        raise RowFileError(f"cannot read it as {kind}: {exc}") from None
    if max_values is not None and frame.size + len(frame) > max_values:
        raise RowFileError(_too_many_values(max_values))
    return [_table_row(record) for record in frame.to_dict(orient="records")]


def _too_many_values(limit: int) -> str:
    return f"more than {limit} values, the limit (STRINGSIGHT_MAX_JSON_VALUES)"


def _read_parquet(stream: BinaryIO, *, max_values: int | None, max_bytes: int | None) -> pd.DataFrame:
    """The file's table, its size checked from its metadata (values) and
    batch by batch as it is decoded (bytes)."""
    parquet = pq.ParquetFile(stream)
    rows, columns = parquet.metadata.num_rows, len(parquet.schema_arrow)
    if max_values is not None and rows * columns + rows > max_values:
        # Said from the metadata, before anything is read.
        raise RowFileError(f"{rows} rows of {columns} columns: {_too_many_values(max_values)}")
    batches, size = [], 0
    for batch in parquet.iter_batches(batch_size=1024):
        size += batch.nbytes
        if max_bytes is not None and size > max_bytes:
            raise RowFileError(
                f"its values take more than {max_bytes} bytes once decoded, more than a request may "
                "hold (STRINGSIGHT_MAX_REQUEST_BYTES)"
            )
        batches.append(batch)
    return pa.Table.from_batches(batches, schema=parquet.schema_arrow).to_pandas()


def _read_jsonl(stream: BinaryIO) -> list:
    # json rather than pandas: pandas would turn a column's ints into floats
    # wherever another row lacks it, and that changes the prompt.
    rows = []
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            rows.append(json.loads(line))
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"line {number}: {exc}") from None
        if holds_lone_surrogates(line, rows[-1]):
            raise ValueError(f"line {number}: {LONE_SURROGATE}")
    return rows


def _read_json(stream: BinaryIO):
    text = stream.read().decode("utf-8")
    data = json.loads(text)
    if holds_lone_surrogates(text, data):
        raise ValueError(LONE_SURROGATE)
    return data["rows"] if isinstance(data, dict) and "rows" in data else data


def _table_row(record: dict) -> dict:
    """A CSV or Parquet record as a JSON row: missing cells are absent, and a
    response column holding a JSON list of chat messages is that list."""
    row = {}
    for column, cell in record.items():
        value = _plain(cell)
        if not isinstance(value, list | dict) and pd.isna(value):
            continue
        if column in RESPONSE_COLUMNS and isinstance(value, str):
            value = _chat_messages(value)
        row[str(column)] = value
    return row


def _plain(value):
    """numpy and pandas values as the JSON-able Python values they stand for."""
    if isinstance(value, np.ndarray | list | tuple):
        return [_nested(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _nested(item) for key, item in value.items()}
    if isinstance(value, datetime.date | datetime.time):  # pandas' Timestamp is a datetime too
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _nested(value):
    value = _plain(value)
    if isinstance(value, float) and math.isnan(value):
        return None  # JSON has no NaN
    return value


def _chat_messages(text: str):
    if not text.lstrip().startswith("["):
        return text
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return parsed if isinstance(parsed, list) else text
