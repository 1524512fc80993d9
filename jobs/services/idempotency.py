"""Starts sent again with the same Idempotency-Key answer with the first start's job."""

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.utils import timezone

from ..models import (
    ExtractJob,
    IdempotencyKey,
)
from .errors import JobConflict


@dataclass(frozen=True)
class IdempotentStart:
    """A start sent with an Idempotency-Key. `request_hash` identifies its
    request; `answer` renders the start's response body (JSON text) from
    the new job, and every replay of the key gives that same text."""

    key: str
    request_hash: str
    answer: Callable[[ExtractJob], str]


@dataclass(frozen=True)
class StartOutcome:
    job_id: uuid.UUID
    answer: str
    replayed: bool


IDEMPOTENCY_KEY_LIFETIME = timedelta(hours=24)


def take_idempotency_key(*, owner, idempotency: IdempotentStart, job: ExtractJob) -> IdempotencyKey:
    now = timezone.now()
    # An expired key is free again, even before the sweep deletes it.
    IdempotencyKey.objects.filter(
        owner=owner, key=idempotency.key, created_at__lt=now - IDEMPOTENCY_KEY_LIFETIME
    ).delete()
    return IdempotencyKey.objects.create(
        owner=owner, key=idempotency.key, request_hash=idempotency.request_hash, job=job, created_at=now
    )


def start_replay(*, owner, idempotency: IdempotentStart) -> StartOutcome | None:
    """The start its owner made with this key in the last 24 hours
    (anonymous callers share one scope, as they share jobs), or None.
    JobConflict if that start's request was another."""
    earlier = (
        IdempotencyKey.objects.filter(
            owner=owner,
            key=idempotency.key,
            created_at__gte=timezone.now() - IDEMPOTENCY_KEY_LIFETIME,
        )
        .only("request_hash", "job_id", "answer")
        .first()
    )
    if earlier is None:
        return None
    if earlier.request_hash != idempotency.request_hash:
        raise JobConflict(
            "Idempotency-Key: this key started a job with a different request in the last 24 hours; "
            "send a new key to start another job"
        )
    return StartOutcome(job_id=earlier.job_id, answer=earlier.answer, replayed=True)


def forget_idempotency_keys(*, now) -> int:
    return IdempotencyKey.objects.filter(created_at__lt=now - IDEMPOTENCY_KEY_LIFETIME).delete()[0]
