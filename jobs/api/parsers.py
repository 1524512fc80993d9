import io
import re

import ijson
from django.conf import settings
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.parsers import JSONParser

from extraction.rows import LONE_SURROGATE, holds_lone_surrogates, non_finite_path
from stringsight_site import perf


class LimitedJSONParser(JSONParser):
    """JSON with a nesting limit: a body nested thousands deep would
    otherwise blow Python's recursion limit somewhere later (a 500) instead
    of being refused up front. UTF-8 bodies are read with orjson where it
    gives what DRF's own parser gives (a 107 MB start: 0.93 → 0.52 s in the
    web server), and by DRF's parser otherwise, so refusals keep DRF's
    messages.

    Memory is bounded by the limits, not by the body: a value costs Python
    a hundred bytes or so however short its text, so a body of `{},{},…`
    became thirty times its size in objects. Before anything is built, the
    body's values are bounded from its bytes (see `within_value_limit`)."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.STRINGSIGHT_MAX_JSON_DEPTH
        body = stream.read()
        encoding = (parser_context or {}).get("encoding") or settings.DEFAULT_CHARSET
        within_value_limit(body, encoding)

        def standard(text: bytes):
            data = super(LimitedJSONParser, self).parse(io.BytesIO(text), media_type, parser_context)
            # orjson refuses unpaired surrogates and 1e400, so only this path can let them in.
            if holds_lone_surrogates(text, data):  # it used to be a 500
                raise ParseError(f"JSON parse error - {LONE_SURROGATE}")
            if _MAY_OVERFLOW.search(text) and (where := non_finite_path(data)) is not None:
                # In a row it was stored as null; in a field, DRF called it not a number.
                raise ValidationError({where: [NOT_FINITE]})
            return data

        try:
            if encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
                data = perf.json_loads(body, fallback=standard)
            else:
                data = standard(body)
        except RecursionError:
            raise ParseError(f"JSON parse error - nested deeper than {limit} levels") from None
        if nested_deeper_than(data, limit):
            raise ParseError(
                f"JSON parse error - nested deeper than {limit} levels (STRINGSIGHT_MAX_JSON_DEPTH)"
            )
        return data


NOT_FINITE = "expected a finite number, got one too large for a float (JSON has no infinity)"
# A float literal beyond a double: an exponent of three digits, or 309
# digits before the point (a longer integer stays an int).
_MAY_OVERFLOW = re.compile(rb"[0-9][eE]\+?[0-9]{3}|[0-9]{309}")


def nested_deeper_than(value, limit: int) -> bool:
    """Whether containers nest more than `limit` deep, found one level at a
    time (no recursion, and a third faster than a recursive walk)."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(limit):
        level = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return bool(level)


# Every value but the first follows a comma or is a container's first item,
# so a body holds at most one value more than it has of these bytes.
_STRUCTURE = bytes(byte for byte in range(256) if byte not in b"{[,")


def value_bound(body: bytes) -> int:
    """An upper bound on the JSON values in `body` (commas and brackets in
    strings count too), counted in C."""
    return len(body.translate(None, _STRUCTURE)) + 1


def within_value_limit(body: bytes, encoding: str, *, lines: bool = False) -> None:
    """Refuse a body that would hold more values than
    STRINGSIGHT_MAX_JSON_VALUES, or more rows than STRINGSIGHT_MAX_ROWS,
    before it becomes Python objects. Most bodies pass on the bound alone;
    a denser one is walked by ijson's C parser without building anything,
    counting values and the rows of a start until a limit is passed. With
    `lines`, the body is JSON Lines (an uploaded file), each value a row."""
    limit = settings.STRINGSIGHT_MAX_JSON_VALUES
    # A line's first value follows a line break, not a comma or bracket.
    bound = value_bound(body) + (body.count(b"\n") if lines else 0)
    if bound <= limit:
        return
    if encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        try:
            body = body.decode(encoding).encode()
        except (LookupError, UnicodeError):
            return  # the parser refuses it with its own message
    try:
        count_values(body, value_limit=limit, row_limit=settings.STRINGSIGHT_MAX_ROWS, lines=lines)
    except ijson.JSONError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "not JSON"
        if "overflow" not in first_line:
            raise ParseError(f"JSON parse error - {first_line}") from None
        # A number too large for the walk: the bound is all we know.
        raise ParseError(
            f"JSON parse error - the body may hold up to {bound} values, more than the limit of "
            f"{limit} (STRINGSIGHT_MAX_JSON_VALUES)"
        ) from None


def count_values(body: bytes, *, value_limit: int, row_limit: int, lines: bool = False) -> tuple[int, int]:
    """(values, rows in a top-level "rows" list, or with `lines` the values
    of JSON Lines), stopping with a 400 at the first value or row beyond its
    limit. Memory stays flat: only events."""
    values = rows = depth = 0
    key = None
    rows_depth = 0 if lines else None
    for event, value in ijson.basic_parse(body, use_float=True, multiple_values=lines):
        if event == "map_key":
            if depth == 1:
                key = value
            continue
        if event in ("end_map", "end_array"):
            depth -= 1
            if depth == 1 and not lines:
                rows_depth = None
            continue
        values += 1
        if values > value_limit:
            raise ParseError(
                f"JSON parse error - more than {value_limit} values, the limit (STRINGSIGHT_MAX_JSON_VALUES)"
            )
        if depth == rows_depth:
            rows += 1
            if rows > row_limit:
                raise ValidationError(
                    {"rows": [f"more than {row_limit} rows, the limit per job (STRINGSIGHT_MAX_ROWS)"]}
                )
        if event in ("start_map", "start_array"):
            depth += 1
            if event == "start_array" and depth == 2 and key == "rows" and not lines:
                rows_depth = 2
    return values, rows
