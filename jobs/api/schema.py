"""OpenAPI schema hooks (drf-spectacular)."""

from .urls import FRONTEND_ALIAS_PREFIX, frontend_patterns

ALIASES = {f"/{FRONTEND_ALIAS_PREFIX}{pattern.pattern}" for pattern in frontend_patterns}


def drop_frontend_aliases(endpoints, **kwargs):
    """The frontend's paths under /api are the same operations again:
    documented once, at their own paths."""
    return [endpoint for endpoint in endpoints if endpoint[0] not in ALIASES]
