"""Errors answer short JSON in the API's one error shape on every path but
the admin's, with DEBUG on or off: never Django's HTML pages (with DEBUG,
its technical pages show settings and tracebacks). And a listed origin can
read them (CORS)."""

import logging

import pytest
from django.test import Client
from rest_framework.test import APIClient

from jobs.api.frontend import PromptCatalogueView
from jobs.api.limits import RequestSizeLimitMiddleware

pytestmark = pytest.mark.django_db

ORIGIN = "http://localhost:5180"
SECRET = "the-database-password-is-hunter2"


@pytest.fixture(params=[False, True], ids=["debug-off", "debug-on"])
def debug(request, settings):
    settings.DEBUG = request.param
    return request.param


def is_json(response) -> bool:
    return response["Content-Type"] == "application/json"


@pytest.mark.parametrize("path", ["/nope", "/api/nope", "/extract/jobs/nope", "/api/jobs/x/nope/"])
def test_an_unknown_path_is_a_json_404(debug, path):
    response = Client().get(path)

    assert response.status_code == 404
    assert is_json(response)
    assert response.json() == {"detail": f"not found: {path}", "code": "not_found"}


@pytest.mark.parametrize("method", ["post", "delete"])
def test_a_write_to_a_path_without_its_slash_is_a_json_404_naming_the_path(debug, method):
    # Django's redirect to the slash would turn a POST into a GET (a start
    # into a list of jobs), and with DEBUG it raises instead (a 500).
    response = getattr(Client(raise_request_exception=False), method)("/api/jobs")

    assert response.status_code == 404
    assert response.json() == {
        "detail": "not found: /api/jobs (the path ends with a slash: /api/jobs/)",
        "code": "not_found",
    }


def test_a_method_a_view_refuses_is_a_json_405(debug):
    plain_django = Client().post("/healthz")
    rest_framework = Client().post("/prompts")

    assert plain_django.status_code == 405
    assert plain_django.json() == {
        "detail": "method POST is not allowed on /healthz",
        "code": "method_not_allowed",
    }
    assert plain_django["Allow"] == "GET"
    assert rest_framework.status_code == 405
    assert rest_framework.json() == {"detail": 'Method "POST" not allowed.', "code": "method_not_allowed"}


def boom(*args, **kwargs):
    raise RuntimeError(SECRET)


def test_an_exception_in_a_view_is_a_json_500_with_a_logged_request_id(debug, monkeypatch, caplog):
    monkeypatch.setattr(PromptCatalogueView, "get", boom)

    with caplog.at_level(logging.ERROR, logger="stringsight.errors"):
        response = Client(raise_request_exception=False).get("/prompts")

    assert response.status_code == 500
    body = response.json()
    request_id = body["request_id"]
    assert body == {
        "detail": f"internal error (request id {request_id})",
        "code": "server_error",
        "request_id": request_id,
    }
    assert len(request_id) == 32
    assert SECRET.encode() not in response.content
    [record] = [r for r in caplog.records if r.name == "stringsight.errors"]
    assert record.getMessage() == f"internal error (request id {request_id}) on GET /prompts"
    assert record.exc_info[1].args == (SECRET,)


def test_an_exception_outside_a_view_is_a_json_500_too(debug, monkeypatch, caplog):
    # Raised in a middleware: Django builds its own 500 page (with DEBUG,
    # the technical one), which is replaced.
    monkeypatch.setattr(RequestSizeLimitMiddleware, "__call__", boom)

    with caplog.at_level(logging.ERROR):
        response = Client(raise_request_exception=False).get("/health")

    assert response.status_code == 500
    assert is_json(response)
    request_id = response.json()["request_id"]
    assert response.json()["detail"] == f"internal error (request id {request_id})"
    assert SECRET.encode() not in response.content
    messages = [r.getMessage() for r in caplog.records]
    assert f"internal error (request id {request_id}) on GET /health" in messages
    # The traceback is in the log (Django's own line, or ours).
    assert any(r.exc_info and r.exc_info[1].args == (SECRET,) for r in caplog.records)


def test_the_admin_keeps_its_html_pages(debug, admin_client):
    response = admin_client.get("/admin/jobs/extractjob/not-a-job/change/")

    # A missing object sends the admin back to its index, as Django's admin does.
    assert (response.status_code, response["Location"]) == (302, "/admin/")
    assert response["Content-Type"].startswith("text/html")
    missing = admin_client.get("/admin/no-such-page/")
    assert missing.status_code == 404
    assert missing["Content-Type"].startswith("text/html")


def test_a_preflight_from_a_listed_origin_allows_json_posts(settings):
    settings.CORS_ALLOWED_ORIGINS = [ORIGIN]

    for path in ("/extract/single", "/extract/jobs/start", "/api/extract/jobs/cancel"):
        response = APIClient().options(
            path,
            HTTP_ORIGIN=ORIGIN,
            HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
            HTTP_ACCESS_CONTROL_REQUEST_HEADERS="content-type",
        )

        assert response.status_code == 200
        assert response["Access-Control-Allow-Origin"] == ORIGIN
        assert "content-type" in response["Access-Control-Allow-Headers"].split(", ")
        assert "POST" in response["Access-Control-Allow-Methods"].split(", ")


def test_error_answers_carry_the_cors_headers_for_a_listed_origin(settings, monkeypatch):
    settings.CORS_ALLOWED_ORIGINS = [ORIGIN]
    monkeypatch.setattr(PromptCatalogueView, "get", boom)
    client = APIClient(HTTP_ORIGIN=ORIGIN, raise_request_exception=False)

    answers = {
        401: client.post("/extract/single", {"row": {}}, format="json"),
        400: client.get("/prompt-text", {"name": "nope"}),
        404: client.get("/no-such-path"),
        405: client.post("/healthz"),
        500: client.get("/prompts"),
    }

    for status, response in answers.items():
        assert response.status_code == status
        assert is_json(response)
        assert response["Access-Control-Allow-Origin"] == ORIGIN
    other = APIClient(HTTP_ORIGIN="https://evil.example").get("/no-such-path")
    assert "Access-Control-Allow-Origin" not in other
