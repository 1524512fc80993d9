"""Request rates shared by every web process (a GCRA bucket per caller in the database)."""

import itertools
import math
import time
from dataclasses import dataclass

from django.db.models import F, FloatField, Value
from django.db.models.functions import Greatest

from ..models import (
    ThrottleBucket,
)


@dataclass(frozen=True)
class Rate:
    """`count` requests per `seconds`, as a burst or spread out."""

    count: int
    seconds: float

    @classmethod
    def parse(cls, text: str) -> "Rate":
        """ "120/min", "5/h", "10/15min": a count over a period of s, min, h or d."""
        count, _, period = text.strip().partition("/")
        digits = "".join(itertools.takewhile(str.isdigit, period))
        unit = period[len(digits) :].strip().lower()
        seconds = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
        if not count.strip().isdigit() or int(count) < 1 or unit not in seconds or digits in ("0",):
            raise ValueError(f"{text!r} is not a rate such as 120/min, 5/h or 10/15min")
        return cls(count=int(count), seconds=int(digits or 1) * seconds[unit])


def throttle_take(*, scope: str, ident: str, rate: Rate, now: float | None = None) -> float | None:
    """Take one request from the caller's allowance: None when it is taken,
    else the seconds until one is free. A burst of up to `rate.count` passes
    at once, then one per `rate.seconds / rate.count`. One conditional
    UPDATE decides (the database serialises updates of the row), so the
    rate holds however many web processes take at once."""
    now = time.time() if now is None else now
    interval = rate.seconds / rate.count
    slack = rate.seconds - interval
    bucket = ThrottleBucket.objects.filter(scope=scope, ident=ident)
    for _ in range(5):
        taken = bucket.filter(tat__lte=now + slack + 1e-6).update(
            tat=Greatest(F("tat"), Value(now, output_field=FloatField())) + interval
        )
        if taken:
            return None
        tat = bucket.values_list("tat", flat=True).first()
        if tat is not None and tat > now + slack + 1e-6:
            return float(math.ceil(tat - slack - now))  # whole seconds: Retry-After rounds down
        if tat is None:
            # A new caller (or one forgotten): their allowance starts whole.
            # Callers whose allowance has been whole for an hour are forgotten.
            ThrottleBucket.objects.filter(scope=scope, tat__lt=now - 3600).delete()
            ThrottleBucket.objects.bulk_create(
                [ThrottleBucket(scope=scope, ident=ident, tat=now)], ignore_conflicts=True
            )
        # Else the bucket was created after the UPDATE began (PostgreSQL's
        # UPDATE sees only rows committed before it): take again.
    raise AssertionError(f"throttle bucket {scope} {ident} could not be taken from")  # pragma: no cover


def throttle_wait(*, scope: str, ident: str, rate: Rate, now: float | None = None) -> float | None:
    """Seconds until the caller's allowance has room, or None if it has now
    (nothing is taken)."""
    now = time.time() if now is None else now
    tat = ThrottleBucket.objects.filter(scope=scope, ident=ident).values_list("tat", flat=True).first()
    slack = rate.seconds - rate.seconds / rate.count
    if tat is None or tat <= now + slack + 1e-6:
        return None
    return tat - slack - now
