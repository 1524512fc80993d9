"""Access control of the API: who may do what, anonymous mode, CORS,
throttling, limits, production settings, and the LLM key kept secret."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client
from rest_framework.test import APIClient

from jobs.models import ExtractJob, ExtractRow
from tests.conftest import grant, token_client
from tests.factories import make_job, run_job, simple_rows

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.django_db

ROLES = [
    "anonymous",
    "owner",
    "other_user",
    "staff_without_permission",
    "staff_view_only",
    "staff_manager",
    "superuser",
]


@pytest.fixture
def people(user, django_user_model):
    def staff(name, *codenames):
        member = django_user_model.objects.create_user(name, password="x", is_staff=True)
        return grant(member, *codenames) if codenames else member

    return {
        "anonymous": None,
        "owner": user,
        "other_user": django_user_model.objects.create_user("dave", password="x"),
        "staff_without_permission": staff("erin"),
        "staff_view_only": staff("frank", "view_extractjob"),
        "staff_manager": staff("grace", "view_extractjob", "change_extractjob"),
        "superuser": django_user_model.objects.create_superuser("root", "r@x", "x"),
    }


@pytest.fixture
def clients(people):
    return {role: token_client(person) if person else APIClient() for role, person in people.items()}


EXPECTED = {
    #                           start status cancel result
    "anonymous": (401, 401, 401, 401),
    "owner": (201, 200, 200, 200),
    "other_user": (201, 404, 404, 404),
    "staff_without_permission": (201, 404, 404, 404),
    "staff_view_only": (201, 200, 403, 200),
    "staff_manager": (201, 200, 200, 200),
    "superuser": (201, 200, 200, 200),
}


@pytest.mark.parametrize("role", ROLES)
def test_the_permission_matrix_of_the_api(clients, user, role):
    client = clients[role]
    job = make_job(user)
    ExtractJob.objects.filter(pk=job.id).update(state="running")
    finished = make_job(user)
    ExtractJob.objects.filter(pk=finished.id).update(state="done")

    answers = (
        client.post("/extract/jobs/start", {"rows": simple_rows(1)}, format="json").status_code,
        client.get("/extract/jobs/status", {"job_id": str(job.id)}).status_code,
        client.post("/extract/jobs/cancel", {"job_id": str(job.id)}, format="json").status_code,
        client.get("/extract/jobs/result", {"job_id": str(finished.id)}).status_code,
    )

    assert answers == EXPECTED[role]
    job.refresh_from_db()
    assert job.state == ("cancelled" if EXPECTED[role][2] == 200 else "running")


ADMIN_LIST = "/admin/jobs/extractjob/"
EXPECTED_IN_ADMIN = {
    #                           list  cancel action takes effect
    "anonymous": (302, False),
    "owner": (302, False),
    "other_user": (302, False),
    "staff_without_permission": (403, False),
    "staff_view_only": (200, False),
    "staff_manager": (200, True),
    "superuser": (200, True),
}


@pytest.mark.parametrize("role", ROLES)
def test_the_permission_matrix_of_the_admin(people, user, role):
    client = Client()
    if people[role] is not None:
        client.force_login(people[role])
    job = make_job(user)
    ExtractJob.objects.filter(pk=job.id).update(state="running")

    listed = client.get(ADMIN_LIST)
    client.post(ADMIN_LIST, {"action": "cancel_jobs", "_selected_action": [str(job.id)]})

    job.refresh_from_db()
    assert (listed.status_code, job.state == "cancelled") == EXPECTED_IN_ADMIN[role]
    if listed.status_code == 302:
        assert listed["Location"].startswith("/admin/login/")


def test_anonymous_mode_shares_ownerless_jobs_among_anonymous_callers(settings, api):
    settings.STRINGSIGHT_ALLOW_ANONYMOUS = True
    first, second = APIClient(), APIClient()

    started = first.post("/extract/jobs/start", {"rows": simple_rows(1)}, format="json")
    job_id = started.json()["job_id"]

    assert started.status_code == 201
    assert ExtractJob.objects.get(pk=job_id).owner is None
    assert second.get("/extract/jobs/status", {"job_id": job_id}).status_code == 200
    assert api.get("/extract/jobs/status", {"job_id": job_id}).status_code == 404  # a signed-in user's view
    assert (
        second.post("/extract/jobs/cancel", {"job_id": job_id}, format="json").json()["state"] == "cancelled"
    )


def test_anonymous_mode_is_off_by_default(settings):
    assert settings.STRINGSIGHT_ALLOW_ANONYMOUS is False
    assert APIClient().post("/extract/jobs/start", {"rows": simple_rows(1)}, format="json").status_code == 401


def test_cors_allows_no_origin_by_default(api):
    response = api.get("/extract/prompts", HTTP_ORIGIN="http://localhost:5173")
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_the_configured_origins(settings, api):
    settings.CORS_ALLOWED_ORIGINS = ["http://localhost:5173"]

    allowed = api.get("/extract/prompts", HTTP_ORIGIN="http://localhost:5173")
    preflight = APIClient().options(
        "/extract/jobs/start",
        HTTP_ORIGIN="http://localhost:5173",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS="authorization,content-type,idempotency-key",
    )
    other = api.get("/extract/prompts", HTTP_ORIGIN="https://evil.example")

    assert allowed.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert preflight.status_code == 200
    allowed_headers = preflight.headers["access-control-allow-headers"].split(", ")
    assert {"authorization", "content-type", "idempotency-key"} <= set(allowed_headers)
    assert "access-control-allow-origin" not in other.headers


def test_starting_jobs_is_throttled_per_user_with_retry_after(api, other_api, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"job_start": "2/min"}}

    answers = [api.post("/extract/jobs/start", {"rows": simple_rows(1)}, format="json") for _ in range(3)]

    assert [answer.status_code for answer in answers] == [201, 201, 429]
    assert answers[2].json()["code"] == "throttled"
    assert 0 < int(answers[2].headers["Retry-After"]) <= 60
    assert other_api.post("/extract/jobs/start", {"rows": simple_rows(1)}, format="json").status_code == 201
    job_id = answers[0].json()["job_id"]
    assert all(api.get("/extract/jobs/status", {"job_id": job_id}).status_code == 200 for _ in range(5))
    assert ExtractJob.objects.count() == 3


def test_a_row_over_the_size_limit_is_refused_naming_it(api, settings):
    settings.STRINGSIGHT_MAX_ROW_BYTES = 1000
    rows = simple_rows(3)
    rows[2]["model_response"] = "x" * 2000

    response = api.post("/extract/jobs/start", {"rows": rows}, format="json")

    assert response.status_code == 400
    assert response.json()["field"] == "rows[2]"
    assert response.json()["detail"].endswith(
        "bytes is more than the limit of 1000 bytes per row (STRINGSIGHT_MAX_ROW_BYTES)"
    )


def run_manage(*arguments, **env):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("DJANGO_")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_production_settings_refuse_to_start_without_a_secret_key_or_hosts():
    no_key = run_manage("check", DJANGO_DEBUG="false", DJANGO_ALLOWED_HOSTS="jobs.example.com")
    no_hosts = run_manage("check", DJANGO_DEBUG="false", DJANGO_SECRET_KEY="k" * 60)

    assert no_key.returncode != 0
    assert "DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is false" in no_key.stderr
    assert no_hosts.returncode != 0
    assert "DJANGO_ALLOWED_HOSTS must be set when DJANGO_DEBUG is false" in no_hosts.stderr


def test_the_documented_production_environment_passes_check_deploy():
    checked = run_manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY="p" * 30 + "Q7x!k" * 10,
        DJANGO_ALLOWED_HOSTS="jobs.example.com",
        STRINGSIGHT_TLS="true",
        CSRF_TRUSTED_ORIGINS="https://jobs.example.com",
    )

    assert checked.returncode == 0, checked.stderr
    assert "System check identified no issues" in checked.stdout


def test_the_llm_key_never_reaches_errors_logs_or_responses(api, user, sim, caplog):
    secret = "sk-test-S3cretKeyThatMustNeverLeak"
    rows = simple_rows(2)
    rows[0]["prompt"] += " [[sim:400_echo_auth]]"
    job = make_job(user, rows)

    with caplog.at_level(logging.DEBUG):
        run_job(job.id, base_url=sim.base_url, api_key=secret)
    sim.configure(api_key="another-key")
    failing = make_job(user, simple_rows(1, marker="second"))
    with caplog.at_level(logging.DEBUG):
        run_job(failing.id, base_url=sim.base_url, api_key=secret)

    echoed = ExtractRow.objects.get(job=job, index=0)
    assert echoed.status == "failed"
    assert echoed.error == "LLM error 400: Bad request for credentials [redacted]"
    failing.refresh_from_db()
    assert failing.error == (
        "the LLM provider refused the API key (401): Incorrect API key provided; check OPENAI_API_KEY"
    )
    responses = [
        api.get(f"/api/jobs/{job.id}/").content,
        b"".join(api.get(f"/api/jobs/{job.id}/result/").streaming_content),
        api.get(f"/api/jobs/{failing.id}/").content,
    ]
    stored = [str(row) for row in ExtractRow.objects.values_list("error", "raw_answer")]
    assert secret not in caplog.text
    assert not [body for body in responses if secret.encode() in body]
    assert not [row for row in stored if secret in row]
    assert not ExtractJob.objects.filter(error__contains=secret).exists()
