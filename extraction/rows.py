"""Input rows: validate them, detect the method, give each one a question id."""

import hashlib
import json
import math
import random
import re

from stringsight_site import perf

METHODS = ("single_model", "side_by_side")

REQUIRED_COLUMNS = {
    "single_model": ("prompt", "model", "model_response"),
    "side_by_side": ("prompt", "model_a", "model_b", "model_a_response", "model_b_response"),
}

_TEXT_COLUMNS = {
    "single_model": ("prompt", "model"),
    "side_by_side": ("prompt", "model_a", "model_b"),
}

_RESPONSE_COLUMNS = {
    "single_model": ("model_response",),
    "side_by_side": ("model_a_response", "model_b_response"),
}

# Stored in columns of 200 characters (rows' question_id, properties' model):
# a longer value is refused at the start, where the caller can fix it,
# rather than failing the worker's insert.
MAX_NAME_CHARS = 200
_NAME_COLUMNS = {
    "single_model": ("model", "question_id"),
    "side_by_side": ("model_a", "model_b", "question_id"),
}


class RowError(ValueError):
    """A row, or the rows as a whole, cannot be used; `field` says where."""

    def __init__(self, message: str, *, field: str, index: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.index = index

    def __str__(self) -> str:
        return self.message


def json_type(value) -> str:
    """The JSON name of a Python value's type, for messages a client can act on."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_number(value) -> bool:
    # JSON booleans arrive as bool, which is an int subclass; they are not scores.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    # 1e400 reads as infinity, which JSON cannot write back (it became null).
    return _is_number(value) and (isinstance(value, int) or math.isfinite(value))


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, str | list | dict) and not value)


def _quoted(names) -> str:
    return ", ".join(f"'{name}'" for name in names)


def validate_rows(rows, method: str | None = None) -> str:
    """Check `rows` and return the method; raise RowError on the first problem."""
    if not isinstance(rows, list):
        raise RowError(f"rows: expected a list of row objects, got {json_type(rows)}", field="rows")
    if not rows:
        raise RowError("rows: the list is empty; send at least one row", field="rows")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RowError(
                f"rows[{index}]: expected a JSON object, got {json_type(row)}",
                field=f"rows[{index}]",
                index=index,
            )
    # An empty string is what a form sends for "not chosen".
    method = _check_method(method) if method not in (None, "") else detect_method(rows[0])
    for index, row in enumerate(rows):
        _check_columns(row, index, method)
        _check_types(row, index, method)
    return method


def _check_method(method) -> str:
    if method not in METHODS:
        raise RowError(
            f"method: unknown method {method!r}; expected one of {', '.join(METHODS)}",
            field="method",
        )
    return method


def detect_method(row: dict) -> str:
    """side_by_side when the row has both per-model responses, single_model when it has one."""
    if "model_a_response" in row and "model_b_response" in row:
        return "side_by_side"
    if "model_response" in row:
        return "single_model"
    raise RowError(
        "rows[0]: cannot detect the method: the row has neither model_response (single_model) "
        f"nor model_a_response and model_b_response (side_by_side); the row has {_columns(row)}",
        field="rows[0]",
        index=0,
    )


def _columns(row: dict) -> str:
    return ", ".join(str(key) for key in row) or "no columns"


def _check_columns(row: dict, index: int, method: str) -> None:
    required = REQUIRED_COLUMNS[method]
    missing = [column for column in required if column not in row]
    empty = [column for column in required if column in row and _is_empty(row[column])]
    if not missing and not empty:
        return
    problems = []
    if missing:
        problems.append(f"missing column{'s' if len(missing) > 1 else ''} {_quoted(missing)}")
    if empty:
        problems.append(f"empty column{'s' if len(empty) > 1 else ''} {_quoted(empty)}")
    raise RowError(
        f"rows[{index}]: {' and '.join(problems)} "
        f"({method} needs {', '.join(required)}; the row has {_columns(row)})",
        field=f"rows[{index}].{(missing or empty)[0]}",
        index=index,
    )


def _check_types(row: dict, index: int, method: str) -> None:
    def fail(column: str, expected: str, value) -> RowError:
        return RowError(
            f"rows[{index}].{column}: expected {expected}, got {json_type(value)}",
            field=f"rows[{index}].{column}",
            index=index,
        )

    for column in _TEXT_COLUMNS[method]:
        value = row[column]
        if not isinstance(value, str) and not _is_number(value):
            raise fail(column, "a string", value)
        if _is_number(value) and not _is_finite_number(value):
            raise _not_finite(index, column)
    for column in _RESPONSE_COLUMNS[method]:
        _check_response(row[column], index, column)
    question_id = row.get("question_id")
    if question_id is not None and not isinstance(question_id, str) and not _is_number(question_id):
        raise fail("question_id", "a string or a number", question_id)
    if _is_number(question_id) and not _is_finite_number(question_id):
        raise _not_finite(index, "question_id")
    for column in _NAME_COLUMNS[method]:
        value = row.get(column)
        if value is not None and len(str(value)) > MAX_NAME_CHARS:
            raise RowError(
                f"rows[{index}].{column}: {len(str(value))} characters is more than the limit of "
                f"{MAX_NAME_CHARS} characters",
                field=f"rows[{index}].{column}",
                index=index,
            )
    for column in ("score", "score_a", "score_b"):
        score = row.get(column)
        if score is None or _is_finite_number(score):
            continue
        if _is_number(score):
            raise _not_finite(index, column)
        if not isinstance(score, dict):
            raise fail(column, "a number or an object of metric to number", score)
        for metric, value in score.items():
            if _is_number(value) and not _is_finite_number(value):
                raise _not_finite(index, f"{column}.{metric}")
            if not _is_number(value):
                raise fail(f"{column}.{metric}", "a number", value)
    winner = row.get("winner")
    if winner is not None and not isinstance(winner, str):
        raise fail("winner", "a string", winner)


def _not_finite(index: int, column: str) -> RowError:
    return RowError(
        f"rows[{index}].{column}: expected a finite number, got one too large for a float "
        "(JSON has no infinity)",
        field=f"rows[{index}].{column}",
        index=index,
    )


def _check_response(response, index: int, column: str) -> None:
    if isinstance(response, str | dict):
        return
    if isinstance(response, list):
        for position, message in enumerate(response):
            if not isinstance(message, dict):
                raise RowError(
                    f"rows[{index}].{column}[{position}]: expected a chat message object, "
                    f"got {json_type(message)}",
                    field=f"rows[{index}].{column}",
                    index=index,
                )
        return
    raise RowError(
        f"rows[{index}].{column}: expected a string, an object or a list of chat messages, "
        f"got {json_type(response)}",
        field=f"rows[{index}].{column}",
        index=index,
    )


def question_id_for(row: dict, index: int) -> str:
    """The row's own question_id, else one derived from the prompt so equal prompts share it."""
    question_id = row.get("question_id")
    if question_id is not None:
        return str(question_id)
    prompt = row.get("prompt")
    if prompt is None or prompt == "":
        return f"row-{index}"
    return "q-" + hashlib.sha1(str(prompt).encode("utf-8")).hexdigest()[:12]


# The StringSight frontend numbers its rows in this column and finds a
# property's conversation by it.
INDEX_COLUMN = "__index"
MAX_INPUT_INDEX = 2**31 - 1  # what the database's integer column holds


def input_index_for(row: dict, position: int) -> int:
    """The caller's own index of a row: its integer `__index` when it has a
    usable one, else its position in the request."""
    value = row.get(INDEX_COLUMN)
    if _is_number(value) and isinstance(value, int) and 0 <= value <= MAX_INPUT_INDEX:
        return value
    return position


DEFAULT_SAMPLE_SEED = 42


def sample_indexes(count: int, size: int | None, *, seed: int = DEFAULT_SAMPLE_SEED) -> list[int]:
    """A deterministic sample of `size` of `count` row positions, in input
    order: the same rows and seed always pick the same rows. No size, or one
    at least as large as the input, keeps every row."""
    if size is None or size >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), size))


def nul_path(value, path: str = "") -> str | None:
    """Where a NUL character stands in `value` (a key or a string), as
    "prompt" or "model_response[2].content", or None. PostgreSQL cannot
    store NUL in text, nor \\u0000 in jsonb."""
    return _path_to(value, path, lambda item: isinstance(item, str) and "\x00" in item)


def non_finite_path(value, path: str = "") -> str | None:
    """Where an infinite number (what 1e400 reads as) stands in `value`, or
    None: JSON cannot write it back, and it was stored as null."""
    return _path_to(value, path, lambda item: isinstance(item, float) and not math.isfinite(item))


def _path_to(value, path: str, found) -> str | None:
    stack = [(path, value)]
    while stack:
        where, item = stack.pop()
        if found(item):
            return where
        if isinstance(item, dict):
            for key, child in item.items():
                name = f"{where}.{key}" if where else str(key)
                if found(key):
                    return name
                stack.append((name, child))
        elif isinstance(item, list):
            stack.extend((f"{where}[{position}]", child) for position, child in enumerate(item))
    return None


def encode_row(row: dict) -> str:
    """A row as the JSON text it is stored as (and measured by), written by
    orjson (perf.json_dumps): every row of a start is encoded while the
    caller waits (#5 in BENCHMARKS.md)."""
    return perf.json_dumps(row).decode()


LONE_SURROGATE = "a string holds an unpaired surrogate escape (such as \\ud800), which is not Unicode text"
# Only a \\u escape can spell a surrogate in JSON text (UTF-8 cannot).
_SURROGATE_ESCAPE = {str: re.compile(r"\\u[dD][89a-fA-F]"), bytes: re.compile(rb"\\u[dD][89a-fA-F]")}


def holds_lone_surrogates(text: str | bytes, value) -> bool:
    """Whether `value`, parsed from the JSON `text`, holds half of a UTF-16
    surrogate pair, which JSON can spell but no database stores as text.
    The value is walked only when the text holds such an escape."""
    if not _SURROGATE_ESCAPE[type(text)].search(text):
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False
