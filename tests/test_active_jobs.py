"""STRINGSIGHT_USER_MAX_ACTIVE_JOBS: how many queued and running jobs one
user may have; a start or resume beyond it answers 429 naming the limit
(issue 13)."""

import threading

import pytest
from django.core.management.base import CommandError
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from jobs.models import ExtractJob
from tests.factories import make_job, simple_rows
from tests.test_cli import run_extract, write_rows

pytestmark = pytest.mark.django_db

START_PATHS = ["/extract/jobs/start", "/api/jobs/"]


def refusal(active: int) -> dict:
    return {
        "detail": f"you have {active} active job{'' if active == 1 else 's'}, the most "
        "STRINGSIGHT_USER_MAX_ACTIVE_JOBS allows; "
        "wait for one to finish or cancel one",
        "code": "too_many_active_jobs",
    }


def start(client, path="/extract/jobs/start"):
    return client.post(path, {"rows": simple_rows(1)}, format="json")


def test_by_default_a_user_may_have_any_number_of_active_jobs(api, settings):
    assert settings.STRINGSIGHT_USER_MAX_ACTIVE_JOBS is None

    assert [start(api).status_code for _ in range(5)] == [201] * 5


@pytest.mark.parametrize("path", START_PATHS)
def test_a_start_beyond_the_limit_answers_429_naming_it(api, other_api, user, settings, path):
    settings.STRINGSIGHT_USER_MAX_ACTIVE_JOBS = 2
    first, second = start(api, path), start(api, path)
    ExtractJob.objects.filter(pk=second.json()["job_id"]).update(state="running")

    refused = start(api, path)

    assert (first.status_code, second.status_code, refused.status_code) == (201, 201, 429)
    assert refused.json() == refusal(2)
    assert ExtractJob.objects.filter(owner=user).count() == 2
    assert start(other_api, path).status_code == 201  # a count per user


@pytest.mark.parametrize("state", ["done", "error", "cancelled"])
def test_ended_jobs_do_not_count(api, user, settings, state):
    settings.STRINGSIGHT_USER_MAX_ACTIVE_JOBS = 1
    ended = make_job(user)
    ExtractJob.objects.filter(pk=ended.pk).update(state=state)

    assert start(api).status_code == 201
    assert start(api).json() == refusal(1)


def test_a_cancel_makes_room_for_another_start(api, settings):
    settings.STRINGSIGHT_USER_MAX_ACTIVE_JOBS = 1
    first = start(api).json()
    assert start(api).status_code == 429

    api.post(f"/api/jobs/{first['job_id']}/cancel/")

    assert start(api).status_code == 201


def test_a_lowered_limit_says_how_far_over_it_the_user_is(api, user, settings):
    for _ in range(3):
        make_job(user)
    settings.STRINGSIGHT_USER_MAX_ACTIVE_JOBS = 2

    refused = start(api)

    assert refused.json()["detail"] == (
        "you have 3 active jobs, more than the 2 STRINGSIGHT_USER_MAX_ACTIVE_JOBS allows; "
        "wait for one to finish or cancel one"
    )


def test_an_extraction_of_one_row_counts_and_is_refused_too(api, user, settings):
    from tests.test_extract_single import extract, frontend_row

    settings.STRINGSIGHT_USER_MAX_ACTIVE_JOBS = 1
    make_job(user)

    refused = extract(api, frontend_row())

    assert (refused.status_code, refused.json()) == (429, refusal(1))
    assert ExtractJob.objects.count() == 1


def test_a_resume_beyond_the_limit_answers_429(api, user, settings):
    cancelled, queued = make_job(user), make_job(user)
    ExtractJob.objects.filter(pk=cancelled.pk).update(state="cancelled")
    settings.STRINGSIGHT_USER_MAX_ACTIVE_JOBS = 1

    refused = api.post(f"/api/jobs/{cancelled.id}/resume/")
    api.post(f"/api/jobs/{queued.id}/cancel/")
    resumed = api.post(f"/api/jobs/{cancelled.id}/resume/")

    assert (refused.status_code, refused.json()) == (429, refusal(1))
    assert (resumed.status_code, resumed.json()["state"]) == (200, "queued")


def test_anonymous_callers_share_one_count(settings):
    settings.STRINGSIGHT_ALLOW_ANONYMOUS = True
    settings.STRINGSIGHT_USER_MAX_ACTIVE_JOBS = 1

    first, second = start(APIClient()), start(APIClient())

    assert (first.status_code, second.status_code) == (201, 429)
    assert second.json() == refusal(1)


def test_the_cli_is_refused_beyond_the_limit_too(user, settings, tmp_path):
    settings.STRINGSIGHT_USER_MAX_ACTIVE_JOBS = 1
    make_job(user)
    source = tmp_path / "rows.jsonl"
    write_rows(source, simple_rows(1))

    with pytest.raises(CommandError) as error:
        run_extract(str(source), "--user", "alice")

    assert str(error.value) == refusal(1)["detail"]
    assert ExtractJob.objects.count() == 1


def test_the_schema_documents_the_429_of_a_resume(api):
    schema = api.get("/api/schema/", {"format": "json"}).json()

    assert "429" in schema["paths"]["/api/jobs/{job_id}/resume/"]["post"]["responses"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("anonymous", [False, True], ids=["user", "anonymous"])
def test_twenty_concurrent_starts_never_go_beyond_the_limit(user, settings, anonymous):
    """Twenty starts released at once, each on its own database connection:
    the owner's lock makes each count what the others committed."""
    settings.STRINGSIGHT_USER_MAX_ACTIVE_JOBS = 5
    settings.STRINGSIGHT_ALLOW_ANONYMOUS = anonymous
    token = Token.objects.create(user=user).key
    statuses: list[int] = []
    together = threading.Barrier(20)

    def send():
        client = APIClient()
        if not anonymous:
            client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        try:
            together.wait(timeout=60)
            statuses.append(start(client).status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(statuses) == [201] * 5 + [429] * 15
    assert ExtractJob.objects.count() == 5
