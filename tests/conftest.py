import copy
import json
from pathlib import Path

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.fixtures_simulator import llm_simulator, sim  # noqa: F401  (shared fixtures)
from tests.fixtures_web import web_server  # noqa: F401  (shared fixtures)
from tests.fixtures_worker import (  # noqa: F401  (shared fixtures)
    no_background_worker,
    qcluster,
    start_worker,
    worker_process,
)

DATA = Path(__file__).parent / "data" / "airline_data_demo.jsonl"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    # Lets fixtures see whether the test failed (to print a worker's log).
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # PBKDF2's deliberate slowness would dominate the suite's run time.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_throttle_counts(request, django_db_blocker):
    # Throttle counts live in the database cache table, which neither a
    # test's rollback nor a flush empties.
    uses_db = request.node.get_closest_marker("django_db") or {"db", "transactional_db"} & set(
        request.fixturenames
    )
    if uses_db:
        from django.core.cache import cache

        with django_db_blocker.unblock():
            cache.clear()


@pytest.fixture(scope="session")
def _airline_rows():
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


@pytest.fixture
def airline_rows(_airline_rows):
    """The 100 real tau-bench airline transcripts (single_model rows)."""
    return copy.deepcopy(_airline_rows)


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-password")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-password")


def grant(user, *codenames: str):
    from django.contrib.auth.models import Permission

    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="jobs", codename__in=codenames)
    )
    return type(user).objects.get(pk=user.pk)  # a fresh object: permissions are cached per instance


@pytest.fixture
def staff_user(django_user_model):
    """Staff who manage jobs: they may view and cancel everyone's."""
    staff = django_user_model.objects.create_user("carol", password="carol-password", is_staff=True)
    return grant(staff, "view_extractjob", "change_extractjob")


class Client(APIClient):
    """APIClient whose streamed responses (results, downloads) also answer
    .json(), as the whole body read back."""

    def request(self, *args, **kwargs):
        response = super().request(*args, **kwargs)
        if response.streaming:
            body = b"".join(response.streaming_content)
            response.streaming_content = [body]
            response.json = lambda: json.loads(body)
        return response


def token_client(user) -> APIClient:
    client = Client()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


@pytest.fixture
def api(user):
    return token_client(user)


@pytest.fixture
def other_api(other_user):
    return token_client(other_user)


@pytest.fixture
def staff_api(staff_user):
    return token_client(staff_user)
