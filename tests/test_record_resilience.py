"""A worker never dies on one row: a result the database refuses fails that
row with the reason, the other rows of its batch are kept, and the task
goes on (issue 19)."""

import pytest
from django.db import connection

from jobs.models import ExtractJob, ExtractRow, Property
from jobs.services import claims, lifecycle
from tests.factories import done_outcome, make_job, property_dict, run_job, simple_rows

pytestmark = pytest.mark.django_db


def claimed_job(user, count: int):
    job = make_job(user, simple_rows(count))
    lifecycle.job_mark_running(job_id=job.id)
    rows = claims.claim_rows(job_id=job.id, worker_id="w", limit=count).rows
    return job, rows


def leftover_property(job, index: int) -> None:
    """A property already stored at position 0 of a row: inserting the row's
    own first property breaks the unique (row, position) constraint, a real
    database error on SQLite and PostgreSQL alike."""
    row = ExtractRow.objects.get(job=job, index=index)
    Property.objects.create(job=job, row=row, row_index=index, position=0, **property_dict("Leftover."))


def test_a_row_the_database_refuses_fails_alone_and_the_batch_is_kept(user):
    job, rows = claimed_job(user, 3)
    leftover_property(job, 1)

    recorded = claims.record_row_results(
        job_id=job.id, worker_id="w", results=[(row, done_outcome(2)) for row in rows]
    )

    assert (recorded.stored, recorded.job_running) == (3, True)
    statuses = dict(ExtractRow.objects.filter(job=job).values_list("index", "status"))
    assert statuses == {0: "done", 1: "failed", 2: "done"}
    refused = ExtractRow.objects.get(job=job, index=1)
    assert refused.error.startswith("the result could not be stored: IntegrityError: ")
    assert (refused.raw_answer, refused.prompt_tokens, refused.properties_dropped) == ("[...]", 100, 2)
    job.refresh_from_db()
    assert (job.state, job.count_done, job.count_failed, job.properties_count) == ("done", 2, 1, 4)
    assert (job.prompt_tokens, job.completion_tokens) == (300, 120)
    assert Property.objects.filter(job=job).exclude(property_description="Leftover.").count() == 4


def test_a_single_refused_result_fails_its_row(user):
    job, rows = claimed_job(user, 2)
    leftover_property(job, 0)

    recorded = claims.record_row_results(job_id=job.id, worker_id="w", results=[(rows[0], done_outcome(1))])

    assert recorded.stored == 1
    job.refresh_from_db()
    assert (job.state, job.count_done, job.count_failed, job.properties_count) == ("running", 0, 1, 0)


@pytest.mark.django_db(transaction=True)
def test_the_runner_goes_on_past_a_row_the_database_refuses(user, sim, no_background_worker):
    job = make_job(user, simple_rows(12), max_workers=4)
    leftover_property(job, 5)

    outcome = run_job(job.id, base_url=sim.base_url)

    job.refresh_from_db()
    assert outcome.startswith("recorded 12 rows")
    assert (job.state, job.count_done, job.count_failed) == ("done", 11, 1)
    failed = ExtractRow.objects.get(job=job, status="failed")
    assert failed.index == 5
    assert failed.error.startswith("the result could not be stored: IntegrityError: ")
    assert job.properties_count == Property.objects.filter(job=job).count() - 1


def test_nul_in_an_answer_is_stored_as_a_replacement_character(user):
    job, rows = claimed_job(user, 1)
    outcome = done_outcome(1, raw_answer='[{"property_description": "a\x00b"}]')
    outcome.properties[0].update(
        property_description="says a\x00b", reason="r\x00", category="c\x00", evidence=["quote \x00"]
    )

    claims.record_row_results(job_id=job.id, worker_id="w", results=[(rows[0], outcome)])

    stored = Property.objects.get(job=job)
    assert (stored.property_description, stored.reason, stored.category) == (
        "says a\ufffdb",
        "r\ufffd",
        "c\ufffd",
    )
    assert stored.evidence == ["quote \ufffd"]
    assert ExtractRow.objects.get(job=job).raw_answer == '[{"property_description": "a\ufffdb"}]'


def test_a_category_longer_than_its_column_is_cut_to_fit(user):
    job, rows = claimed_job(user, 1)
    outcome = done_outcome(1)
    outcome.properties[0]["category"] = "c" * 300

    claims.record_row_results(job_id=job.id, worker_id="w", results=[(rows[0], outcome)])

    assert Property.objects.get(job=job).category == "c" * 200
    assert ExtractJob.objects.get(pk=job.id).count_done == 1


@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite's integers hold 64 bits")
def test_tokens_beyond_the_column_fail_the_row_not_the_batch_on_postgresql(user):
    job, rows = claimed_job(user, 3)
    results = [(row, done_outcome(1)) for row in rows]
    results[2] = (rows[2], done_outcome(1, prompt_tokens=2**40))

    recorded = claims.record_row_results(job_id=job.id, worker_id="w", results=results)

    assert recorded.stored == 3
    refused = ExtractRow.objects.get(job=job, index=2)
    assert refused.status == "failed"
    assert refused.error.startswith("the result could not be stored: DataError: integer out of range")
    job.refresh_from_db()
    assert (job.count_done, job.count_failed, job.properties_count, job.prompt_tokens) == (2, 1, 2, 200)
