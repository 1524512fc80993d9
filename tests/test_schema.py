"""The OpenAPI schema is complete and real responses match it. The job
bodies are built from the very tables their schema is made of
(jobs.presenter); the error shape and the frontend's other bodies are
written beside their serializers, and these tests keep them honest."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from jobs.services import claims, lifecycle
from tests import factories
from tests.factories import done_outcome, make_job

pytestmark = pytest.mark.django_db

PATHS = {
    "/api/jobs/": {"get", "post"},
    "/api/jobs/{job_id}/": {"get", "delete"},
    "/api/jobs/{job_id}/resume/": {"post"},
    "/api/jobs/{job_id}/rows/": {"get"},
    "/api/jobs/{job_id}/properties/": {"get"},
    "/api/jobs/{job_id}/cancel/": {"post"},
    "/api/jobs/{job_id}/result/": {"get"},
    "/extract/jobs/start": {"post"},
    "/extract/jobs/status": {"get"},
    "/extract/prompts": {"get"},
    "/extract/jobs/cancel": {"post"},
    "/extract/jobs/result": {"get"},
    "/health": {"get"},
    "/prompts": {"get"},
    "/prompt-text": {"get"},
    "/extract/single": {"post"},
    "/detect-and-validate": {"post"},
}


@pytest.fixture
def openapi(api):
    response = api.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def assert_matches(openapi: dict, component: str, body) -> None:
    registry = Registry().with_resource("urn:api", Resource.from_contents(openapi, DRAFT202012))
    validator = Draft202012Validator({"$ref": f"urn:api#/components/schemas/{component}"}, registry=registry)
    errors = [f"{list(error.path)}: {error.message}" for error in validator.iter_errors(body)]
    assert errors == []


def test_schema_generates_without_warnings(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yml"))


def test_schema_documents_every_job_endpoint(openapi):
    documented = {path: set(item) & {"get", "post", "delete"} for path, item in openapi["paths"].items()}
    assert {path: methods for path, methods in documented.items() if path in PATHS} == PATHS
    seed_status = openapi["paths"]["/extract/jobs/status"]["get"]
    assert [(p["name"], p["in"], p["required"]) for p in seed_status["parameters"]] == [
        ("job_id", "query", True)
    ]


def test_swagger_ui_is_served(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    assert b"swagger-ui" in response.content


def test_responses_match_the_schema(api, user, openapi):
    started = api.post(
        "/extract/jobs/start", {"rows": [{"prompt": "p", "model": "m", "model_response": "r"}]}, format="json"
    )
    assert_matches(openapi, "JobStatus", started.json())
    job = make_job(user)
    lifecycle.job_mark_running(job_id=job.id)
    row = claims.claim_rows(job_id=job.id, worker_id="w", limit=1).rows[0]
    factories.record_row_result(
        job_id=job.id, row_id=row.id, row_index=0, worker_id="w", outcome=done_outcome(2)
    )

    assert_matches(openapi, "JobDetail", api.get(f"/api/jobs/{job.id}/").json())
    assert_matches(openapi, "Error", api.get(f"/api/jobs/{job.id}/result/").json())
    assert_matches(openapi, "CancelResponse", api.post(f"/api/jobs/{job.id}/cancel/").json())
    result = api.get(f"/api/jobs/{job.id}/result/").json()
    assert result["count"] == 2
    assert_matches(openapi, "Result", result)
    assert_matches(openapi, "Error", api.post("/extract/jobs/start", {}, format="json").json())
    assert_matches(openapi, "SeedResult", api.get("/extract/jobs/result", {"job_id": str(job.id)}).json())


def test_frontend_responses_match_the_schema(api, openapi, sim, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sim-key")
    row = {"prompt": "p", "model": "m", "model_response": "An answer.", "__index": 3}
    upload = SimpleUploadedFile("rows.jsonl", json.dumps(row).encode())

    assert_matches(openapi, "Health", api.get("/health").json())
    assert_matches(openapi, "PromptCatalogue", api.get("/prompts").json())
    assert_matches(openapi, "PromptText", api.get("/prompt-text", {"name": "agent"}).json())
    assert_matches(openapi, "Error", api.get("/prompt-text", {"name": "nope"}).json())
    for debug in (False, True):
        single = api.post("/extract/single", {"row": row, "return_debug": debug}, format="json").json()
        assert single["properties"]
        assert_matches(openapi, "ExtractSingleResponse", single)
    detected = api.post("/detect-and-validate", {"file": upload}, format="multipart").json()
    assert detected["valid"] is True
    assert_matches(openapi, "DetectResponse", detected)
    no_method = SimpleUploadedFile("rows.jsonl", b'{"a": 1}')
    assert_matches(
        openapi,
        "DetectResponse",
        api.post("/detect-and-validate", {"file": no_method}, format="multipart").json(),
    )
