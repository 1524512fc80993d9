"""Crafted input answers 400 in the one error shape, naming the field and the
limit, with DEBUG on or off, and nothing is stored: cursors, numeric
overflow, text sizes, control characters and NUL (issue 19)."""

import base64

import pytest

from jobs.models import ExtractJob, ExtractRow
from jobs.services import claims, lifecycle
from tests import factories
from tests.factories import done_outcome, make_job, simple_rows

pytestmark = pytest.mark.django_db

HUGE = 100000000000000000000  # 10**20: beyond every integer column
ROW = '{"rows": [{"prompt": "p", "model": "m", "model_response": "r"}]'
NOT_FINITE = "expected a finite number, got one too large for a float (JSON has no infinity)"


@pytest.fixture(params=[False, True], ids=["debug-off", "debug-on"])
def debug(request, settings):
    settings.DEBUG = request.param
    return request.param


def error_of(response, status=400) -> dict:
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"] == "application/json"
    return response.json()


@pytest.mark.parametrize("path", ["/api/jobs/", "/api/jobs/{id}/rows/", "/api/jobs/{id}/properties/"])
@pytest.mark.parametrize(
    "cursor",
    [
        "cD14",  # "p=x": a position no column holds
        base64.b64encode(b"p=" + str(HUGE).encode()).decode(),
        base64.b64encode(b"p=2026-13-45").decode(),
        "not base64 at all!",
    ],
)
def test_a_cursor_the_api_did_not_give_out_answers_400(api, user, debug, path, cursor):
    job = make_job(user)

    body = error_of(api.get(path.format(id=job.id), {"cursor": cursor}))

    assert body == {
        "detail": "cursor: not a cursor this API gave out; follow the next and previous links",
        "code": "invalid",
        "field": "cursor",
        "errors": {"cursor": ["cursor: not a cursor this API gave out; follow the next and previous links"]},
    }


def test_a_cursor_the_api_gave_out_still_pages(api, user):
    for _ in range(3):
        make_job(user)

    first = api.get("/api/jobs/", {"page_size": 2}).json()
    second = api.get(first["next"]).json()

    assert (len(first["results"]), len(second["results"])) == (2, 1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sample_size", HUGE, "Ensure this value is less than or equal to 2147483647."),
        ("max_total_tokens", HUGE, "Ensure this value is less than or equal to 9223372036854775807."),
        ("max_tokens", HUGE, f"{HUGE} is above the limit of 32768 (STRINGSIGHT_MAX_TOKENS_CAP)"),
        ("max_workers", HUGE, f"{HUGE} is above the limit of 256 (STRINGSIGHT_MAX_WORKERS)"),
        ("max_cost_usd", "1e400", NOT_FINITE),
        ("temperature", "1e400", NOT_FINITE),
        ("temperature", "true", "expected a number, got boolean"),
        ("top_p", "false", "expected a number, got boolean"),
        ("temperature", '"0.5"', "expected a number, got string"),
        ("max_cost_usd", "true", "expected a number, got boolean"),
        ("sample_size", "true", "A valid integer is required."),
        ("max_workers", "1e400", NOT_FINITE),
    ],
)
def test_start_refuses_numbers_no_column_holds_naming_the_field(api, debug, field, value, message):
    raw = ROW + f', "{field}": {value}}}'

    body = error_of(api.generic("POST", "/extract/jobs/start", raw.encode(), content_type="application/json"))

    assert (body["field"], body["detail"]) == (field, f"{field}: {message}")
    assert ExtractJob.objects.count() == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_total_tokens", HUGE, "Ensure this value is less than or equal to 9223372036854775807."),
        ("max_cost_usd", "1e400", NOT_FINITE),
        ("max_cost_usd", "true", "expected a number, got boolean"),
    ],
)
def test_resume_refuses_numbers_no_column_holds(api, user, debug, field, value, message):
    job = lifecycle.job_cancel(job=make_job(user)).job
    raw = f'{{"{field}": {value}}}'

    body = error_of(api.generic("POST", f"/api/jobs/{job.id}/resume/", raw, content_type="application/json"))

    assert (body["field"], body["detail"]) == (field, f"{field}: {message}")
    job.refresh_from_db()
    assert job.state == "cancelled"


@pytest.mark.parametrize(
    ("query", "field"),
    [({"page_size": str(HUGE)}, "page_size"), ({"page_size": "1e400"}, "page_size")],
)
def test_list_filters_refuse_numbers_out_of_range(api, debug, query, field):
    body = error_of(api.get("/api/jobs/", query))

    assert body["field"] == field


def test_a_page_size_out_of_range_on_rows_and_properties_falls_back_to_the_default(api, user):
    job = make_job(user, simple_rows(3))

    rows = api.get(f"/api/jobs/{job.id}/rows/", {"page_size": str(HUGE)})
    properties = api.get(f"/api/jobs/{job.id}/properties/", {"page_size": "1e400"})

    assert [row["index"] for row in rows.json()["results"]] == [0, 1, 2]
    assert properties.json()["results"] == []


@pytest.mark.parametrize("field", ["system_prompt", "custom_system_prompt", "task_description"])
def test_a_prompt_field_over_the_limit_is_refused_naming_it(api, settings, field):
    settings.STRINGSIGHT_MAX_PROMPT_BYTES = 2048
    body = {"rows": simple_rows(1), field: "é" * 1025}  # 2,050 bytes in 1,025 characters

    error = error_of(api.post("/extract/jobs/start", body, format="json"))

    assert error["field"] == field
    assert error["detail"] == (
        f"{field}: 2050 bytes is more than the limit of 2048 bytes (STRINGSIGHT_MAX_PROMPT_BYTES)"
    )
    assert ExtractJob.objects.count() == 0


def test_the_default_prompt_limit_is_64_kib(api, settings):
    assert settings.STRINGSIGHT_MAX_PROMPT_BYTES == 65536
    at_limit = api.post(
        "/extract/jobs/start", {"rows": simple_rows(1), "custom_system_prompt": "x" * 65536}, format="json"
    )
    over = api.post(
        "/extract/jobs/start", {"rows": simple_rows(1), "custom_system_prompt": "x" * 65537}, format="json"
    )

    assert at_limit.status_code == 201
    assert error_of(over)["field"] == "custom_system_prompt"


@pytest.mark.parametrize("character", ["\r", "\n", "\x1b", "\t", "\x00", "\x85"])
def test_a_model_name_with_a_control_character_is_refused(api, character):
    body = {"rows": simple_rows(1), "model_name": f"gpt-4o-mini{character}X-Injected: 1"}

    error = error_of(api.post("/extract/jobs/start", body, format="json"))

    assert error["field"] == "model_name"
    assert ExtractJob.objects.count() == 0


def test_a_model_name_over_200_characters_is_refused(api):
    error = error_of(
        api.post("/extract/jobs/start", {"rows": simple_rows(1), "model_name": "m" * 201}, format="json")
    )

    assert error["detail"] == "model_name: Ensure this field has no more than 200 characters."


@pytest.mark.parametrize(
    ("column", "method"),
    [("question_id", "single_model"), ("model", "single_model"), ("model_a", "side_by_side")],
)
def test_a_row_name_longer_than_its_column_is_refused_at_start(api, column, method):
    if method == "single_model":
        row = {"prompt": "p", "model": "m", "model_response": "r"}
    else:
        row = {
            "prompt": "p",
            "model_a": "a",
            "model_b": "b",
            "model_a_response": "x",
            "model_b_response": "y",
        }
    rows = [dict(row), {**row, column: "n" * 201}]

    error = error_of(api.post("/extract/jobs/start", {"rows": rows}, format="json"))

    assert error["field"] == f"rows[1].{column}"
    assert error["detail"] == f"rows[1].{column}: 201 characters is more than the limit of 200 characters"
    assert ExtractJob.objects.count() == 0


def test_row_names_of_exactly_200_characters_are_stored_whole(api):
    row = {"prompt": "p", "model": "m" * 200, "model_response": "r", "question_id": "q" * 200}

    response = api.post("/extract/jobs/start", {"rows": [row]}, format="json")

    assert response.status_code == 201
    assert ExtractRow.objects.get().question_id == "q" * 200


@pytest.mark.parametrize(
    ("place", "field"),
    [
        (lambda row: row.update(question_id="q\x00"), "rows[1].question_id"),
        (lambda row: row.update(model="m\x00"), "rows[1].model"),
        (lambda row: row.update(prompt="a NUL \x00 here"), "rows[1].prompt"),
        (
            lambda row: row.update(model_response=[{"role": "user", "content": "\x00"}]),
            "rows[1].model_response[0].content",
        ),
        (lambda row: row.update({"extra\x00": 1}), "rows[1].extra\x00"),
    ],
)
def test_a_nul_anywhere_in_a_row_is_refused_naming_where(api, debug, place, field):
    rows = simple_rows(2)
    place(rows[1])

    error = error_of(api.post("/extract/jobs/start", {"rows": rows}, format="json"))

    assert error["field"] == field
    assert error["detail"] == f"{field}: holds a NUL character (\\u0000), which cannot be stored"
    assert ExtractJob.objects.count() == 0


def test_an_escaped_backslash_u0000_is_text_not_a_nul(api):
    rows = simple_rows(1)
    rows[0]["prompt"] = "the escape \\u0000 spelled out"

    response = api.post("/extract/jobs/start", {"rows": rows}, format="json")

    assert response.status_code == 201
    assert ExtractRow.objects.get().data["prompt"] == "the escape \\u0000 spelled out"


@pytest.mark.parametrize("field", ["system_prompt", "custom_system_prompt", "task_description"])
def test_a_nul_in_a_prompt_field_is_refused(api, field):
    error = error_of(
        api.post("/extract/jobs/start", {"rows": simple_rows(1), field: "a\x00b"}, format="json")
    )

    assert error["field"] == field


@pytest.mark.parametrize(
    ("score", "field"),
    [('"score": 1e400', "rows[0].score"), ('"score": {"acc": -1e999}', "rows[0].score.acc")],
)
def test_a_score_too_large_for_a_float_is_refused_naming_it(api, debug, score, field):
    raw = '{"rows": [{"prompt": "p", "model": "m", "model_response": "r", ' + score + "}]}"

    error = error_of(api.generic("POST", "/extract/jobs/start", raw, content_type="application/json"))

    assert error["field"] == field
    assert error["detail"] == (
        f"{field}: expected a finite number, got one too large for a float (JSON has no infinity)"
    )


@pytest.mark.parametrize("column", ["prompt", "model", "question_id"])
def test_a_name_or_prompt_too_large_for_a_float_is_refused_naming_it(api, column):
    # Stored, it became null (and the question id "inf").
    row = '{"prompt": "p", "model": "m", "model_response": "r", "question_id": "q"}'
    raw = '{"rows": [' + row.replace(f'"{column}": "{column[0]}"', f'"{column}": -1e400') + "]}"

    error = error_of(api.generic("POST", "/extract/jobs/start", raw, content_type="application/json"))

    assert error["field"] == f"rows[0].{column}"
    assert error["detail"] == (
        f"rows[0].{column}: expected a finite number, got one too large for a float (JSON has no infinity)"
    )
    assert ExtractJob.objects.count() == 0


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ('"model_response": {"content": "r", "logprob": -1e400}', "rows[0].model_response.logprob"),
        ('"model_response": "r", "extra": [1, 2.5e999]', "rows[0].extra[1]"),
    ],
)
def test_a_number_too_large_for_a_float_anywhere_in_a_row_is_refused_naming_it(api, debug, value, field):
    # Stored, it became null.
    raw = '{"rows": [{"prompt": "p", "model": "m", ' + value + "}]}"

    error = error_of(api.generic("POST", "/extract/jobs/start", raw, content_type="application/json"))

    assert (error["field"], error["detail"]) == (field, f"{field}: {NOT_FINITE}")
    assert ExtractJob.objects.count() == 0


def test_a_nan_score_is_refused(api):
    raw = b'{"rows": [{"prompt": "p", "model": "m", "model_response": "r", "score": NaN}]}'

    error = error_of(api.generic("POST", "/extract/jobs/start", raw, content_type="application/json"))

    assert "NaN" in error["detail"]


def test_results_of_names_at_the_column_size_store_and_read_back(api, user):
    rows = [{"prompt": "p", "model": "m" * 200, "model_response": "r", "question_id": "q" * 200}]
    job = make_job(user, rows)
    lifecycle.job_mark_running(job_id=job.id)
    claimed = claims.claim_rows(job_id=job.id, worker_id="w", limit=1).rows[0]
    outcome = done_outcome(1)
    outcome.properties[0].update(model="m" * 200, question_id="q" * 200)

    assert factories.record_row_result(
        job_id=job.id, row_id=claimed.id, row_index=0, worker_id="w", outcome=outcome
    )
    assert job.properties.get().model == "m" * 200
