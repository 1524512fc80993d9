"""Idempotent starts: a start sent again with the same Idempotency-Key (a
client retrying after a network error) answers with the job it started."""

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from jobs.models import ExtractJob, ExtractRow, IdempotencyKey
from jobs.services import errors, idempotency, lifecycle
from tests.factories import job_params, simple_rows

pytestmark = pytest.mark.django_db

BODY = {"rows": simple_rows(2), "model_name": "gpt-4o-mini"}


def start(client, body=BODY, key="retry-1", path="/extract/jobs/start"):
    headers = {} if key is None else {"HTTP_IDEMPOTENCY_KEY": key}
    return client.post(path, body, format="json", **headers)


def test_the_same_key_and_body_answers_the_first_starts_job_on_either_path(api):
    first = start(api)
    again = start(api)
    by_the_other_path = start(api, path="/api/jobs/")

    assert (first.status_code, again.status_code, by_the_other_path.status_code) == (201, 200, 200)
    assert again.content == by_the_other_path.content == first.content
    assert first.json()["state"] == "queued"
    assert ExtractJob.objects.count() == 1
    assert ExtractRow.objects.count() == 2


def test_the_replay_is_the_original_answer_even_after_the_job_moved_on(api):
    first = start(api)
    ExtractJob.objects.update(state="done", count_done=2, finished_at=timezone.now())

    again = start(api)

    assert (again.status_code, again.json()) == (200, first.json())


def test_the_same_key_with_another_body_is_a_409_and_starts_nothing(api):
    first = start(api)

    other = start(api, body={**BODY, "temperature": 0.1})

    assert other.status_code == 409
    assert other.json() == {
        "detail": "Idempotency-Key: this key started a job with a different request in the last 24 hours; "
        "send a new key to start another job",
        "code": "conflict",
    }
    assert [str(job_id) for job_id in ExtractJob.objects.values_list("id", flat=True)] == [
        first.json()["job_id"]
    ]


def test_keys_belong_to_their_user(api, other_api):
    mine, theirs = start(api), start(other_api)

    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert mine.json()["job_id"] != theirs.json()["job_id"]
    assert ExtractJob.objects.count() == 2


def test_anonymous_callers_share_one_scope_as_they_share_jobs(settings):
    settings.STRINGSIGHT_ALLOW_ANONYMOUS = True

    first, again = start(APIClient()), start(APIClient())

    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert ExtractJob.objects.get().owner is None


def test_a_key_is_kept_24_hours(api):
    first = start(api)
    IdempotencyKey.objects.update(created_at=timezone.now() - timedelta(hours=24, seconds=1))

    later = start(api)

    assert later.status_code == 201
    assert later.json()["job_id"] != first.json()["job_id"]
    assert str(IdempotencyKey.objects.get().job_id) == later.json()["job_id"]


def test_a_refused_start_keeps_no_key(api):
    refused = start(api, body={"rows": []})
    accepted = start(api)

    assert (refused.status_code, refused.json()["field"]) == (400, "rows")
    assert accepted.status_code == 201
    assert ExtractJob.objects.count() == 1


@pytest.mark.parametrize(
    ("key", "detail"),
    [
        ("", "Idempotency-Key: the header is empty; send a unique key, or no header"),
        ("   ", "Idempotency-Key: the header is empty; send a unique key, or no header"),
        ("k" * 256, "Idempotency-Key: 256 characters is more than the limit of 255"),
    ],
)
def test_an_empty_or_overlong_key_is_a_400_naming_the_header(api, key, detail):
    response = start(api, key=key)

    assert response.status_code == 400
    assert (response.json()["field"], response.json()["detail"]) == ("Idempotency-Key", detail)
    assert ExtractJob.objects.count() == 0


@pytest.mark.parametrize("key", ["a\x00b", "a\x1bb", "a\x7fb"])
def test_a_key_with_a_control_character_is_a_400_naming_the_header(api, key):
    # Stored as it is: PostgreSQL cannot hold the NUL (it was a 500 there),
    # and no HTTP client sends the others on purpose.
    response = start(api, key=key)

    assert response.status_code == 400
    assert (response.json()["field"], response.json()["detail"]) == (
        "Idempotency-Key",
        "Idempotency-Key: the key holds a control character (such as NUL); send printable text",
    )
    assert ExtractJob.objects.count() == 0


def test_a_key_of_255_characters_is_accepted(api):
    assert [start(api, key="k" * 255).status_code for _ in range(2)] == [201, 200]


def test_the_schema_documents_the_header_and_the_replay(api):
    schema = api.get("/api/schema/", {"format": "json"}).json()

    for path, operation in (("/api/jobs/", "post"), ("/extract/jobs/start", "post")):
        documented = schema["paths"][path][operation]
        [header] = [p for p in documented["parameters"] if p["in"] == "header"]
        assert (header["name"], header.get("required", False), header["schema"]) == (
            "Idempotency-Key",
            False,
            {"type": "string"},
        )
        assert {"200", "201", "409"} <= set(documented["responses"])


def test_a_start_that_loses_the_race_for_its_key_answers_with_the_winners_job(user):
    # Both starts found no key; the first committed its job and key first.
    first = lifecycle.job_start_once(
        owner=user, idempotency=idempotent("h"), rows=simple_rows(2), params=job_params()
    )

    same = lifecycle.job_start_once(
        owner=user, idempotency=idempotent("h"), rows=simple_rows(2), params=job_params()
    )
    with pytest.raises(
        errors.JobConflict, match=r"^Idempotency-Key: this key started a job with a different"
    ):
        lifecycle.job_start_once(
            owner=user, idempotency=idempotent("other"), rows=simple_rows(2), params=job_params()
        )

    assert (first.replayed, same.replayed, same.job_id, same.answer) == (
        False,
        True,
        first.job_id,
        first.answer,
    )
    assert ExtractJob.objects.count() == 1
    assert ExtractRow.objects.count() == 2


def idempotent(request_hash: str) -> idempotency.IdempotentStart:
    return idempotency.IdempotentStart(
        key="k", request_hash=request_hash, answer=lambda job: f'{{"id": "{job.id}"}}'
    )


@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_starts_with_one_key_create_one_job(user):
    """Fifty requests released at once, each on its own database
    connection: those that find no key yet race to insert it, and the
    losers answer with the winner's job."""
    token = Token.objects.create(user=user).key
    answers: list[tuple[int, bytes]] = []
    together = threading.Barrier(50)

    def send():
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        try:
            together.wait(timeout=60)
            response = start(client, key="one-key")
            answers.append((response.status_code, response.content))
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(status for status, _ in answers) == [200] * 49 + [201]
    assert len({content for _, content in answers}) == 1  # every answer is the first start's
    assert ExtractJob.objects.count() == 1
    assert ExtractRow.objects.count() == 2
    assert IdempotencyKey.objects.count() == 1
