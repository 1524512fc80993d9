"""POST /extract/single: one row extracted inside the request, against the
LLM simulator over HTTP, recorded as a one-row job."""

import json
import math
import socket
import time
from urllib.parse import urlsplit

import pytest
from rest_framework.test import APIClient

from extraction.parse import parse_properties
from extraction.prompts import named_prompt
from extraction.render import render_row
from jobs.models import ExtractJob, ExtractRow
from llm_simulator import compose_answer
from tests.factories import simple_rows

pytestmark = pytest.mark.django_db

TASK = "Help airline customers change their bookings."
# What the StringSight frontend sends with "Extract on Row N".
FRONTEND_SETTINGS = {
    "method": "single_model",
    "system_prompt": "default",
    "task_description": TASK,
    "model_name": "gpt-4o-mini",
    "temperature": 0.6,
    "top_p": 0.95,
    "max_tokens": 2048,
    "max_workers": 16,
    "use_wandb": False,
    "return_debug": True,
}
DEADLINE = 60.0


@pytest.fixture
def llm(sim, monkeypatch, settings):
    """The web process's LLM settings, pointed at the simulator."""
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sim-key")
    settings.STRINGSIGHT_RETRY_BASE_SECONDS = 0.01
    settings.STRINGSIGHT_RETRY_MAX_SECONDS = 0.05
    return sim


def frontend_row(index: int = 14, **changes) -> dict:
    row = {
        "__index": index,
        "question_id": str(index),
        "prompt": f"Can I move my flight {index} to Friday?",
        "model": "gpt-4o",
        "model_response": "Sure. I called get_reservation_details with your booking and moved it.",
        **changes,
    }
    return row


def extract(client, row: dict, **body):
    return client.post("/extract/single", {"row": row, **FRONTEND_SETTINGS, **body}, format="json")


def simulated_answer(row: dict, system_prompt: str) -> tuple[str, int, int]:
    """The simulator's answer to the row, with the tokens it reports for it."""
    user = render_row(row, "single_model")
    answer, _ = compose_answer(user, 0, "ok", True)  # structured output asks for an object
    return answer, math.ceil((len(system_prompt) + len(user)) / 4), math.ceil(len(answer) / 4)


def test_it_answers_the_rows_properties_and_records_a_one_row_job(api, user, llm):
    row = frontend_row()
    system_prompt = named_prompt("default", "single_model", task_description=TASK)
    answer, prompt_tokens, completion_tokens = simulated_answer(row, system_prompt)
    expected = parse_properties(answer, method="single_model", model_names=("gpt-4o",), question_id="14")

    response = extract(api, row)

    assert response.status_code == 200, response.content
    body = response.json()
    job = ExtractJob.objects.get()
    properties = body.pop("properties")
    assert [{k: v for k, v in p.items() if k not in ("id", "row_index", "__index")} for p in properties] == (
        expected.properties
    )
    assert {(p["row_index"], p["__index"], p["question_id"], p["model"]) for p in properties} == {
        (14, 14, "14", "gpt-4o")
    }
    cost = (prompt_tokens * 0.15 + completion_tokens * 0.60) / 1e6
    assert body == {
        "job_id": str(job.id),
        "counts": {"properties": len(expected.properties)},
        "failures": [],
        "error": None,
        "debug": {
            "raw_answer": answer,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "cost_usd": pytest.approx(cost),
            "cached": False,
            "attempts": 1,
            "dropped": 0,
        },
    }
    assert len(expected.properties) >= 3
    assert (job.kind, job.owner, job.state, job.count_total, job.count_done, job.count_failed) == (
        "single",
        user,
        "done",
        1,
        1,
        0,
    )
    assert (job.properties_count, job.prompt_tokens, job.completion_tokens) == (
        len(expected.properties),
        prompt_tokens,
        completion_tokens,
    )
    assert job.resolved_system_prompt == system_prompt
    assert job.cost_usd == pytest.approx(cost)
    assert ExtractRow.objects.get(job=job).claimed_by.startswith("web:")
    [request] = llm.requests()
    assert (request["model"], request["temperature"], request["top_p"], request["max_tokens"]) == (
        "gpt-4o-mini",
        0.6,
        0.95,
        2048,
    )
    assert request["outcome"] == "ok"


def test_staff_and_the_caller_see_the_single_job_among_their_jobs(api, staff_api, llm):
    job_id = extract(api, frontend_row()).json()["job_id"]

    mine = api.get("/api/jobs/", {"kind": "single"}).json()["results"]
    seen_by_staff = staff_api.get("/api/jobs/", {"kind": "single"}).json()["results"]
    row_jobs = api.get("/api/jobs/", {"kind": "rows"}).json()["results"]

    assert [(job["job_id"], job["kind"], job["state"]) for job in mine] == [(job_id, "single", "done")]
    assert [job["job_id"] for job in seen_by_staff] == [job_id]
    assert row_jobs == []


def test_without_return_debug_it_answers_the_upstream_shape(api, llm):
    response = extract(api, frontend_row(), return_debug=False)

    body = response.json()
    assert set(body) == {"job_id", "properties", "counts", "failures", "error"}
    assert (body["failures"], body["error"], body["counts"]) == (
        [],
        None,
        {"properties": len(body["properties"])},
    )


def test_the_same_row_again_is_answered_from_the_cache(api, llm):
    first = extract(api, frontend_row()).json()

    again = extract(api, frontend_row())

    body = again.json()
    assert len(llm.requests()) == 1
    assert [p["property_description"] for p in body["properties"]] == [
        p["property_description"] for p in first["properties"]
    ]
    assert (body["debug"]["cached"], body["debug"]["total_tokens"], body["debug"]["cost_usd"]) == (
        True,
        0,
        0.0,
    )
    assert ExtractJob.objects.get(pk=body["job_id"]).cache_hits == 1


def test_an_answer_without_a_valid_property_reports_the_failure(api, llm):
    row = frontend_row(prompt="Where is my bag? [[sim:bad_json]]")

    response = extract(api, row)

    body = response.json()
    assert response.status_code == 200
    assert (body["properties"], body["counts"]) == ([], {"properties": 0})
    assert body["failures"] == ["no JSON found in the answer"]
    # Asked twice, as a job's row is, before it fails.
    assert body["error"] == (
        "no valid property in the LLM answer, asked twice. "
        "First answer: no JSON found in the answer. Second answer: no JSON found in the answer"
    )
    job = ExtractJob.objects.get(pk=body["job_id"])
    assert (job.state, job.count_done, job.count_failed) == ("done", 0, 1)


def test_invalid_items_are_dropped_and_listed_as_failures(api, llm):
    response = extract(api, frontend_row(prompt="Where is my bag? [[sim:invalid_items]]"))

    body = response.json()
    assert (len(body["properties"]), body["debug"]["dropped"], body["error"]) == (2, 2, None)
    assert [failure.split(":")[0] for failure in body["failures"]] == ["item 2", "item 4"]


def test_a_row_from_the_side_by_side_view_keeps_both_model_names(api, llm):
    row = {
        "__index": 3,
        "question_id": "3",
        "prompt": "Can I bring my dog on board?",
        "model_a": "gpt-4o",
        "model_b": "claude",
        "model_a_response": "Yes. Pets under 20 lbs fly in the cabin for $125.",
        "model_b_response": "I'm sorry, I cannot help with pet policies.",
    }

    body = extract(api, row, method="side_by_side").json()

    assert body["properties"]
    assert {p["model"] for p in body["properties"]} <= {"gpt-4o", "claude"}
    assert {(p["row_index"], p["__index"], p["question_id"]) for p in body["properties"]} == {(3, 3, "3")}


@pytest.mark.parametrize(
    ("body", "field", "detail"),
    [
        ({"row": None}, "row", "row: This field may not be null."),
        ({"row": [1, 2]}, "row", "row: expected a JSON object, got array"),
        (
            {"row": {"prompt": "p", "model": "m"}, "method": None},
            "row",
            "row: cannot detect the method: the row has neither model_response (single_model) nor "
            "model_a_response and model_b_response (side_by_side); the row has prompt, model",
        ),
        (
            {"row": {"prompt": "p", "model": "m"}, "method": "single_model"},
            "row.model_response",
            "row: missing column 'model_response' (single_model needs prompt, model, model_response; "
            "the row has prompt, model)",
        ),
        (
            {"row": {"prompt": "p", "model": "m", "model_response": 5}},
            "row.model_response",
            "row.model_response: expected a string, an object or a list of chat messages, got number",
        ),
        (
            {"row": frontend_row(), "system_prompt": "defualt"},
            "system_prompt",
            "system_prompt: unknown prompt name 'defualt'; known names: default, agent "
            "(send custom_system_prompt for literal text)",
        ),
        ({"row": frontend_row(), "temperature": 3}, "temperature", None),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_starts_nothing(api, llm, body, field, detail):
    response = api.post("/extract/single", {**FRONTEND_SETTINGS, **body}, format="json")

    assert response.status_code == 400
    error = response.json()
    assert error["field"] == field
    if detail is not None:
        assert error["detail"] == detail
    assert error["detail"].startswith(field.split(".")[0])
    assert ExtractJob.objects.count() == 0
    assert llm.requests() == []


def test_a_row_over_the_size_limit_is_refused_naming_the_row(api, llm, settings):
    settings.STRINGSIGHT_MAX_ROW_BYTES = 300

    response = extract(api, frontend_row(model_response="x" * 400))

    assert response.status_code == 400
    assert response.json()["field"] == "row"
    assert response.json()["detail"].endswith(
        "bytes is more than the limit of 300 bytes per row (STRINGSIGHT_MAX_ROW_BYTES)"
    )


def test_it_needs_a_user_unless_anonymous_mode_is_on(llm, settings):
    refused = extract(APIClient(), frontend_row())
    settings.STRINGSIGHT_ALLOW_ANONYMOUS = True
    accepted = extract(APIClient(), frontend_row())

    assert refused.status_code == 401
    assert refused.json() == {
        "detail": "Authentication credentials were not provided.",
        "code": "not_authenticated",
    }
    assert accepted.status_code == 200
    job = ExtractJob.objects.get()
    assert (str(job.id), job.owner) == (accepted.json()["job_id"], None)
    # Anonymous callers share ownerless jobs, so the job is theirs to read.
    status = APIClient().get("/extract/jobs/status", {"job_id": str(job.id)}).json()
    assert (status["kind"], status["state"], status["count_done"]) == ("single", "done", 1)


def test_it_counts_against_the_job_start_throttle(api, llm, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"job_start": "2/h"}}

    started = api.post("/extract/jobs/start", {"rows": simple_rows(1)}, format="json")
    single = extract(api, frontend_row())
    throttled = extract(api, frontend_row(15))
    start_throttled = api.post("/extract/jobs/start", {"rows": simple_rows(1)}, format="json")

    assert [started.status_code, single.status_code, throttled.status_code, start_throttled.status_code] == [
        201,
        200,
        429,
        429,
    ]
    assert throttled.json()["code"] == "throttled"
    assert ExtractJob.objects.count() == 2


def test_credentials_the_llm_refuses_answer_502_and_end_the_job_in_error(api, llm):
    llm.configure(api_key="another-key")

    response = extract(api, frontend_row())

    job = ExtractJob.objects.get()
    assert response.status_code == 502
    assert response.json() == {
        "detail": (
            "the LLM provider refused the API key (401): Incorrect API key provided; check OPENAI_API_KEY"
        ),
        "code": "llm_error",
        "job_id": str(job.id),
    }
    assert (job.state, job.error) == (
        "error",
        "the LLM provider refused the API key (401): Incorrect API key provided; check OPENAI_API_KEY",
    )


def test_no_answer_within_the_deadline_answers_504_and_aborts_the_call(api, llm, settings):
    # The deadline (1 + 0.05 s) ends the call long before its three
    # attempts of 1 s could.
    settings.STRINGSIGHT_LLM_TIMEOUT = 1.0
    settings.STRINGSIGHT_MAX_ATTEMPTS = 3

    response = extract(api, frontend_row(prompt="Where is my bag? [[sim:hang]]"))

    job = ExtractJob.objects.get()
    detail = (
        "no answer within 1.05 s (STRINGSIGHT_LLM_TIMEOUT + STRINGSIGHT_RETRY_MAX_SECONDS); "
        "the call was cancelled"
    )
    assert response.status_code == 504
    assert response.json() == {"detail": detail, "code": "timeout", "job_id": str(job.id)}
    assert (job.state, job.count_failed) == ("done", 1)
    assert ExtractRow.objects.get(job=job).error == detail
    ended = wait_for(lambda: [r for r in llm.requests() if r["ended_at"] is not None] or None)
    assert [r["outcome"] for r in ended] == ["aborted"] * len(ended)


def wait_for(check, deadline: float = DEADLINE):
    """Poll `check` until it returns something truthy, or fail after `deadline` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {deadline} s")


def raw_request(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST without waiting for its answer, as a browser tab that is
    then closed would."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    connection = socket.create_connection((parts.hostname, parts.port), timeout=DEADLINE)
    connection.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return connection


@pytest.mark.django_db(transaction=True)
def test_a_client_that_hangs_up_aborts_the_llm_call_and_cancels_the_job(live_server, llm, settings):
    settings.STRINGSIGHT_ALLOW_ANONYMOUS = True
    settings.STRINGSIGHT_LLM_TIMEOUT = 120.0
    body = {"row": frontend_row(prompt="Where is my bag? [[sim:hang]]"), **FRONTEND_SETTINGS}

    connection = raw_request(live_server.url, "/extract/single", body)
    [call] = wait_for(llm.requests)  # the LLM call has started
    connection.close()
    closed_at = time.time()

    [ended] = wait_for(lambda: [r for r in llm.requests() if r["ended_at"] is not None])
    job = wait_for(lambda: ExtractJob.objects.filter(state="cancelled").first())
    assert (ended["id"], ended["outcome"], ended["status"]) == (call["id"], "aborted", None)
    # Ended by the hang-up, not by a timeout: long before the 120 s one.
    assert ended["ended_at"] - closed_at < 30
    assert (job.kind, job.count_done, job.count_failed, job.properties_count) == ("single", 0, 0, 0)
    assert ExtractRow.objects.get(job=job).status == "cancelled"
