"""The StringSight frontend's calls other than /extract/single: /health,
/prompts, /prompt-text and /detect-and-validate, in the shapes the
frontend reads, also under the /api prefix."""

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from extraction.prompts import DEFAULT_TASK_DESCRIPTIONS, named_prompt
from jobs.models import ExtractJob
from tests.conftest import Client
from tests.factories import simple_rows

pytestmark = pytest.mark.django_db

DATA = Path(__file__).parent / "data" / "airline_data_demo.jsonl"
TASK = "Help airline customers change their bookings."


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_health_answers_ok_without_the_database_or_a_user(prefix, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = APIClient().get(f"{prefix}/health")
        # A stale token in the browser must not make the server look down.
        with_bad_token = APIClient(HTTP_AUTHORIZATION="Token 0000").get(f"{prefix}/health")

    assert (response.status_code, response.json()) == (200, {"ok": True})
    assert (with_bad_token.status_code, with_bad_token.json()) == (200, {"ok": True})


def test_prompts_lists_default_and_agent_as_the_frontend_reads_them(client):
    response = client.get("/prompts")

    assert response.status_code == 200
    assert response.json() == {
        "prompts": [
            {
                "name": name,
                "label": label,
                "has_task_description": True,
                "preview": named_prompt(name, "single_model")[:180],
                "default_task_description_single": DEFAULT_TASK_DESCRIPTIONS[name, "single_model"],
                "default_task_description_sbs": DEFAULT_TASK_DESCRIPTIONS[name, "side_by_side"],
            }
            for name, label in (("default", "Default"), ("agent", "Agent"))
        ]
    }
    previews = [prompt["preview"] for prompt in response.json()["prompts"]]
    assert [len(preview) for preview in previews] == [180, 180]
    assert previews[0].startswith("You study how language models behave.")


@pytest.mark.parametrize("name", ["default", "agent"])
@pytest.mark.parametrize("method", ["single_model", "side_by_side"])
def test_prompt_text_is_exactly_what_a_job_started_with_it_sends(api, name, method):
    """The frontend shows it as the "Full system prompt" and highlights the
    task description in it; what it shows must be what the LLM gets."""
    task = DEFAULT_TASK_DESCRIPTIONS[name, method]
    row = simple_rows(1)[0] if method == "single_model" else {
        "prompt": "p", "model_a": "a", "model_b": "b", "model_a_response": "x", "model_b_response": "y"
    }  # fmt: skip

    response = APIClient().get("/prompt-text", {"name": name, "task_description": task, "method": method})
    started = api.post(
        "/extract/jobs/start",
        {"rows": [row], "system_prompt": name, "task_description": task, "method": method},
        format="json",
    )

    assert response.status_code == 200
    body = response.json()
    assert body == {"name": name, "text": named_prompt(name, method, task_description=task)}
    assert task in body["text"]
    assert body["text"] == ExtractJob.objects.get(pk=started.json()["job_id"]).resolved_system_prompt


def test_prompt_text_defaults_to_single_model_and_to_no_task_section(client):
    response = client.get("/prompt-text", {"name": "agent"})

    assert response.json() == {"name": "agent", "text": named_prompt("agent", "single_model")}
    assert "What the evaluated model was asked to do" not in response.json()["text"]


def test_prompt_text_keeps_the_task_description_verbatim_inside_it(client):
    task = "Book flights; never\ncharge twice — “quoted” ünïcode."

    text = client.get("/prompt-text", {"name": "default", "task_description": task}).json()["text"]

    assert f"What the evaluated model was asked to do:\n{task}\n" in text


@pytest.mark.parametrize(
    ("query", "field", "detail"),
    [
        (
            {"name": "defualt"},
            "name",
            "name: unknown prompt name 'defualt'; known names: default, agent",
        ),
        ({"name": "default", "method": "pairwise"}, "method", 'method: "pairwise" is not a valid choice.'),
        ({}, "name", "name: This field is required."),
    ],
)
def test_prompt_text_refuses_an_unknown_name_or_method_naming_it(client, query, field, detail):
    response = client.get("/prompt-text", query)

    assert response.status_code == 400
    assert response.json() == {
        "detail": detail,
        "code": "invalid",
        "field": field,
        "errors": {field: [detail.split(": ", 1)[1]]},
    }


def upload(client, name: str, content: bytes, path: str = "/detect-and-validate"):
    return client.post(path, {"file": SimpleUploadedFile(name, content)}, format="multipart")


@pytest.fixture
def demo_rows():
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def test_detect_and_validate_reads_the_demo_file_as_the_start_would(api, demo_rows):
    response = upload(api, "airline_data_demo.jsonl", DATA.read_bytes())

    assert response.status_code == 200
    assert response.json() == {
        "method": "single_model",
        "valid": True,
        "missing": [],
        "row_count": 100,
        "columns": list(dict.fromkeys(column for row in demo_rows for column in row)),
        "preview": demo_rows[:50],
        "error": None,
    }


@pytest.mark.parametrize("name", ["rows.json", "rows.csv", "rows.parquet"])
def test_detect_and_validate_reads_json_csv_and_parquet(api, name):
    rows = simple_rows(3)
    if name == "rows.json":
        content = json.dumps({"rows": rows}).encode()
    elif name == "rows.csv":
        content = pd.DataFrame(rows).to_csv(index=False).encode()
    else:
        buffer = io.BytesIO()
        pd.DataFrame(rows).to_parquet(buffer, index=False)
        content = buffer.getvalue()

    body = upload(api, name, content).json()

    assert (body["method"], body["valid"], body["row_count"], body["preview"]) == (
        "single_model",
        True,
        3,
        rows,
    )
    assert body["columns"] == ["prompt", "model", "model_response", "question_id"]


def test_detect_and_validate_names_what_is_missing(api):
    pair = {"prompt": "p", "model_a": "a", "model_b": "b", "model_a_response": "x", "model_b_response": "y"}
    rows = [pair, {**pair, "model_b_response": ""}, {k: v for k, v in pair.items() if k != "model_b"}]
    content = "\n".join(json.dumps(row) for row in rows).encode()

    body = upload(api, "pairs.jsonl", content).json()

    assert body == {
        "method": "side_by_side",
        "valid": False,
        "missing": ["model_b"],
        "row_count": 3,
        "columns": list(pair),
        "preview": rows,
        "error": "rows[1]: empty column 'model_b_response' (side_by_side needs prompt, model_a, model_b, "
        "model_a_response, model_b_response; the row has prompt, model_a, model_b, model_a_response, "
        "model_b_response)",
    }


def test_detect_and_validate_answers_no_method_for_unknown_columns(api):
    body = upload(api, "rows.jsonl", b'{"question": "q", "answer": "a"}\n').json()

    assert (body["method"], body["valid"], body["missing"], body["columns"]) == (
        None,
        False,
        [],
        ["question", "answer"],
    )
    assert body["error"].startswith("rows[0]: cannot detect the method")


def test_detect_and_validate_applies_the_starts_row_limit(api, settings):
    settings.STRINGSIGHT_MAX_ROWS = 2
    content = "\n".join(json.dumps(row) for row in simple_rows(3)).encode()

    body = upload(api, "rows.jsonl", content).json()

    assert (body["valid"], body["row_count"]) == (False, 3)
    assert body["error"] == "rows: 3 rows are more than the limit of 2 per job (STRINGSIGHT_MAX_ROWS)"


@pytest.mark.parametrize(
    ("name", "content", "detail"),
    [
        (
            "rows.jsonl",
            b'{"prompt": "p"}\n{"prompt": \n',
            "file: rows.jsonl: cannot read it as jsonl: line 2: Expecting value: line 2 column 1 (char 12)",
        ),
        (
            "rows.txt",
            b"hello",
            "file: rows.txt: unknown input format '.txt'; use .jsonl, .json, .csv or .parquet",
        ),
        (
            "rows.json",
            b'{"prompt": "p"}',
            'file: rows.json: expected a list of rows (or an object with one under "rows"), got object',
        ),
        ("rows.jsonl", b"\xff\xfe\n", None),
    ],
)
def test_a_file_that_cannot_be_read_is_a_400_naming_the_problem(api, name, content, detail):
    response = upload(api, name, content)

    assert response.status_code == 400
    body = response.json()
    assert (body["code"], body["field"]) == ("invalid", "file")
    if detail is None:
        assert body["detail"].startswith("file: rows.jsonl: cannot read it as jsonl: line 1: 'utf-8' codec")
    else:
        assert body["detail"] == detail


@pytest.mark.parametrize(
    ("name", "content", "detail"),
    [
        (
            "rows.jsonl",
            b"{}\n" * 6_000,
            "file: rows.jsonl: more than 50 rows, the limit per job (STRINGSIGHT_MAX_ROWS)",
        ),
        (
            "rows.json",
            b"[" + b",".join([b"{}"] * 20_000) + b"]",
            "file: rows.json: more than 10000 values, the limit (STRINGSIGHT_MAX_JSON_VALUES)",
        ),
        (
            "rows.csv",
            b"prompt\n" + b"p\n" * 20_000,
            "file: rows.csv: more than 10000 values, the limit (STRINGSIGHT_MAX_JSON_VALUES)",
        ),
    ],
)
def test_a_dense_file_is_refused_at_the_starts_limits(api, settings, name, content, detail):
    # Counted before any row is built, as a start's body is.
    settings.STRINGSIGHT_MAX_JSON_VALUES = 10_000
    settings.STRINGSIGHT_MAX_ROWS = 50

    response = upload(api, name, content)

    assert response.status_code == 400
    assert response.json() == {"detail": detail, "code": "invalid", "field": "file"}


NESTED = b'{"prompt": "p", "model": "m", "model_response": "r", "x": %s}'


@pytest.mark.parametrize(
    ("name", "content", "detail"),
    [
        (
            "rows.jsonl",
            NESTED % (b"[" * 100 + b"]" * 100),
            "file: rows.jsonl: nested deeper than 64 levels (STRINGSIGHT_MAX_JSON_DEPTH)",
        ),
        (
            "rows.json",
            b"[" + NESTED % (b"[" * 100_000 + b"]" * 100_000) + b"]",
            "file: rows.json: cannot read it as json: maximum recursion depth exceeded while decoding "
            "a JSON array from a unicode string",
        ),
        (
            "rows.jsonl",
            NESTED % (b"[" * 100_000 + b"]" * 100_000),
            "file: rows.jsonl: cannot read it as jsonl: line 1: maximum recursion depth exceeded while "
            "decoding a JSON array from a unicode string",
        ),
    ],
)
def test_a_file_nested_too_deep_is_a_400_naming_the_limit(api, name, content, detail):
    response = upload(api, name, content)

    assert response.status_code == 400
    assert response.json() == {"detail": detail, "code": "invalid", "field": "file"}


@pytest.mark.parametrize(
    ("name", "content", "stored"),
    [
        ("rows.jsonl", b'{"prompt": "p", "model": "m", "model_response": "r", "x": NaN}\n', None),
        ("rows.json", b'[{"prompt": "p", "model": "m", "model_response": "r", "x": [1e999]}]', [None]),
        ("rows.csv", b"prompt,model,model_response,x\np,m,r,-inf\n", None),
    ],
)
def test_numbers_json_cannot_hold_are_previewed_as_null(api, name, content, stored):
    # As a start stores them; Python's json writes NaN, and 1e999 reads as infinity.
    body = upload(api, name, content).json()

    assert (body["valid"], body["error"]) == (True, None)
    assert body["preview"] == [{"prompt": "p", "model": "m", "model_response": "r", "x": stored}]


def test_detect_and_validate_needs_the_file_field(api):
    response = api.post("/detect-and-validate", {"other": "x"}, format="multipart")
    as_json = api.post("/detect-and-validate", {"rows": simple_rows(1)}, format="json")

    assert response.status_code == 400
    assert response.json()["detail"] == (
        "file: this field is required (a multipart upload of a .jsonl, .json, .csv or .parquet file)"
    )
    assert as_json.status_code == 415


def test_detect_and_validate_refuses_a_body_over_the_request_limit(api, settings):
    settings.STRINGSIGHT_MAX_REQUEST_BYTES = 2048

    response = upload(api, "rows.jsonl", DATA.read_bytes())

    assert response.status_code == 413
    assert response.json()["detail"].endswith("bytes (STRINGSIGHT_MAX_REQUEST_BYTES)")


def parquet_of(columns: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, compression="zstd")
    return buffer.getvalue()


def test_an_upload_of_more_values_than_a_start_may_hold_is_refused_before_it_is_read(api, settings):
    # A few KB of Parquet (its values dictionary-encoded) held millions of
    # rows: read whole, they cost the web process gigabytes.
    settings.STRINGSIGHT_MAX_JSON_VALUES = 10_000
    rows = 4_000
    content = parquet_of({name: [name[0]] * rows for name in ("prompt", "model", "model_response")})
    assert len(content) < 2_000

    response = upload(api, "rows.parquet", content)

    assert response.status_code == 400
    assert response.json()["detail"] == (
        "file: rows.parquet: 4000 rows of 3 columns: more than 10000 values, the limit "
        "(STRINGSIGHT_MAX_JSON_VALUES)"
    )


def test_a_parquet_upload_larger_decoded_than_a_request_may_be_is_refused(api, settings):
    settings.STRINGSIGHT_MAX_REQUEST_BYTES = 100_000
    # One long answer, stored once in the file's dictionary, repeated in every row.
    content = parquet_of({"prompt": ["p"] * 200, "model": ["m"] * 200, "model_response": ["r" * 5_000] * 200})
    assert len(content) < 20_000

    response = upload(api, "rows.parquet", content)

    assert response.status_code == 400
    assert response.json()["detail"].startswith("file: rows.parquet: its values take more than 100000 bytes")
    assert response.json()["detail"].endswith("(STRINGSIGHT_MAX_REQUEST_BYTES)")


def test_detect_and_validate_needs_a_user_unless_anonymous_mode_is_on(settings):
    content = json.dumps(simple_rows(1)).encode()

    refused = upload(APIClient(), "rows.json", content)
    settings.STRINGSIGHT_ALLOW_ANONYMOUS = True
    accepted = upload(APIClient(), "rows.json", content)

    assert (refused.status_code, refused.json()["code"]) == (401, "not_authenticated")
    assert (accepted.status_code, accepted.json()["valid"]) == (200, True)


def test_every_frontend_path_also_answers_under_the_api_prefix(settings, sim, monkeypatch):
    """The frontend's default base is /api; a proxy that keeps the prefix
    sends its calls here as they are."""
    settings.STRINGSIGHT_ALLOW_ANONYMOUS = True
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sim-key")
    client = Client()  # reads streamed results back too

    health = client.get("/api/health")
    prompts = client.get("/api/prompts")
    text = client.get("/api/prompt-text", {"name": "default", "task_description": TASK})
    detected = upload(
        client, "rows.json", json.dumps(simple_rows(2)).encode(), path="/api/detect-and-validate"
    )
    single = client.post("/api/extract/single", {"row": simple_rows(1)[0]}, format="json")
    started = client.post("/api/extract/jobs/start", {"rows": simple_rows(2)}, format="json")
    job_id = started.json()["job_id"]
    status = client.get("/api/extract/jobs/status", {"job_id": job_id})
    cancel = client.post("/api/extract/jobs/cancel", {"job_id": job_id}, format="json")
    result = client.get("/api/extract/jobs/result", {"job_id": job_id})

    assert health.json() == {"ok": True}
    assert [prompt["name"] for prompt in prompts.json()["prompts"]] == ["default", "agent"]
    assert text.json()["text"] == named_prompt("default", "single_model", task_description=TASK)
    assert (detected.json()["row_count"], detected.json()["valid"]) == (2, True)
    assert (single.status_code, single.json()["counts"]["properties"]) == (
        200,
        len(single.json()["properties"]),
    )
    assert (started.status_code, status.json()["state"]) == (201, "queued")
    assert (cancel.json()["state"], cancel.json()["message"]) == ("cancelled", "job cancelled")
    assert (result.json()["cancelled"], result.json()["count"]) == (True, 0)
    # The RESTful API keeps its own paths.
    assert client.get(f"/api/jobs/{job_id}/").json()["state"] == "cancelled"
