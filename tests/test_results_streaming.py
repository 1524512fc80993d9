"""Results and downloads stream in batches with bounded memory, an answer
keeps at most STRINGSIGHT_MAX_PROPERTIES_PER_ROW properties, and CSV cells
never start a spreadsheet formula (issue 19)."""

import csv
import io
import json

import pyarrow.parquet as pq
import pytest
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.renderers import JSONRenderer

from extraction.extract import ExtractionSpec, RowOutcome, outcome_from_answer
from extraction.llm import CallSettings
from jobs import exports, presenter
from jobs.models import ExtractJob, ExtractRow, Property
from jobs.services import claims, lifecycle, sql
from tests import factories
from tests.factories import make_job, property_dict, run_job, simple_rows
from tests.fixtures_web import memory_of, reset_peak_memory

pytestmark = pytest.mark.django_db

MB = 1024 * 1024
TRICKY = 'Says "hi",\nthen \u2028 and \u2029, ünïcödé \\ and </script>'


def stored_properties(job, per_row: int, description=lambda index, position: f"Row {index}, {position}."):
    """Properties stored as the worker stores them, `per_row` for each row."""
    lifecycle.job_mark_running(job_id=job.id)
    rows = claims.claim_rows(job_id=job.id, worker_id="w", limit=job.count_total).rows
    results = [
        (
            row,
            RowOutcome(
                properties=[
                    property_dict(description(row.index, position), question_id=row.question_id)
                    for position in range(per_row)
                ]
            ),
        )
        for row in rows
    ]
    for start in range(0, len(results), 500):
        sql.insert_properties(job.id, results[start : start + 500])
    ExtractJob.objects.filter(pk=job.id).update(
        state="done", count_done=len(rows), properties_count=len(rows) * per_row
    )
    job.refresh_from_db()
    return job


@pytest.mark.parametrize(
    ("path", "seed"), [("/api/jobs/{id}/result/", False), ("/extract/jobs/result?job_id={id}", True)]
)
def test_a_streamed_result_is_the_bytes_drf_would_have_written(api, user, path, seed):
    job = stored_properties(
        make_job(user, simple_rows(3)),
        per_row=900,
        description=lambda index, position: f"{TRICKY} {index}.{position}",
    )

    response = api.get(path.format(id=job.id))

    assert response.streaming
    assert response["Content-Type"] == "application/json"
    streamed = b"".join(response.streaming_content)
    assert streamed == JSONRenderer().render(presenter.result_payload(job, seed=seed))
    assert (
        len(list(presenter.result_chunks(job, seed=seed))) == 4
    )  # head, two batches of 2,000 and less, tail
    body = json.loads(streamed)
    assert (body["count"], len(body["properties"])) == (2700, 2700)
    assert body["properties"][0]["property_description"] == f"{TRICKY} 0.0"
    last = body["properties"][-1]
    assert (last["row_index"], last.get("__index", last.get("input_index"))) == (2, 2)


def test_a_result_with_no_properties_is_valid_json(api, user):
    job = lifecycle.job_cancel(job=make_job(user)).job

    body = api.get(f"/api/jobs/{job.id}/result/").json()

    assert body == {
        "job_id": str(job.id),
        "state": "cancelled",
        "cancelled": True,
        "count": 0,
        "properties": [],
    }


def test_parquet_is_written_a_row_group_per_chunk_and_reads_back_whole(user):
    job = stored_properties(make_job(user, simple_rows(5)), per_row=900)

    data = factories.parquet_bytes(exports.export_records(Property.objects.filter(job=job), "parquet"))

    parquet = pq.ParquetFile(io.BytesIO(data))
    assert parquet.metadata.num_row_groups == 3  # 4,500 properties, 2,000 a chunk
    table = parquet.read().to_pylist()
    assert len(table) == 4500
    assert table[0]["property_description"] == "Row 0, 0."
    assert table[-1]["evidence"] == ["The answer is 2."]


def test_the_parquet_download_streams(api, user):
    job = stored_properties(make_job(user, simple_rows(3)), per_row=900)

    response = api.get(f"/api/jobs/{job.id}/properties/", {"format": "parquet"})

    assert response.streaming
    assert len(pq.read_table(io.BytesIO(b"".join(response.streaming_content)))) == 2700


FORMULAS = ["=1+1", "+SUM(A1)", "-2+3", "@cmd", "\tA", "\rB", "'=already", "plain", "'quoted", "a=b"]


def test_csv_cells_that_would_be_formulas_are_escaped_and_read_back_as_they_were(user):
    job = make_job(user, simple_rows(1))
    row = job.rows.get()
    for position, text in enumerate(FORMULAS):
        Property.objects.create(
            job=job, row=row, row_index=0, position=position, **property_dict(text, category=text)
        )

    data = "".join(exports.csv_chunks(exports.export_records(Property.objects.filter(job=job), "csv")))
    frame = factories.read_export(data.encode(), "csv")

    cells = [record["property_description"] for record in csv.DictReader(io.StringIO(data))]
    assert cells == [
        "'=1+1", "'+SUM(A1)", "'-2+3", "'@cmd", "'\tA", "'\rB", "''=already", "plain", "'quoted", "a=b"
    ]  # fmt: skip
    assert list(frame["property_description"]) == FORMULAS
    assert list(frame["category"]) == FORMULAS


def test_the_admin_csv_export_escapes_formulas(admin_user, user):
    job = make_job(user, simple_rows(1))
    Property.objects.create(
        job=job, row=job.rows.get(), row_index=0, position=0, **property_dict("=HYPERLINK(1)")
    )
    client = Client()
    client.force_login(admin_user)

    response = client.post(
        "/admin/jobs/extractjob/", {"action": "export_csv", "_selected_action": [str(job.pk)]}
    )

    text = b"".join(response.streaming_content).decode()
    assert ",'=HYPERLINK(1)," in text
    assert ",=HYPERLINK" not in text


def spec(max_properties: int = 50) -> ExtractionSpec:
    call = CallSettings(model="m", temperature=0.0, top_p=1.0, max_tokens=100)
    return ExtractionSpec("single_model", "prompt", call, max_properties=max_properties)


def test_an_answer_keeps_at_most_the_limit_of_properties_and_counts_the_rest():
    answer = json.dumps(
        [{"property_description": f"P{n}", "behavior_type": "Positive"} for n in range(60)]
        + [{"property_description": "", "behavior_type": "Positive"}]
    )
    row = {"prompt": "p", "model": "m", "model_response": "r"}

    outcome = outcome_from_answer(answer, row, question_id="q", spec=spec())

    assert [prop["property_description"] for prop in outcome.properties] == [f"P{n}" for n in range(50)]
    assert outcome.dropped == 11  # ten beyond the limit and the empty one
    assert outcome.error is None


@pytest.mark.django_db(transaction=True)
def test_the_runner_keeps_the_configured_number_of_properties(user, sim, settings, no_background_worker):

    settings.STRINGSIGHT_MAX_PROPERTIES_PER_ROW = 1
    job = make_job(user, simple_rows(3))

    run_job(job.id, base_url=sim.base_url)

    assert Property.objects.filter(job=job).count() == 3
    rows = ExtractRow.objects.filter(job=job).order_by("index")
    # Every property the LLM answered beyond the first is dropped, and counted.
    answered = [len(json.loads(row.raw_answer)["properties"]) for row in rows]
    assert [row.properties_dropped for row in rows] == [count - 1 for count in answered]
    assert min(answered) > 1


@pytest.mark.e2e
def test_100000_properties_stream_with_bounded_memory(web_server, user, no_background_worker):
    # Built whole, the result would cost the web process memory in
    # proportion to the job; streamed, the cost stays flat.
    job = stored_properties(make_job(user, simple_rows(2000)), per_row=50)
    server = web_server("--workers", "1")
    token = Token.objects.create(user=user).key
    (pid,) = server.worker_pids()
    growth = {}
    for name, path in (
        ("result", f"/api/jobs/{job.id}/result/"),
        ("seed result", f"/extract/jobs/result?job_id={job.id}"),
        ("parquet", f"/api/jobs/{job.id}/properties/?format=parquet"),
    ):
        server.request("GET", f"/api/jobs/{job.id}/", headers={"Authorization": f"Token {token}"})
        reset_peak_memory(pid)
        before = memory_of(pid)["VmRSS"]
        status, _, body = server.request("GET", path, headers={"Authorization": f"Token {token}"})
        growth[name] = (memory_of(pid)["VmHWM"] - before) / MB
        assert status == 200
        if name != "parquet":
            assert json.loads(body)["count"] == 100_000
        else:
            assert pq.read_metadata(io.BytesIO(body)).num_rows == 100_000

    assert max(growth.values()) < 100, growth
