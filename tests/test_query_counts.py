"""The list endpoints make the same few queries whatever the page size and
however many jobs, rows or properties there are: nothing is read per item."""

import pytest

from jobs.models import ExtractJob
from jobs.services import claims, grants, lifecycle
from tests import factories
from tests.factories import done_outcome, make_job, simple_rows

pytestmark = pytest.mark.django_db

# The token's user, then one page; a job's rows or properties also read the job.
LIST_QUERIES = 2
PAGE_OF_A_JOB_QUERIES = 3


def job_with_results(owner, rows: int, properties_per_row: int) -> ExtractJob:
    job = make_job(owner, simple_rows(rows), max_workers=rows)
    lifecycle.job_mark_running(job_id=job.id)
    for row in claims.claim_rows(job_id=job.id, worker_id="w", limit=rows).rows:
        factories.record_row_result(
            job_id=job.id,
            row_id=row.id,
            row_index=row.index,
            worker_id="w",
            outcome=done_outcome(properties_per_row),
        )
    return job


@pytest.mark.parametrize(("jobs", "page_size"), [(2, 1), (40, 40)])
def test_the_job_list(api, user, django_assert_max_num_queries, jobs, page_size):
    created = [make_job(user) for _ in range(jobs)]
    for job in created[::2]:  # running, with their calls in flight to read
        lifecycle.job_mark_running(job_id=job.id)
        grants.set_slots(job_id=job.id, worker_id="w", slots=2, in_flight=0, wants=True)
    claims.renew_leases(worker_id="w", in_flight={job.id: 2 for job in created[::2]})

    with django_assert_max_num_queries(LIST_QUERIES):
        body = api.get("/api/jobs/", {"page_size": page_size}).json()

    running = {str(job.id) for job in created[::2]}
    assert len(body["results"]) == page_size
    assert [job["calls_in_flight"] for job in body["results"]] == [
        2 if job["job_id"] in running else 0 for job in body["results"]
    ]
    assert [job["queue_position"] is None for job in body["results"]] == [
        job["job_id"] in running for job in body["results"]
    ]


@pytest.mark.parametrize(("rows", "page_size"), [(2, 1), (60, 60)])
def test_a_jobs_rows(api, user, django_assert_max_num_queries, rows, page_size):
    job = job_with_results(user, rows, properties_per_row=1)

    with django_assert_max_num_queries(PAGE_OF_A_JOB_QUERIES):
        body = api.get(f"/api/jobs/{job.id}/rows/", {"page_size": page_size}).json()

    assert [row["index"] for row in body["results"]] == list(range(page_size))


@pytest.mark.parametrize(("rows", "page_size"), [(2, 1), (30, 90)])
def test_a_jobs_properties(api, user, django_assert_max_num_queries, rows, page_size):
    job = job_with_results(user, rows, properties_per_row=3)

    with django_assert_max_num_queries(PAGE_OF_A_JOB_QUERIES):
        body = api.get(f"/api/jobs/{job.id}/properties/", {"page_size": page_size}).json()

    assert len(body["results"]) == page_size
    assert [p["input_index"] for p in body["results"]] == [n // 3 for n in range(page_size)]
