"""A start body's memory is bounded by the limits, not by the body: values
and rows are counted before the body becomes Python objects (issue 19)."""

import io

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.exceptions import ParseError, ValidationError

from jobs.api.parsers import LimitedJSONParser, count_values, value_bound
from jobs.models import ExtractJob
from tests.fixtures_web import memory_of, reset_peak_memory

MB = 1024 * 1024


def empty_rows_body(size: int) -> bytes:
    """`{"rows": [{}, {}, …]}` of about `size` bytes: the cheapest text for
    the most Python objects."""
    count = size // 3
    return b'{"rows": [' + b",".join([b"{}"] * count) + b"]}"


def parse(body: bytes):
    return LimitedJSONParser().parse(io.BytesIO(body))


def test_the_value_bound_is_never_below_the_values():
    body = b'{"rows": [{"prompt": "a, b", "x": [1, [2, {}], "]"]}, 3], "k": {"a": []}}'
    values, rows = count_values(body, value_limit=100, row_limit=100)

    assert (values, rows) == (13, 2)
    assert value_bound(body) >= values


@pytest.mark.django_db
def test_a_dense_body_is_refused_at_the_row_limit_without_being_built(api, settings):
    settings.STRINGSIGHT_MAX_JSON_VALUES = 10_000
    settings.STRINGSIGHT_MAX_ROWS = 50

    response = api.generic(
        "POST", "/extract/jobs/start", empty_rows_body(60_000), content_type="application/json"
    )

    assert response.status_code == 400
    assert response.json() == {
        "detail": "rows: more than 50 rows, the limit per job (STRINGSIGHT_MAX_ROWS)",
        "code": "invalid",
        "field": "rows",
        "errors": {"rows": ["more than 50 rows, the limit per job (STRINGSIGHT_MAX_ROWS)"]},
    }
    assert ExtractJob.objects.count() == 0


@pytest.mark.django_db
def test_a_dense_row_is_refused_at_the_value_limit(api, settings):
    settings.STRINGSIGHT_MAX_JSON_VALUES = 10_000
    dense = b",".join([b"{}"] * 20_000)
    body = b'{"rows": [{"prompt": "p", "model": "m", "model_response": "r", "x": [' + dense + b"]}]}"

    response = api.generic("POST", "/extract/jobs/start", body, content_type="application/json")

    assert response.status_code == 400
    assert response.json()["detail"] == (
        "JSON parse error - more than 10000 values, the limit (STRINGSIGHT_MAX_JSON_VALUES)"
    )


def test_a_body_under_the_value_limit_by_count_but_not_by_bound_is_read(settings):
    # Commas in text make the bound overestimate: such a body is counted
    # exactly, then read as usual.
    settings.STRINGSIGHT_MAX_JSON_VALUES = 1_000
    text = "one, two, three, " * 400
    body = ('{"rows": [{"prompt": "' + text + '", "model": "m", "model_response": "r"}]}').encode()

    assert value_bound(body) > 1_000
    assert parse(body)["rows"][0]["prompt"] == text


def test_a_dense_body_with_a_number_too_large_to_walk_is_refused_by_its_bound(settings):
    settings.STRINGSIGHT_MAX_JSON_VALUES = 1_000
    body = b'{"rows": [' + b",".join([b"{}"] * 600) + b', {"score": 123456789012345678901234567890}]}'

    with pytest.raises(ParseError) as refused:
        parse(body)

    assert str(refused.value.detail) == (
        "JSON parse error - the body may hold up to 1204 values, more than the limit of 1000 "
        "(STRINGSIGHT_MAX_JSON_VALUES)"
    )


def test_a_dense_body_that_is_not_json_says_where(settings):
    settings.STRINGSIGHT_MAX_JSON_VALUES = 1_000

    with pytest.raises(ParseError) as refused:
        parse(b'{"rows": [' + b",".join([b"{}"] * 600) + b", NaN]}")

    assert str(refused.value.detail) == "JSON parse error - lexical error: invalid char in json text."


def test_the_default_value_limit_admits_real_transcripts_at_the_body_limit(settings, airline_rows):
    from bench.rows import start_body

    body = start_body(airline_rows * 10)
    per_byte = value_bound(body) / len(body)

    assert settings.STRINGSIGHT_MAX_REQUEST_BYTES == 128 * MB
    assert per_byte * settings.STRINGSIGHT_MAX_REQUEST_BYTES <= settings.STRINGSIGHT_MAX_JSON_VALUES
    assert len(parse(body)["rows"]) == 1000


def test_the_hostile_body_is_refused_naming_the_row_limit_with_the_defaults():
    with pytest.raises(ValidationError) as refused:
        parse(empty_rows_body(20 * MB))

    assert refused.value.detail == {
        "rows": ["more than 50000 rows, the limit per job (STRINGSIGHT_MAX_ROWS)"]
    }


@pytest.mark.e2e
def test_a_20_mb_body_of_empty_rows_costs_the_web_process_little_and_briefly(web_server, user):
    # Parsed into objects, each `{}` of this body would cost Python many
    # times its two bytes, kept after the answer; it is refused while its
    # rows are counted instead (#10 in BENCHMARKS.md).
    server = web_server("--workers", "1")
    token = Token.objects.create(user=user).key
    (pid,) = server.worker_pids()
    warm = server.post_json(
        "/extract/jobs/start", {"rows": [{"prompt": "p", "model": "m", "model_response": "r"}]}, token
    )
    assert warm[0] == 201
    reset_peak_memory(pid)
    before = memory_of(pid)["VmRSS"]

    status, _, body = server.post_json("/extract/jobs/start", empty_rows_body(20 * MB), token)
    after = memory_of(pid)

    assert (status, body["detail"]) == (
        400,
        "rows: more than 50000 rows, the limit per job (STRINGSIGHT_MAX_ROWS)",
    )
    assert after["VmHWM"] - before < 150 * MB, (after["VmHWM"] - before) / MB
    assert after["VmRSS"] - before < 50 * MB, (after["VmRSS"] - before) / MB
    assert ExtractJob.objects.count() == 1
