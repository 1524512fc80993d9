import io
import re

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from extraction.rows import holds_lone_surrogates


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
        # Only a \\u escape can spell a lone surrogate; it used to be a 500.
        if LONE_SURROGATE_ESCAPE.search(body) and holds_lone_surrogates(data):
            raise ParseError(
                "JSON parse error - a string holds an unpaired surrogate escape (such as \\ud800), "
                "which is not Unicode text"
            )
        return data


LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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
