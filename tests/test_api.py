import json
import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from extraction.rows import sample_indexes
from jobs.models import ExtractJob, ExtractRow, Property
from jobs.services import claims, lifecycle
from tests import factories
from tests.factories import done_outcome, make_job, property_dict, simple_rows

pytestmark = pytest.mark.django_db

START_PATHS = ["/extract/jobs/start", "/api/jobs/"]


def status_of(client, job_id, seed=True):
    if seed:
        return client.get("/extract/jobs/status", {"job_id": str(job_id)})
    return client.get(f"/api/jobs/{job_id}/")


def finish_with_properties(job: ExtractJob, descriptions_per_row: list[list[str]], state: str = "done"):
    """Store properties the way the worker does, then set the final state."""
    lifecycle.job_mark_running(job_id=job.id)
    for row in job.rows.order_by("index"):
        descriptions = descriptions_per_row[row.index] if row.index < len(descriptions_per_row) else []
        Property.objects.bulk_create(
            Property(
                job=job,
                row=row,
                row_index=row.index,
                position=position,
                **property_dict(text, question_id=row.question_id),
            )
            for position, text in enumerate(descriptions)
        )
    total = sum(len(d) for d in descriptions_per_row)
    ExtractJob.objects.filter(pk=job.id).update(
        state=state, properties_count=total, count_done=len(descriptions_per_row)
    )
    job.refresh_from_db()
    return job


@pytest.mark.parametrize("path", START_PATHS)
def test_start_creates_a_queued_job_with_its_rows(api, user, path):
    response = api.post(
        path, {"rows": simple_rows(3), "model_name": "gpt-4o-mini", "temperature": 0}, format="json"
    )

    assert response.status_code == 201
    body = response.json()
    job = ExtractJob.objects.get(pk=body["job_id"])
    assert (body["state"], body["count_total"], body["count_done"], body["progress"]) == ("queued", 3, 0, 0.0)
    assert (job.owner, job.method, job.model_name, job.temperature) == (
        user,
        "single_model",
        "gpt-4o-mini",
        0.0,
    )
    assert job.rows.count() == 3


def test_start_applies_stringsight_defaults_for_omitted_and_null_values(api):
    response = api.post("/extract/jobs/start", {"rows": simple_rows(1), "top_p": None}, format="json")

    job = ExtractJob.objects.get(pk=response.json()["job_id"])
    assert (job.temperature, job.top_p, job.max_tokens, job.max_workers) == (0.6, 0.95, 2048, 16)
    assert job.system_prompt == "default"
    assert "property_description" in job.resolved_system_prompt


def test_start_detects_side_by_side_rows(api):
    row = {
        "prompt": "Hi",
        "model_a": "a",
        "model_b": "b",
        "model_a_response": "Hello",
        "model_b_response": "Hey",
    }

    response = api.post("/extract/jobs/start", {"rows": [row]}, format="json")

    assert response.status_code == 201
    assert response.json()["method"] == "side_by_side"


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({}, "rows", "This field is required"),
        ({"rows": []}, "rows", "the list is empty"),
        ({"rows": "not a list"}, "rows", "expected a list of row objects, got string"),
        (
            {"rows": [{"prompt": "p", "model": "m", "model_response": "r"}, 7]},
            "rows[1]",
            "expected a JSON object, got number",
        ),
        ({"rows": [{"prompt": "p", "model": "m"}]}, "rows[0]", "model_response"),
        ({"rows": simple_rows(1), "method": "pairwise"}, "method", '"pairwise" is not a valid choice'),
        (
            {"rows": simple_rows(1), "system_prompt": "defualt"},
            "system_prompt",
            "unknown prompt name 'defualt'",
        ),
        ({"rows": simple_rows(1), "temperature": 3}, "temperature", "less than or equal to 2.0"),
        ({"rows": simple_rows(1), "temperature": "warm"}, "temperature", "expected a number, got string"),
        ({"rows": simple_rows(1), "max_workers": 0}, "max_workers", "greater than or equal to 1"),
        ({"rows": simple_rows(1), "max_workers": 100000}, "max_workers", "STRINGSIGHT_MAX_WORKERS"),
        ({"rows": simple_rows(1), "max_tokens": 10**9}, "max_tokens", "STRINGSIGHT_MAX_TOKENS_CAP"),
    ],
)
def test_start_rejects_bad_input_naming_the_field(api, body, field, fragment):
    response = api.post("/extract/jobs/start", body, format="json")

    assert response.status_code == 400
    error = response.json()
    assert error["field"].startswith(field), error
    assert error["detail"].startswith(field), error
    assert fragment in error["detail"]
    assert ExtractJob.objects.count() == 0


def test_start_rejects_more_rows_than_the_limit(api, settings):
    settings.STRINGSIGHT_MAX_ROWS = 2

    response = api.post("/extract/jobs/start", {"rows": simple_rows(3)}, format="json")

    assert response.status_code == 400
    assert response.json()["detail"] == (
        "rows: 3 rows are more than the limit of 2 per job (STRINGSIGHT_MAX_ROWS)"
    )


def test_start_rejects_malformed_json_and_other_content_types(api):
    malformed = api.generic("POST", "/extract/jobs/start", b'{"rows": [', content_type="application/json")
    form = api.post("/extract/jobs/start", {"rows": "x"})

    assert malformed.status_code == 400
    assert "JSON parse error" in malformed.json()["detail"]
    assert form.status_code == 415
    assert ExtractJob.objects.count() == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/extract/jobs/start"),
        ("get", "/extract/jobs/status?job_id={id}"),
        ("post", "/extract/jobs/cancel"),
        ("get", "/extract/jobs/result?job_id={id}"),
        ("post", "/api/jobs/"),
        ("get", "/api/jobs/{id}/"),
        ("post", "/api/jobs/{id}/cancel/"),
        ("get", "/api/jobs/{id}/result/"),
    ],
)
def test_anonymous_requests_are_refused(user, method, path):
    job = make_job(user)

    response = getattr(APIClient(), method)(path.format(id=job.id), {"job_id": str(job.id)}, format="json")

    assert response.status_code == 401
    assert response.json()["detail"] == "Authentication credentials were not provided."
    job.refresh_from_db()
    assert job.state == "queued"


@pytest.mark.parametrize("seed", [True, False])
def test_status_reports_the_seed_fields(api, user, seed):
    job = make_job(user, simple_rows(4))
    ExtractJob.objects.filter(pk=job.id).update(
        state="running",
        count_done=2,
        count_failed=1,
        properties_count=7,
        prompt_tokens=300,
        completion_tokens=120,
    )

    response = status_of(api, job.id, seed)

    assert response.status_code == 200
    body = response.json()
    assert {
        key: body[key] for key in ("job_id", "state", "progress", "count_done", "count_total", "error")
    } == {
        "job_id": str(job.id),
        "state": "running",
        "progress": 0.75,
        "count_done": 2,
        "count_total": 4,
        "error": None,
    }
    assert (body["count_failed"], body["properties_count"]) == (1, 7)
    assert body["usage"] == {"prompt_tokens": 300, "completion_tokens": 120, "total_tokens": 420}


def test_status_reads_one_job_row_whatever_the_job_size(api, user):
    job = finish_with_properties(make_job(user, simple_rows(50)), [["a", "b", "c"]] * 50)

    with CaptureQueriesContext(connection) as queries:
        response = status_of(api, job.id)

    assert response.json()["properties_count"] == 150
    sql = [query["sql"] for query in queries.captured_queries]
    assert len(sql) == 2  # the token's user, then the job row with its standing
    tables = (ExtractRow._meta.db_table, Property._meta.db_table)
    assert not any(table in statement for statement in sql for table in tables)


@pytest.mark.parametrize(
    ("query", "status", "detail"),
    [
        ({}, 400, "job_id: this field is required"),
        ({"job_id": "not-a-uuid"}, 400, "job_id: 'not-a-uuid' is not a valid job id (expected a UUID)"),
        (
            {"job_id": "00000000-0000-0000-0000-000000000000"},
            404,
            "job_id: no job 00000000-0000-0000-0000-000000000000",
        ),
    ],
)
def test_status_rejects_missing_malformed_and_unknown_ids(api, query, status, detail):
    response = api.get("/extract/jobs/status", query)

    assert response.status_code == status
    assert response.json()["detail"] == detail


def test_restful_paths_reject_a_malformed_id(api):
    for response in (
        api.get("/api/jobs/nope/"),
        api.post("/api/jobs/nope/cancel/"),
        api.get("/api/jobs/nope/result/"),
    ):
        assert response.status_code == 400
        assert response.json()["field"] == "job_id"


def test_another_users_job_answers_404_and_stays_untouched(api, other_user):
    theirs = make_job(other_user)

    responses = [
        status_of(api, theirs.id),
        api.post("/extract/jobs/cancel", {"job_id": str(theirs.id)}, format="json"),
        api.get("/extract/jobs/result", {"job_id": str(theirs.id)}),
        api.post(f"/api/jobs/{theirs.id}/cancel/"),
    ]

    assert [response.status_code for response in responses] == [404, 404, 404, 404]
    theirs.refresh_from_db()
    assert theirs.state == "queued"


def test_staff_see_and_cancel_everyones_jobs(staff_api, user):
    job = make_job(user)

    assert status_of(staff_api, job.id).status_code == 200
    assert staff_api.post(f"/api/jobs/{job.id}/cancel/").json()["state"] == "cancelled"


@pytest.mark.parametrize("seed", [True, False])
def test_cancel_of_a_queued_job_answers_cancelled_at_once(api, user, seed):
    job = make_job(user, simple_rows(3))

    if seed:
        response = api.post("/extract/jobs/cancel", {"job_id": str(job.id)}, format="json")
    else:
        response = api.post(f"/api/jobs/{job.id}/cancel/")

    assert response.status_code == 200
    assert response.json() == {
        "job_id": str(job.id),
        "state": "cancelled",
        "message": "job cancelled",
        "properties_count": 0,
    }
    assert set(ExtractRow.objects.filter(job=job).values_list("status", flat=True)) == {"cancelled"}


def test_cancel_of_a_running_job_reports_the_properties_it_keeps(api, user):
    job = make_job(user, simple_rows(3))
    lifecycle.job_mark_running(job_id=job.id)
    row = claims.claim_rows(job_id=job.id, worker_id="w", limit=1).rows[0]
    factories.record_row_result(
        job_id=job.id, row_id=row.id, row_index=0, worker_id="w", outcome=done_outcome(3)
    )

    response = api.post("/extract/jobs/cancel", {"job_id": str(job.id)}, format="json")

    assert response.json()["properties_count"] == 3
    result = api.get("/extract/jobs/result", {"job_id": str(job.id)}).json()
    assert (result["count"], result["cancelled"], result["state"]) == (3, True, "cancelled")


def test_cancel_twice_answers_200_both_times(api, user):
    job = make_job(user)
    api.post("/extract/jobs/cancel", {"job_id": str(job.id)}, format="json")

    again = api.post("/extract/jobs/cancel", {"job_id": str(job.id)}, format="json")

    assert again.status_code == 200
    assert again.json()["state"] == "cancelled"
    assert again.json()["message"] == "job was already cancelled"


@pytest.mark.parametrize("state", ["done", "error"])
def test_restful_cancel_of_a_finished_job_is_a_conflict(api, user, state):
    job = make_job(user)
    ExtractJob.objects.filter(pk=job.id).update(state=state)

    response = api.post(f"/api/jobs/{job.id}/cancel/")

    assert response.status_code == 409
    assert response.json() == {"detail": f"job already finished (state: {state})", "code": "conflict"}


@pytest.mark.parametrize("state", ["done", "error"])
def test_seed_cancel_of_a_finished_job_answers_its_final_state(api, user, state):
    # The StringSight frontend shows any non-2xx as "Failed to cancel", also
    # for a click that raced the job's last row; upstream answered 200.
    job = finish_with_properties(make_job(user, simple_rows(2)), [["a", "b"], ["c"]], state=state)

    response = api.post("/extract/jobs/cancel", {"job_id": str(job.id)}, format="json")

    assert response.status_code == 200
    assert response.json() == {
        "job_id": str(job.id),
        "state": state,
        "message": f"job had already finished (state: {state}); nothing was cancelled",
        "properties_count": 3,
    }
    job.refresh_from_db()
    assert (job.state, job.cancelled_at) == (state, None)


@pytest.mark.parametrize("body", [{}, {"job_id": "x"}, ["not", "an", "object"]])
def test_seed_cancel_rejects_a_bad_body(api, body):
    response = api.post("/extract/jobs/cancel", body, format="json")

    assert response.status_code == 400
    assert response.json()["field"] == "job_id"


@pytest.mark.parametrize("state", ["queued", "running"])
def test_result_of_an_unfinished_job_is_a_conflict_naming_the_state(api, user, state):
    job = make_job(user)
    ExtractJob.objects.filter(pk=job.id).update(state=state)

    response = api.get("/extract/jobs/result", {"job_id": str(job.id)})

    assert response.status_code == 409
    assert f"(state: {state})" in response.json()["detail"]


PROPERTY_CONTENT_KEYS = {
    "id",
    "question_id",
    "model",
    "property_description",
    "category",
    "reason",
    "evidence",
    "behavior_type",
    "contains_errors",
    "unexpected_behavior",
}


@pytest.mark.parametrize(("state", "cancelled"), [("done", False), ("cancelled", True), ("error", False)])
def test_result_returns_properties_in_input_order(api, user, state, cancelled):
    job = finish_with_properties(
        make_job(user, simple_rows(2)), [["first", "second"], ["third"]], state=state
    )

    seed = api.get("/extract/jobs/result", {"job_id": str(job.id)})
    restful = api.get(f"/api/jobs/{job.id}/result/")

    for response in (seed, restful):
        assert response.status_code == 200
        body = response.json()
        assert (body["count"], body["cancelled"], body["state"]) == (3, cancelled, state)
        assert [p["property_description"] for p in body["properties"]] == ["first", "second", "third"]
        assert [p["question_id"] for p in body["properties"]] == ["q0", "q0", "q1"]
        uuid.UUID(body["properties"][0]["id"])
    assert set(seed.json()["properties"][0]) == PROPERTY_CONTENT_KEYS | {"row_index", "__index"}
    assert set(restful.json()["properties"][0]) == PROPERTY_CONTENT_KEYS | {"row_index", "input_index"}


def test_results_report_the_callers_row_index_after_sampling(api, user):
    # The frontend numbers its rows in __index and opens the conversation whose
    # __index equals a property's __index (else its row_index).
    rows = simple_rows(10)
    for position, row in enumerate(rows):
        row["__index"] = 500 + position
    picked = sample_indexes(10, 4)  # [0, 1, 4, 9]
    rows[picked[2]]["__index"] = "not a number"  # then its position in the request stands in
    started = api.post("/extract/jobs/start", {"rows": rows, "sample_size": 4}, format="json").json()
    job = ExtractJob.objects.get(pk=started["job_id"])
    lifecycle.job_mark_running(job_id=job.id)
    claimed = claims.claim_rows(job_id=job.id, worker_id="w", limit=4).rows
    claims.record_row_results(
        job_id=job.id,
        worker_id="w",
        results=[
            (row, done_outcome(1, properties=[property_dict(question_id=row.question_id)])) for row in claimed
        ],
    )
    expected_index = [at if at == picked[2] else 500 + at for at in picked]

    seed = api.get("/extract/jobs/result", {"job_id": str(job.id)}).json()["properties"]
    restful = api.get(f"/api/jobs/{job.id}/result/").json()["properties"]
    paged = api.get(f"/api/jobs/{job.id}/properties/").json()["results"]
    job_rows = api.get(f"/api/jobs/{job.id}/rows/").json()["results"]

    assert [(p["row_index"], p["__index"], p["question_id"]) for p in seed] == [
        (index, index, f"q{at}") for index, at in zip(expected_index, picked, strict=True)
    ]
    assert [(p["row_index"], p["input_index"]) for p in restful] == list(enumerate(expected_index))
    assert [(p["row_index"], p["input_index"]) for p in paged] == list(enumerate(expected_index))
    assert [(r["index"], r["input_index"]) for r in job_rows] == list(enumerate(expected_index))


def test_session_writes_need_a_csrf_token(user):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)

    response = client.post("/extract/jobs/start", {"rows": simple_rows(1)}, format="json")

    assert response.status_code == 403
    assert response.json()["detail"].startswith("CSRF Failed")
    assert ExtractJob.objects.count() == 0


def test_a_session_user_reads_their_job_without_a_token(user):
    client = APIClient()
    client.force_login(user)
    job = make_job(user)

    assert client.get("/extract/jobs/status", {"job_id": str(job.id)}).json()["state"] == "queued"


def test_drf_create_token_makes_a_working_token(user):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("drf_create_token", "alice", stdout=out)
    key = out.getvalue().split()[2]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")

    assert client.post("/extract/jobs/start", {"rows": simple_rows(1)}, format="json").status_code == 201


def test_start_refuses_a_cost_budget_for_a_model_without_a_price(api, settings):
    settings.STRINGSIGHT_ALLOWED_MODELS = ["*"]
    response = api.post(
        "/extract/jobs/start",
        {"rows": simple_rows(1), "model_name": "my-local-model", "max_cost_usd": 1.0},
        format="json",
    )

    assert response.status_code == 400
    assert response.json()["detail"] == (
        "max_cost_usd: no price is known for model 'my-local-model', so a cost budget cannot be kept; "
        "add it to STRINGSIGHT_PRICES or use max_total_tokens"
    )


def test_start_with_sampling_and_budgets_reports_them_in_the_status(api):
    body = {
        "rows": simple_rows(10),
        "sample_size": 4,
        "max_total_tokens": 5000,
        "max_cost_usd": 0.5,
        "model_name": "gpt-4o",
        "use_cache": False,
    }

    started = api.post("/extract/jobs/start", body, format="json").json()

    assert (started["count_total"], started["sample_size"]) == (4, 4)
    assert started["budget"] == {"max_cost_usd": 0.5, "max_total_tokens": 5000}
    assert (started["cost_usd"], started["cache_hits"]) == (0.0, 0)
    assert ExtractJob.objects.get(pk=started["job_id"]).use_cache is False


@pytest.mark.parametrize("field", ["sample_size", "max_total_tokens"])
def test_start_rejects_non_positive_sizes(api, field):
    response = api.post("/extract/jobs/start", {"rows": simple_rows(1), field: 0}, format="json")

    assert response.status_code == 400
    assert response.json()["field"] == field


def test_prompts_lists_every_named_prompt_for_every_method(client):
    body = client.get("/extract/prompts", {"task_description": "Book flights for airline customers."}).json()

    assert body["names"] == ["default", "agent"]
    assert [(p["name"], p["method"]) for p in body["prompts"]] == [
        ("default", "single_model"),
        ("default", "side_by_side"),
        ("agent", "single_model"),
        ("agent", "side_by_side"),
    ]
    assert all("Book flights for airline customers." in p["text"] for p in body["prompts"])
    assert all("property_description" in p["text"] for p in body["prompts"])


def test_an_oversized_body_is_refused_before_it_is_read(api, settings):
    settings.STRINGSIGHT_MAX_REQUEST_BYTES = 2048
    body = {"rows": [{"prompt": "p" * 4000, "model": "m", "model_response": "r"}]}

    response = api.post("/extract/jobs/start", body, format="json")

    assert response.status_code == 413
    assert response.json()["detail"].endswith(
        "bytes is more than the limit of 2048 bytes (STRINGSIGHT_MAX_REQUEST_BYTES)"
    )
    assert ExtractJob.objects.count() == 0


@pytest.mark.parametrize("depth", [100, 5000])
def test_deeply_nested_json_is_refused(api, depth):
    response_value = "[" * depth + "]" * depth
    raw = '{"rows": [{"prompt": "p", "model": "m", "model_response": ' + response_value + "}]}"

    response = api.generic("POST", "/extract/jobs/start", raw.encode(), content_type="application/json")

    assert response.status_code == 400
    assert response.json()["detail"].startswith("JSON parse error - nested deeper than 64 levels")
    assert ExtractJob.objects.count() == 0


def test_non_utf8_bytes_are_refused(api):
    raw = b'{"rows": [{"prompt": "\xff\xfe caf\xe9", "model": "m", "model_response": "r"}]}'

    response = api.generic("POST", "/extract/jobs/start", raw, content_type="application/json")

    assert response.status_code == 400
    assert response.json()["detail"].startswith("JSON parse error")
    assert ExtractJob.objects.count() == 0


def test_a_body_in_the_charset_it_declares_is_read_in_that_charset(api):
    # In latin-1 these bytes are "cafÃ©"; read as UTF-8 they would be "café".
    raw = '{"rows": [{"prompt": "cafÃ©", "model": "m", "model_response": "r"}]}'.encode("latin-1")

    response = api.generic(
        "POST", "/extract/jobs/start", raw, content_type="application/json; charset=latin-1"
    )

    assert response.status_code == 201
    assert ExtractRow.objects.get().data["prompt"] == "cafÃ©"


def test_start_stores_integers_beyond_64_bits_exactly_and_refuses_nan(api):
    # orjson, which encodes the rows, refuses such an integer: the standard
    # library writes it instead.
    huge = (
        b'{"rows": [{"prompt": "p", "model": "m", "model_response": "r", "score": 1234567890123456789012}]}'
    )
    accepted = api.generic("POST", "/extract/jobs/start", huge, content_type="application/json")
    # NaN is not JSON.
    nan = b'{"rows": [{"prompt": "p", "model": "m", "model_response": "r", "score": NaN}]}'
    refused = api.generic("POST", "/extract/jobs/start", nan, content_type="application/json")

    assert accepted.status_code == 201
    row = ExtractRow.objects.get(job_id=accepted.json()["job_id"])
    assert row.data["score"] == 1234567890123456789012
    assert refused.status_code == 400
    assert (
        refused.json()["detail"]
        == "JSON parse error - Out of range float values are not JSON compliant: 'NaN'"
    )


@pytest.mark.parametrize("field", ["prompt", "custom_system_prompt"])
def test_an_unpaired_surrogate_escape_is_refused_not_a_500(api, field):
    body = {"rows": [{"prompt": "p", "model": "m", "model_response": "r"}], "custom_system_prompt": "s"}
    raw = json.dumps(body).replace('"p"' if field == "prompt" else '"s"', '"text \\ud800 here"').encode()
    paired = json.dumps(body).replace('"p"', '"an emoji \\ud83d\\ude00"').encode()

    refused = api.generic("POST", "/extract/jobs/start", raw, content_type="application/json")
    accepted = api.generic("POST", "/extract/jobs/start", paired, content_type="application/json")

    assert refused.status_code == 400
    assert refused.json()["detail"] == (
        "JSON parse error - a string holds an unpaired surrogate escape (such as \\ud800), "
        "which is not Unicode text"
    )
    assert accepted.status_code == 201
    assert ExtractRow.objects.get().data["prompt"] == "an emoji \U0001f600"


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data; boundary=x"])
def test_other_content_types_are_refused(api, content_type):
    response = api.generic("POST", "/extract/jobs/start", b'{"rows": []}', content_type=content_type)

    assert response.status_code == 415
    assert response.json()["code"] == "unsupported_media_type"
    assert ExtractJob.objects.count() == 0


def test_a_refused_start_leaves_existing_jobs_untouched(api, user):
    job = make_job(user, simple_rows(2))

    api.post("/extract/jobs/start", {"rows": [{"prompt": "p"}]}, format="json")

    job.refresh_from_db()
    assert (ExtractJob.objects.count(), job.rows.count(), job.state) == (1, 2, "queued")


def test_a_row_error_names_its_row_once(api):
    response = api.post(
        "/extract/jobs/start", {"rows": [*simple_rows(2), {"prompt": "p", "model": "m"}]}, format="json"
    )

    body = response.json()
    assert body["detail"].startswith("rows[2]: missing column 'model_response'")
    assert body["detail"].count("rows[2]") == 1
    assert body["field"].startswith("rows[2]")
