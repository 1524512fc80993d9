import io

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from extraction.rows import LONE_SURROGATE, holds_lone_surrogates


class LimitedJSONParser(JSONParser):
    """JSON with a nesting limit: a body nested thousands deep would
    otherwise blow Python's recursion limit somewhere later (a 500) instead
    of being refused up front."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.STRINGSIGHT_MAX_JSON_DEPTH
        body = stream.read()
        try:
            data = super().parse(io.BytesIO(body), media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON parse error - nested deeper than {limit} levels") from None
        if nested_deeper_than(data, limit):
            raise ParseError(
                f"JSON parse error - nested deeper than {limit} levels (STRINGSIGHT_MAX_JSON_DEPTH)"
            )
        if holds_lone_surrogates(body, data):  # it used to be a 500
            raise ParseError(f"JSON parse error - {LONE_SURROGATE}")
        return data


def nested_deeper_than(value, limit: int) -> bool:
    """Whether containers nest more than `limit` deep. Recursion is safe
    here: it stops one level past the limit."""
    if not isinstance(value, dict | list):
        return False
    if limit < 1:
        return True
    for child in value.values() if isinstance(value, dict) else value:
        if isinstance(child, dict | list) and nested_deeper_than(child, limit - 1):
            return True
    return False
