"""Never lose work: real qcluster processes killed with SIGKILL, two clusters
on one database, the Redis broker, and a 1,000-row job on SQLite."""

import hashlib
import os

import pytest
import redis
from django_q.conf import Conf
from django_q.models import Task

from extraction.render import render_row
from jobs import services
from jobs.models import ExtractRow, Property
from tests.factories import simple_rows
from tests.test_e2e import status, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

REDIS_URL = os.environ.get("STRINGSIGHT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
on_postgres = pytest.mark.skipif(
    "sqlite" in os.environ.get("DATABASE_URL", "sqlite"),
    reason="several clusters share one PostgreSQL database",
)


def unique_rows(airline_rows: list[dict], copies: int) -> list[dict]:
    """The demo rows `copies` times over, each copy's prompt made unique."""
    rows = []
    for copy in range(copies):
        for row in airline_rows:
            rows.append({**row, "prompt": f"{row['prompt']} (copy {copy})"})
    return rows


def sha_of(row_data: dict) -> str:
    return hashlib.sha256(render_row(row_data, "single_model").encode()).hexdigest()


def start_job(api, rows, **params) -> str:
    response = api.post("/extract/jobs/start", {"rows": rows, **params}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()["job_id"]


def wait_until_finished(api, job_id, timeout) -> dict:
    return wait_for(
        lambda: (body := status(api, job_id))["state"] not in ("queued", "running") and body, timeout
    )


def assert_every_row_stored_once(job_id, total: int) -> None:
    """Every row finished, and only done rows hold properties, each once (a
    row's properties are unique by position)."""
    rows = list(ExtractRow.objects.filter(job_id=job_id))
    assert {row.status for row in rows} <= {"done", "failed"}
    assert len(rows) == total
    properties = Property.objects.filter(job_id=job_id)
    assert properties.count() == sum(row.properties.count() for row in rows)
    assert not properties.exclude(row__status="done").exists()


def test_a_worker_killed_mid_job_is_recovered_without_duplicates(api, start_worker, sim, airline_rows):
    sim.configure(latency_ms=300, jitter_ms=100)
    first = start_worker("first", STRINGSIGHT_LEASE_SECONDS="3")
    job_id = start_job(api, airline_rows[:60], max_workers=6)
    wait_for(lambda: status(api, job_id)["count_done"] >= 10, timeout=60)

    first.kill()
    done_before = list(ExtractRow.objects.filter(job_id=job_id, status="done").values_list("data", flat=True))
    in_flight = ExtractRow.objects.filter(job_id=job_id, status="running").count()
    services.ensure_sweep_schedule()  # due now: the new cluster's scheduler runs it on its first tick
    start_worker("second", STRINGSIGHT_LEASE_SECONDS="3")
    final = wait_until_finished(api, job_id, timeout=120)

    assert (final["state"], final["count_done"] + final["count_failed"]) == ("done", 60)
    assert in_flight > 0
    assert_every_row_stored_once(job_id, 60)
    sent = [request["user_sha256"] for request in sim.requests()]
    assert [sent.count(sha_of(data)) for data in done_before] == [1] * len(done_before)
    assert final["properties_count"] == Property.objects.filter(job_id=job_id).count()


@on_postgres
def test_two_clusters_share_one_job_without_extracting_a_row_twice(
    api, start_worker, sim, airline_rows, settings
):
    settings.STRINGSIGHT_CHUNK_SIZE = 20
    sim.configure(latency_ms=150, jitter_ms=50)
    # One worker process each: a cluster holds up to its workers + 2 tasks
    # (3 here), so the job's 10 tasks cannot all go to whichever polls first.
    for name in ("alpha", "beta"):
        start_worker(name, Q_WORKERS="1", STRINGSIGHT_CHUNK_SIZE="20")
    job_id = start_job(api, unique_rows(airline_rows, 2), max_workers=16)

    final = wait_until_finished(api, job_id, timeout=120)

    assert (final["state"], final["count_done"]) == ("done", 200)
    assert_every_row_stored_once(job_id, 200)
    sent = [request["user_sha256"] for request in sim.requests()]
    assert len(sent) == len(set(sent)) == 200  # no row was sent to the LLM twice
    workers = {claimed.split(":")[0] for claimed in ExtractRow.objects.values_list("claimed_by", flat=True)}
    assert workers == {"alpha", "beta"}


@on_postgres
def test_a_cluster_started_while_a_job_runs_takes_part_in_it(api, start_worker, sim, airline_rows, settings):
    settings.STRINGSIGHT_CHUNK_SIZE = 20
    sim.configure(latency_ms=200, jitter_ms=50)
    start_worker("early", Q_WORKERS="2", STRINGSIGHT_CHUNK_SIZE="20")
    job_id = start_job(api, airline_rows[:100] + unique_rows(airline_rows[:20], 1), max_workers=8)
    wait_for(lambda: status(api, job_id)["count_done"] >= 10, timeout=60)

    # The job has 6 tasks; with django-q2's default queue_limit (workers
    # squared) the early cluster would have taken all of them ahead.
    start_worker("late", Q_WORKERS="2", STRINGSIGHT_CHUNK_SIZE="20")
    final = wait_until_finished(api, job_id, timeout=120)

    assert (final["state"], final["count_done"]) == ("done", 120)
    assert_every_row_stored_once(job_id, 120)
    workers = {claimed.split(":")[0] for claimed in ExtractRow.objects.values_list("claimed_by", flat=True)}
    assert workers == {"early", "late"}


@pytest.fixture
def redis_broker(monkeypatch):
    """This process enqueues to Redis too, as a web server configured with
    Q_REDIS_URL would."""
    client = redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    client.flushdb()
    monkeypatch.setattr(Conf, "ORM", None)
    monkeypatch.setattr(Conf, "REDIS", REDIS_URL)
    yield client
    client.flushdb()


@on_postgres
def test_with_the_redis_broker_a_task_lost_with_a_dead_worker_is_recovered(
    api, start_worker, sim, airline_rows, redis_broker
):
    sim.configure(latency_ms=300, jitter_ms=100)
    overrides = {"Q_REDIS_URL": REDIS_URL, "STRINGSIGHT_LEASE_SECONDS": "3"}
    alpha = start_worker("alpha", **overrides)
    job_id = start_job(api, airline_rows[:40], max_workers=4)
    wait_for(lambda: status(api, job_id)["count_done"] >= 5, timeout=60)
    assert redis_broker.llen(f"django_q:{Conf.CLUSTER_NAME}:q") == 0  # alpha took the only task

    alpha.kill()
    done_before = list(ExtractRow.objects.filter(job_id=job_id, status="done").values_list("data", flat=True))
    services.ensure_sweep_schedule()
    start_worker("beta", **overrides)
    final = wait_until_finished(api, job_id, timeout=120)

    assert (final["state"], final["count_done"] + final["count_failed"]) == ("done", 40)
    assert_every_row_stored_once(job_id, 40)
    sent = [request["user_sha256"] for request in sim.requests()]
    assert [sent.count(sha_of(data)) for data in done_before] == [1] * len(done_before)
    workers = {claimed.split(":")[0] for claimed in ExtractRow.objects.values_list("claimed_by", flat=True)}
    assert workers == {"alpha", "beta"}


def test_a_thousand_row_job_runs_without_database_lock_errors(api, qcluster, sim):
    job_id = start_job(api, simple_rows(1000), max_workers=16)

    final = wait_until_finished(api, job_id, timeout=180)

    assert (final["state"], final["count_done"]) == ("done", 1000)
    assert "database is locked" not in qcluster.log_path.read_text()
    assert not Task.objects.filter(success=False).exists()
