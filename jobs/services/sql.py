"""Statements written by hand, where the ORM cost more than the database:
inserting a job's rows, claiming rows, finishing rows and inserting
properties. Column defaults not named here come from the model."""

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection

from extraction.extract import RowOutcome

from ..models import (
    PROPERTY_CONTENT,
    ExtractJob,
    ExtractRow,
    JobState,
    Property,
    RowStatus,
)

# What a new row's insert names; every other column takes its default from
# the database (the model's db_default).
_NEW_ROW_FIELDS = ("job", "index", "question_id", "data", "input_index")


def insert_rows(job: ExtractJob, rows: list[tuple[int, str, str, int]]) -> None:
    """A job's rows as their JSON text, in as few round trips as the
    database allows: bulk_create's per-field Python and a second JSON
    encoding cost a large start more than the database did."""
    fields = [ExtractRow._meta.get_field(name) for name in _NEW_ROW_FIELDS]
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    table = connection.ops.quote_name(ExtractRow._meta.db_table)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # Binary COPY: the server copies the text without unescaping it.
            with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types([field.db_type(connection).partition("(")[0] for field in fields])
                for index, question_id, encoded, input_index in rows:
                    copy.write_row((job.pk, index, question_id, encoded, input_index))
            return
        job_value = fields[0].get_db_prep_value(job.pk, connection)
        placeholders = ", ".join(["%s"] * len(fields))
        sql = f"INSERT INTO {table} ({columns}) VALUES ({placeholders})"
        for start in range(0, len(rows), 1000):
            cursor.executemany(
                sql,
                [
                    (job_value, index, question_id, encoded, input_index)
                    for index, question_id, encoded, input_index in rows[start : start + 1000]
                ],
            )


def close_unfinished_rows(*, job_id, status: str, now) -> None:
    ExtractRow.objects.filter(job_id=job_id, status__in=(RowStatus.PENDING, RowStatus.RUNNING)).update(
        status=status, finished_at=now, lease_expires_at=None
    )


@dataclass(frozen=True)
class ClaimedRow:
    id: int
    index: int
    question_id: str
    data: dict[str, Any]
    # The caller's index of the row (see ExtractRow.input_index).
    input_index: int | None = None


def lock_if_running(job_id) -> dict | None:
    """Lock the job row (PostgreSQL; SQLite's IMMEDIATE transaction already
    holds the database) and read its counters, or None if it is not running."""
    running = ExtractJob.objects.select_for_update().filter(pk=job_id, state=JobState.RUNNING).order_by()
    return running.values("count_total", "count_done", "count_failed").first()


def take_pending_rows(job_id, *, worker_id: str, limit: int, now) -> list[ClaimedRow]:
    """Claim the lowest pending rows and read them back in one statement
    (UPDATE ... RETURNING, on PostgreSQL and SQLite alike)."""
    quote = connection.ops.quote_name
    table = quote(ExtractRow._meta.db_table)
    skip_locked = " FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    data_field = ExtractRow._meta.get_field("data")
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET status = %s, claimed_by = %s, lease_expires_at = %s, started_at = %s "
            f"WHERE id IN (SELECT id FROM {table} WHERE job_id = %s AND status = %s "
            f"ORDER BY {quote('index')} LIMIT %s{skip_locked}) "
            f"RETURNING id, {quote('index')}, question_id, data, input_index",
            [
                RowStatus.RUNNING,
                worker_id,
                connection.ops.adapt_datetimefield_value(
                    now + timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS)
                ),
                connection.ops.adapt_datetimefield_value(now),
                ExtractRow._meta.get_field("job").get_db_prep_value(job_id, connection),
                RowStatus.PENDING,
                limit,
            ],
        )
        returned = cursor.fetchall()
    rows = [
        ClaimedRow(
            id=row_id,
            index=index,
            question_id=question_id,
            data=data_field.to_python(data),
            input_index=input_index,
        )
        for row_id, index, question_id, data, input_index in returned
    ]
    return sorted(rows, key=lambda row: row.index)


def finish_rows(
    results: list[tuple[ClaimedRow, RowOutcome]], *, worker_id: str, now
) -> list[tuple[ClaimedRow, RowOutcome]]:
    """Mark the rows done or failed, one UPDATE per row sent as one
    executemany, each only if the row is still running and still ours (a
    row another worker took after our lease ran out is not ours to record).
    Returns the results that were ours: all of them, unless the count says
    otherwise."""
    quote = connection.ops.quote_name
    sql = (
        f"UPDATE {quote(ExtractRow._meta.db_table)} SET status = %s, error = %s, raw_answer = %s, "
        "attempts = attempts + %s, properties_dropped = %s, cached = %s, prompt_tokens = %s, "
        "completion_tokens = %s, lease_expires_at = NULL, finished_at = %s "
        "WHERE id = %s AND status = %s AND claimed_by = %s"
    )
    finished_at = connection.ops.adapt_datetimefield_value(now)
    with connection.cursor() as cursor:
        cursor.executemany(
            sql,
            [
                (
                    RowStatus.FAILED if outcome.error is not None else RowStatus.DONE,
                    outcome.error or "",
                    outcome.raw_answer,
                    outcome.attempts,
                    outcome.dropped,
                    outcome.cached,
                    outcome.prompt_tokens,
                    outcome.completion_tokens,
                    finished_at,
                    row.id,
                    RowStatus.RUNNING,
                    worker_id,
                )
                for row, outcome in results
            ],
        )
        changed = cursor.rowcount
    if changed == len(results):
        return results
    ours = set(
        ExtractRow.objects.filter(
            pk__in=[row.id for row, _ in results], claimed_by=worker_id, finished_at=now
        ).values_list("id", flat=True)
    )
    return [(row, outcome) for row, outcome in results if row.id in ours]


PROPERTY_COLUMNS = ("id", "job_id", "row_id", "row_index", "input_index", "position", *PROPERTY_CONTENT)


def insert_properties(job_id, results: list[tuple[ClaimedRow, RowOutcome]]) -> None:
    """All the properties of a batch as one executemany. bulk_create
    compiled every field of every property in Python, a quarter of a
    worker's time per row."""
    fields = {
        name: Property._meta.get_field(name.removesuffix("_id")) for name in ("id", "job_id", "evidence")
    }
    job_value = fields["job_id"].get_db_prep_value(job_id, connection)
    values = []
    for row, outcome in results:
        for position, prop in enumerate(outcome.properties):
            values.append(
                (
                    fields["id"].get_db_prep_value(uuid.uuid4(), connection),
                    job_value,
                    row.id,
                    row.index,
                    row.input_index,
                    position,
                    *(prop[name] for name in PROPERTY_CONTENT[:-1]),
                    fields["evidence"].get_db_prep_value(prop["evidence"], connection),
                )
            )
    if not values:
        return
    quote = connection.ops.quote_name
    columns = ", ".join(quote(column) for column in PROPERTY_COLUMNS)
    placeholders = ", ".join(["%s"] * len(PROPERTY_COLUMNS))
    with connection.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {quote(Property._meta.db_table)} ({columns}) VALUES ({placeholders})", values
        )


# Any fixed number: the lock's name among PostgreSQL's advisory locks.
_ANONYMOUS_OWNER_LOCK = 0x5757_0001


def lock_anonymous_owner() -> None:
    """What locking the owner's row is for a user, for anonymous callers,
    who have no row: a lock held until the transaction ends. SQLite's
    IMMEDIATE transactions are serialised already."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_ANONYMOUS_OWNER_LOCK])
