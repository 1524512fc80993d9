"""Small formatting and lookup helpers shared by the admin and the CLI."""

import re
import uuid
from datetime import timedelta

from django.db.models import Q

HEX_PREFIX = re.compile(r"[0-9a-f]{4,32}")


def format_duration(elapsed: timedelta | float, *, compact: bool = False) -> str:
    """A duration (or seconds) at a glance: "42 s", "3 min 05 s", "2 h 07 min";
    compact, for a progress line: "42s", "3m05s", "2h07m"."""
    seconds = max(0, round(elapsed.total_seconds() if isinstance(elapsed, timedelta) else elapsed))
    second, minute, hour, gap = ("s", "m", "h", "") if compact else (" s", " min", " h", " ")
    if seconds < 60:
        return f"{seconds}{second}"
    if seconds < 3600:
        return f"{seconds // 60}{minute}{gap}{seconds % 60:02d}{second}"
    return f"{seconds // 3600}{hour}{gap}{seconds // 60 % 60:02d}{minute}"


def format_cost(cost: float | None) -> str:
    if cost is None:
        return "—"
    # Small jobs cost fractions of a cent; four places would show them as free.
    return f"${cost:.4f}" if cost >= 0.01 else f"${cost:.6f}"


def job_id_search(term: str) -> Q | None:
    """A whole job id, or the start of one (at least four hex digits, with or
    without dashes), as a lookup; None when the term cannot be one."""
    digits = term.strip().lower().replace("-", "")
    if not HEX_PREFIX.fullmatch(digits):
        return None
    if len(digits) == 32:
        return Q(pk=uuid.UUID(digits))
    # Dashed as in a UUID's text form: PostgreSQL compares against that text,
    # and Django strips the dashes again for SQLite's dashless column.
    groups = [digits[start:end] for start, end in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))]
    return Q(id__startswith="-".join(group for group in groups if group))
