"""The start throttle is one conditional UPDATE in the database: the rate
holds under parallel starts across web processes, and anonymous callers are
told apart by their connection, not by a header they choose (issue 19)."""

import threading

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from jobs.models import ExtractJob, ThrottleBucket
from jobs.services import throttle
from tests.factories import simple_rows

pytestmark = pytest.mark.django_db

HOUR = throttle.Rate(count=5, seconds=3600)


def rate(settings, value: str) -> None:
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"job_start": value}}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("120/min", (120, 60)),
        ("5/h", (5, 3600)),
        ("10/15min", (10, 900)),
        ("1/s", (1, 1)),
        ("3/day", (3, 86400)),
    ],
)
def test_a_rate_reads_a_count_over_a_period(text, expected):
    parsed = throttle.Rate.parse(text)
    assert (parsed.count, parsed.seconds) == expected


@pytest.mark.parametrize("text", ["", "5", "x/min", "0/min", "5/fortnight", "5/0min"])
def test_a_malformed_rate_is_refused(text):
    with pytest.raises(ValueError, match="is not a rate such as 120/min"):
        throttle.Rate.parse(text)


def test_a_burst_of_the_count_passes_then_one_per_interval():
    taken = [throttle.throttle_take(scope="s", ident="i", rate=HOUR, now=1000.0) for _ in range(7)]

    assert taken[:5] == [None] * 5
    assert taken[5:] == [720.0, 720.0]  # an hour's allowance of 5 frees one every 12 minutes
    assert throttle.throttle_take(scope="s", ident="i", rate=HOUR, now=1719.0) == 1.0
    assert throttle.throttle_take(scope="s", ident="i", rate=HOUR, now=1720.0) is None
    assert throttle.throttle_take(scope="s", ident="i", rate=HOUR, now=1720.0) == 720.0


def test_callers_and_scopes_have_allowances_of_their_own():
    one = throttle.Rate(count=1, seconds=60)

    assert throttle.throttle_take(scope="a", ident="x", rate=one, now=0.0) is None
    assert throttle.throttle_take(scope="a", ident="y", rate=one, now=0.0) is None
    assert throttle.throttle_take(scope="b", ident="x", rate=one, now=0.0) is None
    assert throttle.throttle_take(scope="a", ident="x", rate=one, now=0.0) == 60.0


def test_waiting_reads_the_allowance_without_taking_from_it():
    one = throttle.Rate(count=1, seconds=60)

    assert throttle.throttle_wait(scope="s", ident="i", rate=one, now=0.0) is None
    assert throttle.throttle_take(scope="s", ident="i", rate=one, now=0.0) is None
    assert throttle.throttle_wait(scope="s", ident="i", rate=one, now=30.0) == 30.0
    assert throttle.throttle_wait(scope="s", ident="i", rate=one, now=30.0) == 30.0
    assert throttle.throttle_wait(scope="s", ident="i", rate=one, now=60.0) is None


def test_a_429_says_when_to_come_back(api, settings):
    rate(settings, "2/h")

    answers = [api.post("/extract/jobs/start", {"rows": simple_rows(1)}, format="json") for _ in range(3)]

    assert [answer.status_code for answer in answers] == [201, 201, 429]
    assert answers[2].json() == {
        "detail": "Request was throttled. Expected available in 1800 seconds.",
        "code": "throttled",
    }
    assert 1799 <= int(answers[2].headers["Retry-After"]) <= 1800


def test_anonymous_callers_are_keyed_on_their_connection_not_x_forwarded_for(settings):
    settings.STRINGSIGHT_ALLOW_ANONYMOUS = True
    rate(settings, "3/h")
    client = APIClient()

    answers = [
        client.post(
            "/extract/jobs/start",
            {"rows": simple_rows(1)},
            format="json",
            HTTP_X_FORWARDED_FOR=f"203.0.113.{number}",
        ).status_code
        for number in range(8)
    ]

    assert answers == [201, 201, 201, 429, 429, 429, 429, 429]
    assert list(ThrottleBucket.objects.values_list("ident", flat=True)) == ["address:127.0.0.1"]


def test_behind_a_trusted_proxy_the_address_it_saw_is_the_key(settings):
    settings.STRINGSIGHT_ALLOW_ANONYMOUS = True
    settings.STRINGSIGHT_TRUSTED_PROXIES = 1
    rate(settings, "1/h")
    client = APIClient()

    def start(forwarded_for: str) -> int:
        return client.post(
            "/extract/jobs/start", {"rows": simple_rows(1)}, format="json", HTTP_X_FORWARDED_FOR=forwarded_for
        ).status_code

    # The proxy appends the address it was reached from; what is to its left is the client's say.
    assert start("198.51.100.7") == 201
    assert start("10.9.9.9, 198.51.100.7") == 429
    assert start("198.51.100.8") == 201
    assert start("") == 201  # not through the proxy: the connection's own address
    assert set(ThrottleBucket.objects.values_list("ident", flat=True)) == {
        "address:198.51.100.7",
        "address:198.51.100.8",
        "address:127.0.0.1",
    }


def test_an_address_longer_than_any_is_cut_to_fit_its_bucket(settings):
    # With more proxies configured than there are, the hop taken is the
    # client's say: as long as a header allows, past the bucket's column
    # (a 500 on PostgreSQL).
    settings.STRINGSIGHT_ALLOW_ANONYMOUS = True
    settings.STRINGSIGHT_TRUSTED_PROXIES = 2
    rate(settings, "1/h")
    client = APIClient()

    def start() -> int:
        return client.post(
            "/extract/jobs/start",
            {"rows": simple_rows(1)},
            format="json",
            HTTP_X_FORWARDED_FOR="x" * 1000 + ", 198.51.100.7",
        ).status_code

    assert [start(), start()] == [201, 429]
    assert list(ThrottleBucket.objects.values_list("ident", flat=True)) == ["address:" + "x" * 100]


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_the_rate_holds_under_40_parallel_starts_across_two_web_processes(web_server, user):
    servers = [web_server(STRINGSIGHT_START_RATE="5/h") for _ in range(2)]
    token = Token.objects.create(user=user).key
    barrier = threading.Barrier(40)
    answers: list[tuple[int, dict]] = []

    def start(number: int) -> None:
        barrier.wait(timeout=60)
        status, headers, _ = servers[number % 2].post_json(
            "/extract/jobs/start", {"rows": simple_rows(1, marker=str(number))}, token
        )
        answers.append((status, headers))

    threads = [threading.Thread(target=start, args=(number,)) for number in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    statuses = sorted(status for status, _ in answers)
    assert statuses == [201] * 5 + [429] * 35
    waits = sorted(int(headers["Retry-After"]) for status, headers in answers if status == 429)
    assert 0 < waits[0] <= waits[-1] <= 3600, waits
    assert ExtractJob.objects.filter(owner=user).count() == 5
