"""The job management API: list, detail, rows, properties downloads,
resume and delete."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs import exports
from jobs.models import ExtractJob, ExtractRow, Property
from jobs.services import claims, lifecycle
from tests import factories
from tests.factories import done_outcome, make_job, property_dict, run_job, simple_rows

pytestmark = pytest.mark.django_db


def finished_job(owner, rows=3, properties_per_row=2, state="done"):
    job = make_job(owner, simple_rows(rows))
    lifecycle.job_mark_running(job_id=job.id)
    for row in claims.claim_rows(job_id=job.id, worker_id="w", limit=rows).rows:
        factories.record_row_result(
            job_id=job.id,
            row_id=row.id,
            row_index=row.index,
            worker_id="w",
            outcome=done_outcome(properties_per_row),
        )
    ExtractJob.objects.filter(pk=job.id).update(state=state)
    job.refresh_from_db()
    return job


def test_list_shows_only_the_callers_jobs_newest_first(api, user, other_user):
    older, newer = make_job(user), make_job(user)
    ExtractJob.objects.filter(pk=older.id).update(created_at=timezone.now() - timedelta(hours=1))
    make_job(other_user)

    body = api.get("/api/jobs/").json()

    assert [job["job_id"] for job in body["results"]] == [str(newer.id), str(older.id)]
    assert body["next"] is None


def test_list_pages_with_a_cursor_without_gaps_or_repeats(api, user):
    created = [make_job(user) for _ in range(5)]

    seen, url = [], "/api/jobs/?page_size=2"
    while url:
        page = api.get(url).json()
        seen += [job["job_id"] for job in page["results"]]
        url = page["next"]

    assert sorted(seen) == sorted(str(job.id) for job in created)
    assert len(seen) == 5


def test_list_filters_by_state_model_and_creation_time(api, user):
    done = make_job(user, model_name="gpt-4o")
    ExtractJob.objects.filter(pk=done.id).update(state="done", created_at=timezone.now() - timedelta(days=2))
    queued = make_job(user, model_name="gpt-4o-mini")

    def ids(query):
        return [job["job_id"] for job in api.get("/api/jobs/", query).json()["results"]]

    yesterday = (timezone.now() - timedelta(days=1)).isoformat()
    assert ids({"state": "done"}) == [str(done.id)]
    assert ids({"model": "gpt-4o-mini"}) == [str(queued.id)]
    assert ids({"created_after": yesterday}) == [str(queued.id)]
    assert ids({"created_before": yesterday}) == [str(done.id)]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"state": "sleeping"}, "state"),
        ({"created_after": "last tuesday"}, "created_after"),
        ({"page_size": 0}, "page_size"),
    ],
)
def test_list_rejects_bad_filters_naming_them(api, query, field):
    response = api.get("/api/jobs/", query)
    assert response.status_code == 400
    assert response.json()["field"] == field


def test_list_makes_the_same_queries_for_3_jobs_as_for_30(api, user):
    def count_queries():
        with CaptureQueriesContext(connection) as queries:
            assert api.get("/api/jobs/").status_code == 200
        return len(queries)

    for _ in range(3):
        make_job(user)
    few = count_queries()
    for _ in range(27):
        make_job(user)
    assert count_queries() == few


def test_detail_counts_each_outcome_and_estimates_the_time_left(api, user):
    job = make_job(user, simple_rows(10), max_workers=10)
    lifecycle.job_mark_running(job_id=job.id)
    rows = claims.claim_rows(job_id=job.id, worker_id="w", limit=5).rows
    for row in rows[:3]:
        factories.record_row_result(
            job_id=job.id, row_id=row.id, row_index=row.index, worker_id="w", outcome=done_outcome(1)
        )
    factories.record_row_result(
        job_id=job.id,
        row_id=rows[3].id,
        row_index=rows[3].index,
        worker_id="w",
        outcome=done_outcome(0, error="bad"),
    )
    # Long enough ago that the time the request takes on a busy machine
    # stays well within the tolerance.
    ExtractJob.objects.filter(pk=job.id).update(started_at=timezone.now() - timedelta(seconds=80))

    body = api.get(f"/api/jobs/{job.id}/").json()

    assert body["outcomes"] == {"done": 3, "failed": 1, "running": 1, "pending": 5, "cancelled": 0}
    assert body["rows_per_second"] == pytest.approx(0.05, rel=0.05)
    assert body["eta_seconds"] == pytest.approx(120, rel=0.05)
    cancelled = api.post(f"/api/jobs/{job.id}/cancel/")
    assert cancelled.status_code == 200
    after = api.get(f"/api/jobs/{job.id}/").json()
    assert after["outcomes"] == {"done": 3, "failed": 1, "running": 0, "pending": 0, "cancelled": 6}
    assert (after["rows_per_second"], after["eta_seconds"]) == (None, None)


def test_rows_list_outcomes_with_errors_and_filter_by_status(api, user, sim):
    rows = simple_rows(4)
    rows[2]["prompt"] += " [[sim:bad_json]]"
    job = make_job(user, rows)
    run_job(job.id, base_url=sim.base_url)

    everything = api.get(f"/api/jobs/{job.id}/rows/").json()["results"]
    failed = api.get(f"/api/jobs/{job.id}/rows/", {"status": "failed"}).json()["results"]

    assert [(row["index"], row["status"]) for row in everything] == [
        (0, "done"),
        (1, "done"),
        (2, "failed"),
        (3, "done"),
    ]
    assert [row["index"] for row in failed] == [2]
    assert failed[0]["error"].startswith("no valid property in the LLM answer")
    assert failed[0]["raw_answer"] != ""
    assert failed[0]["attempts"] == 2  # the bad answer was asked once more
    assert api.get(f"/api/jobs/{job.id}/rows/", {"status": "lost"}).status_code == 400


def test_properties_page_through_json(api, user):
    job = finished_job(user, rows=3, properties_per_row=2)

    first = api.get(f"/api/jobs/{job.id}/properties/", {"page_size": 4}).json()
    second = api.get(first["next"]).json()

    assert [p["row_index"] for p in first["results"] + second["results"]] == [0, 0, 1, 1, 2, 2]
    assert second["next"] is None


@pytest.mark.parametrize("download", ["jsonl", "csv", "parquet"])
def test_every_download_format_reads_back_to_the_same_properties(api, user, download):
    job = finished_job(user, rows=3, properties_per_row=2, state="cancelled")
    Property.objects.filter(job=job, row_index=1, position=0).update(
        property_description='Quotes "this", then, a comma\\nand more', evidence=["a, b", "ünï"]
    )

    response = api.get(f"/api/jobs/{job.id}/properties/", {"format": download})

    assert response.status_code == 200
    assert response["Content-Disposition"] == f'attachment; filename="job-{job.id}-properties.{download}"'
    body = b"".join(response.streaming_content) if response.streaming else response.content
    frame = factories.read_export(body, download)
    read_back = [
        {
            **record,
            "evidence": list(record["evidence"]),
            "row_index": int(record["row_index"]),
            "contains_errors": bool(record["contains_errors"]),
            "unexpected_behavior": bool(record["unexpected_behavior"]),
        }
        for record in frame.to_dict(orient="records")
    ]
    assert read_back == list(exports.property_records(Property.objects.filter(job=job)))
    assert len(read_back) == 6


def test_an_explicit_format_wins_over_the_accept_header(api, user):
    job = finished_job(user, rows=2, properties_per_row=2)
    path = f"/api/jobs/{job.id}/properties/"
    csv = "".join(exports.TEXT_WRITERS["csv"](exports.export_records(job.properties.all(), "csv"))).encode()

    as_csv = api.get(path, {"format": "csv"}, HTTP_ACCEPT="application/json")
    as_json = api.get(path, {"format": "json"}, HTTP_ACCEPT="text/csv")
    by_accept = api.get(path, HTTP_ACCEPT="text/csv")

    assert (as_csv.status_code, as_csv["Content-Type"]) == (200, "text/csv; charset=utf-8")
    assert b"".join(as_csv.streaming_content) == csv
    assert (as_json.status_code, as_json["Content-Type"]) == (200, "application/json")
    assert [p["row_index"] for p in as_json.json()["results"]] == [0, 0, 1, 1]
    assert (by_accept.status_code, b"".join(by_accept.streaming_content)) == (200, csv)


def test_an_unknown_download_format_is_a_400(api, user):
    job = finished_job(user)
    response = api.get(f"/api/jobs/{job.id}/properties/", {"format": "xlsx"})
    assert response.status_code == 400
    assert response.json()["field"] == "format"


def test_resume_runs_unfinished_rows_and_never_resends_done_ones(api, user, sim):
    job = make_job(user, simple_rows(6))
    lifecycle.job_mark_running(job_id=job.id)
    first = claims.claim_rows(job_id=job.id, worker_id="w", limit=2).rows
    for row in first:
        factories.record_row_result(
            job_id=job.id, row_id=row.id, row_index=row.index, worker_id="w", outcome=done_outcome(1)
        )
    lifecycle.job_cancel(job=ExtractJob.objects.get(pk=job.id))

    resumed = api.post(f"/api/jobs/{job.id}/resume/", {}, format="json")
    run_job(job.id, base_url=sim.base_url)

    assert resumed.status_code == 200
    assert (resumed.json()["state"], resumed.json()["count_done"]) == ("queued", 2)
    job.refresh_from_db()
    assert (job.state, job.count_done, job.cancelled_at) == ("done", 6, None)
    assert len(sim.requests()) == 4  # only the four rows that were cancelled
    done_before = {row.index for row in first}
    sent = {request["user_preview"].split("\n")[1] for request in sim.requests()}
    assert not any(f"Question {index}:" in line for index in done_before for line in sent)


def test_resume_with_retry_failed_runs_failed_rows_again(api, user, sim):
    rows = simple_rows(3)
    rows[1]["prompt"] += " [[sim:500x1]]"
    job = make_job(user, rows)
    run_job(job.id, base_url=sim.base_url, max_attempts=1)
    job.refresh_from_db()
    assert (job.state, job.count_failed) == ("done", 1)

    refused = api.post(f"/api/jobs/{job.id}/resume/", {}, format="json")
    resumed = api.post(f"/api/jobs/{job.id}/resume/", {"retry_failed": True}, format="json")
    run_job(job.id, base_url=sim.base_url)

    assert refused.status_code == 409
    assert refused.json()["detail"] == (
        "job already finished (state: done); only retry_failed can run its failed rows again"
    )
    assert resumed.json()["count_failed"] == 0
    job.refresh_from_db()
    assert (job.state, job.count_done, job.count_failed) == ("done", 3, 0)
    assert len(sim.requests()) == 4


def test_resume_of_an_active_job_is_a_conflict(api, user):
    job = make_job(user)
    response = api.post(f"/api/jobs/{job.id}/resume/", {}, format="json")
    assert response.status_code == 409
    assert response.json()["detail"] == "job is still queued; cancel it before resuming"


def test_resume_can_raise_the_budget_of_a_job_stopped_by_it(api, user, sim):
    job = make_job(user, simple_rows(4), max_workers=1, max_total_tokens=1)
    run_job(job.id, base_url=sim.base_url)
    job.refresh_from_db()
    assert job.error.startswith("budget exceeded")

    api.post(f"/api/jobs/{job.id}/resume/", {"max_total_tokens": 10**9}, format="json")
    run_job(job.id, base_url=sim.base_url)

    job.refresh_from_db()
    assert (job.state, job.count_done, job.error, job.max_total_tokens) == ("done", 4, "", 10**9)


def test_delete_removes_a_finished_job_with_its_rows_and_properties(api, user):
    job = finished_job(user)
    kept = finished_job(user)

    response = api.delete(f"/api/jobs/{job.id}/")

    assert response.status_code == 204
    assert not ExtractJob.objects.filter(pk=job.id).exists()
    assert not ExtractRow.objects.filter(job_id=job.id).exists()
    assert not Property.objects.filter(job_id=job.id).exists()
    assert Property.objects.filter(job=kept).count() == 6


def test_delete_refuses_an_active_job_and_another_users_job(api, user, other_api):
    active = make_job(user)
    finished = finished_job(user)

    assert api.delete(f"/api/jobs/{active.id}/").status_code == 409
    assert other_api.delete(f"/api/jobs/{finished.id}/").status_code == 404
    assert ExtractJob.objects.count() == 2


def test_property_fields_match_the_documented_ones(api, user):
    job = make_job(user)
    row = job.rows.get(index=0)
    Property.objects.create(job=job, row=row, row_index=0, position=0, **property_dict())
    body = api.get(f"/api/jobs/{job.id}/properties/").json()
    assert set(body["results"][0]) == {
        "id",
        "question_id",
        "row_index",
        "input_index",
        "model",
        "property_description",
        "category",
        "reason",
        "evidence",
        "behavior_type",
        "contains_errors",
        "unexpected_behavior",
    }


def test_a_cursor_the_api_did_not_give_out_is_a_400_naming_it(api):
    response = api.get("/api/jobs/", {"cursor": "bogus"})
    assert response.status_code == 400
    assert response.json()["field"] == "cursor"


def test_errors_of_a_download_answer_in_json(api):
    response = api.get("/api/jobs/00000000-0000-0000-0000-000000000000/properties/", {"format": "csv"})
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json()["detail"] == "job_id: no job 00000000-0000-0000-0000-000000000000"
