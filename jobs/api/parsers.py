from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser


class LimitedJSONParser(JSONParser):
    """JSON with a nesting limit: a body nested thousands deep would
    otherwise blow Python's recursion limit somewhere later (a 500) instead
    of being refused up front."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.STRINGSIGHT_MAX_JSON_DEPTH
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON parse error - nested deeper than {limit} levels") from None
        if nested_deeper_than(data, limit):
            raise ParseError(
                f"JSON parse error - nested deeper than {limit} levels (STRINGSIGHT_MAX_JSON_DEPTH)"
            )
        return data


def nested_deeper_than(value, limit: int) -> bool:
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
