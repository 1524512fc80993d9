"""The simulator's Files and Batch API, reached like a provider: over HTTP through the real
openai SDK. Batches run in the simulator's background, so tests poll until a condition
holds, with a generous deadline, and never sleep a fixed time."""

import json
import socket
import time
import urllib.error

import openai
import pytest

from tests.fixtures_simulator import MODULE, SimulatorClient, start_simulator, stop_simulator

TRANSCRIPT = """user: Can I move my flight to May 20?
assistant: Sure! Could you share your reservation number?
user: It is NO6JO3.
assistant: call get_reservation_details with {"reservation_id": "NO6JO3"}
assistant: I'm sorry, the new fare is $121 and the change fee is $50.
user: Thanks, go ahead."""
SIDE_BY_SIDE = """Model A
user: Can I bring my dog on board?
assistant: Yes. Pets under 20 lbs fly in the cabin for $125.
Model B
user: Can I bring my dog on board?
assistant: I'm sorry, I cannot help with pet policies."""
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "properties", "schema": {"type": "object"}}}
TERMINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture
def client(sim):
    with openai.OpenAI(base_url=sim.base_url, api_key="sim-key", max_retries=0) as client:
        yield client


def chat_body(content: str, **parameters) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **parameters}


def request_line(custom_id: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(items: list) -> bytes:
    return "".join(f"{item if isinstance(item, str) else json.dumps(item)}\n" for item in items).encode()


def numbered_lines(count: int) -> list[dict]:
    return [request_line(f"job:{index}:1", chat_body(f"{TRANSCRIPT}\n#{index}")) for index in range(count)]


def submit(client, items: list, metadata: dict | None = None):
    uploaded = client.files.create(file=("batch.jsonl", jsonl(items)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata,
    )


def wait_until(client, batch_id: str, holds, timeout: float = 30.0):
    """The batch once `holds(batch)` is true; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not holds(batch := client.batches.retrieve(batch_id)):
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.05)
    return batch


def wait_until_ended(client, batch_id: str):
    return wait_until(client, batch_id, lambda batch: batch.status in TERMINAL)


def file_lines(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_an_uploaded_file_is_retrieved_with_its_content(client):
    content = jsonl(numbered_lines(3))

    uploaded = client.files.create(file=("rows.jsonl", content), purpose="batch")

    assert uploaded.id.startswith("file-")
    assert (uploaded.object, uploaded.bytes, uploaded.filename, uploaded.purpose) == (
        "file",
        len(content),
        "rows.jsonl",
        "batch",
    )
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == content


def test_batch_lines_are_answered_as_live_calls_are(client, sim):
    sim.configure(seed=11)
    bodies = {
        "plain": chat_body(TRANSCRIPT, temperature=0),
        "schema": chat_body(SIDE_BY_SIDE, response_format=SCHEMA_FORMAT),
        "cut": chat_body(TRANSCRIPT, max_tokens=20),
        "empty": chat_body("[[sim:empty]]", response_format={"type": "json_object"}),
        "refusal": chat_body("[[sim:refusal]]", model="gpt-4.1"),
    }

    batch = wait_until_ended(client, submit(client, [request_line(key, b) for key, b in bodies.items()]).id)

    answered = {line["custom_id"]: line for line in file_lines(client, batch.output_file_id)}
    live = {
        key: client.chat.completions.with_raw_response.create(**body).http_response.json()
        for key, body in bodies.items()
    }
    shared = ("object", "model", "choices", "usage")
    assert {key: {k: line["response"]["body"][k] for k in shared} for key, line in answered.items()} == {
        key: {k: answer[k] for k in shared} for key, answer in live.items()
    }
    assert {line["response"]["status_code"] for line in answered.values()} == {200}
    assert {line["error"] for line in answered.values()} == {None}
    assert (batch.status, batch.error_file_id, batch.errors) == ("completed", None, None)
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 5, "failed": 0}
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert sim.batch_stats() == {"lines_total": 5, "by_outcome": {"ok": 3, "truncated": 1, "refusal": 1}}
    assert [(line["batch_id"], line["custom_id"]) for line in sim.batch_lines()] == [
        (batch.id, key) for key in bodies
    ]
    assert len(sim.requests()) == 5  # the live calls only


def test_failed_lines_land_in_the_error_file_the_same_each_time(client, sim):
    sim.configure(batch_rate_failed=0.5)
    lines = numbered_lines(40)

    first = wait_until_ended(client, submit(client, lines).id)
    again = wait_until_ended(client, submit(client, lines).id)

    answered = file_lines(client, first.output_file_id)
    failed = file_lines(client, first.error_file_id)
    assert first.status == "completed"
    assert 0 < len(failed) < 40
    assert first.request_counts.model_dump() == {
        "total": 40,
        "completed": len(answered),
        "failed": len(failed),
    }
    assert sorted(line["custom_id"] for line in answered + failed) == sorted(
        line["custom_id"] for line in lines
    )
    assert {(line["response"]["status_code"], line["error"]["code"]) for line in failed} == {
        (500, "server_error")
    }
    assert {line["response"]["body"]["error"]["type"] for line in failed} == {"server_error"}
    assert [line["custom_id"] for line in file_lines(client, again.error_file_id)] == [
        line["custom_id"] for line in failed
    ]
    assert sim.batch_stats()["by_outcome"] == {"ok": 2 * len(answered), "server_error": 2 * len(failed)}


def test_an_expired_batch_puts_the_lines_not_answered_in_the_error_file(client, sim):
    # About 13 of the 100 lines are answered in the 1.5 s window.
    sim.configure(batch_lines_per_second=10, batch_expiry_seconds=1.5)
    lines = numbered_lines(100)

    batch = wait_until_ended(client, submit(client, lines).id)

    answered = file_lines(client, batch.output_file_id)
    expired = file_lines(client, batch.error_file_id)
    assert batch.status == "expired"
    assert batch.created_at <= batch.expired_at
    assert batch.created_at < batch.expires_at <= batch.created_at + 3
    assert 0 < len(answered) < 100
    assert [line["custom_id"] for line in answered + expired] == [line["custom_id"] for line in lines]
    assert {(line["response"], line["error"]["code"]) for line in expired} == {(None, "batch_expired")}
    assert batch.request_counts.model_dump() == {"total": 100, "completed": len(answered), "failed": 0}
    assert len(sim.batch_lines()) == len(answered)


def test_a_hanging_line_waits_for_its_batch_to_expire(client, sim):
    sim.configure(batch_expiry_seconds=1.5)
    lines = [*numbered_lines(3), request_line("hangs", chat_body(f"{TRANSCRIPT} [[sim:hang]]"))]

    batch = wait_until_ended(client, submit(client, lines).id)

    assert batch.status == "expired"
    assert [line["custom_id"] for line in file_lines(client, batch.output_file_id)] == [
        "job:0:1",
        "job:1:1",
        "job:2:1",
    ]
    assert [
        (line["custom_id"], line["error"]["code"]) for line in file_lines(client, batch.error_file_id)
    ] == [("hangs", "batch_expired")]


def test_a_paused_simulator_answers_no_batch_line(client, sim):
    sim.configure(paused=True, batch_expiry_seconds=1.0)

    batch = wait_until_ended(client, submit(client, numbered_lines(3)).id)

    assert (batch.status, batch.output_file_id) == ("expired", None)
    assert len(file_lines(client, batch.error_file_id)) == 3
    assert sim.batch_lines() == []


def test_a_cancelled_batch_keeps_the_lines_answered_until_the_cancel_took_effect(client, sim):
    sim.configure(batch_lines_per_second=10, batch_cancel_seconds=1.0)
    lines = numbered_lines(1000)
    batch_id = submit(client, lines).id
    running = wait_until(client, batch_id, lambda batch: batch.request_counts.completed >= 3)

    cancelling = client.batches.cancel(batch_id)
    batch = wait_until_ended(client, batch_id)

    answered = file_lines(client, batch.output_file_id)
    assert running.status == "in_progress"
    assert (cancelling.status, cancelling.cancelling_at is not None) == ("cancelling", True)
    assert (batch.status, batch.error_file_id) == ("cancelled", None)
    assert batch.cancelling_at <= batch.cancelled_at
    # Lines went on being answered while the batch was cancelling.
    assert cancelling.request_counts.completed < len(answered) < 1000
    assert [line["custom_id"] for line in answered] == [line["custom_id"] for line in lines[: len(answered)]]
    assert batch.request_counts.model_dump() == {"total": 1000, "completed": len(answered), "failed": 0}
    assert [line["status"] for line in sim.batch_lines()] == [200] * len(answered)


def test_a_held_create_makes_the_batch_before_answering(client, sim):
    # The client gives up before the answer: the batch exists all the same,
    # found only by its metadata, and runs to its end.
    sim.configure(batch_create_delay_seconds=30.0)

    with pytest.raises(openai.APITimeoutError):
        submit(client.with_options(timeout=2.0), numbered_lines(2), {"stringsight_batch": "held"})
    listed = client.batches.list(limit=100).data

    assert [batch.metadata for batch in listed] == [{"stringsight_batch": "held"}]
    assert wait_until_ended(client, listed[0].id).status == "completed"


def test_a_finished_batch_cannot_be_cancelled(client):
    batch = wait_until_ended(client, submit(client, numbered_lines(1)).id)

    with pytest.raises(openai.ConflictError) as caught:
        client.batches.cancel(batch.id)

    assert caught.value.body["message"] == "Cannot cancel a batch with status 'completed'."


def test_the_list_is_newest_first_and_finds_a_batch_by_its_metadata(client):
    first, second, third = (
        submit(client, numbered_lines(1), {"stringsight_batch": f"b{i}"}) for i in range(3)
    )

    page = client.batches.list(limit=2)
    rest = client.batches.list(limit=2, after=second.id)
    found = [
        batch.id for batch in client.batches.list(limit=1) if batch.metadata == {"stringsight_batch": "b1"}
    ]

    assert ([batch.id for batch in page.data], page.has_more) == ([third.id, second.id], True)
    assert ([batch.id for batch in rest.data], rest.has_more) == ([first.id], False)
    assert found == [second.id]


def test_without_a_batch_api_files_and_batches_are_not_found(client, sim):
    sim.configure(batch_api=False)

    with pytest.raises(openai.NotFoundError) as upload:
        client.files.create(file=("batch.jsonl", jsonl(numbered_lines(1))), purpose="batch")
    with pytest.raises(openai.NotFoundError) as create:
        client.batches.create(
            input_file_id="file-1", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.list()

    assert upload.value.body["message"] == "Unknown path /v1/files"
    assert create.value.body["message"] == "Unknown path /v1/batches"


def test_a_bad_input_file_fails_the_batch(client):
    good = request_line("a", chat_body(TRANSCRIPT))
    items = [good, "not json", {**good, "custom_id": None}, good, {**good, "url": "/v1/embeddings"}]

    batch = wait_until_ended(client, submit(client, items).id)

    assert (batch.status, batch.output_file_id, batch.error_file_id) == ("failed", None, None)
    assert batch.failed_at is not None
    assert [(error.code, error.line, error.param) for error in batch.errors.data] == [
        ("invalid_json_line", 2, None),
        ("missing_required_parameter", 3, "custom_id"),
        ("duplicate_custom_id", 4, "custom_id"),
        ("invalid_url", 5, "url"),
    ]
    assert batch.request_counts.model_dump() == {"total": 0, "completed": 0, "failed": 0}


def test_create_refuses_an_unknown_input_file_and_retrieve_an_unknown_batch(client):
    with pytest.raises(openai.BadRequestError) as create:
        client.batches.create(
            input_file_id="file-none", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_none")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-none")

    assert create.value.body["param"] == "input_file_id"


def test_an_upload_beyond_the_body_limit_answers_413(sim):
    host, port = sim.root_url.removeprefix("http://").split(":")
    head = (
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 300000000\r\n\r\n"
    )

    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(head)
        received = b"".join(iter(lambda: connection.recv(65536), b""))

    response_head, body = received.split(b"\r\n\r\n", 1)
    assert response_head.startswith(b"HTTP/1.1 413 ")
    assert json.loads(body)["error"]["message"] == f"body larger than {200 * 1024 * 1024 + 1024 * 1024} bytes"


def test_batch_options_are_checked(sim):
    with pytest.raises(urllib.error.HTTPError) as caught:
        sim.configure(batch_lines_per_second=0)

    assert (caught.value.code, json.load(caught.value)["error"]["message"]) == (
        400,
        "batch_lines_per_second must be a number > 0",
    )


def test_the_command_line_sets_the_batch_options():
    process, base_url = start_simulator(
        "--no-batch-api",
        "--batch-rate-failed",
        "0.25",
        "--batch-cancel-seconds",
        "3",
        "--batch-create-delay-seconds",
        "1.5",
        command=MODULE,
    )
    try:
        config = SimulatorClient(base_url).config()
    finally:
        stop_simulator(process)

    assert {name: value for name, value in config.items() if name.startswith("batch_")} == {
        "batch_api": False,
        "batch_lines_per_second": 2000.0,
        "batch_validating_seconds": 0.2,
        "batch_rate_failed": 0.25,
        "batch_expiry_seconds": 86400.0,
        "batch_cancel_seconds": 3.0,
        "batch_create_delay_seconds": 1.5,
    }
