"""Structured logs and the health endpoint."""

import json
import logging
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.events import JsonFormatter
from jobs.models import Heartbeat, Property
from jobs.services import lifecycle, recovery
from tests.factories import make_job, run_job, simple_rows

pytestmark = pytest.mark.django_db


def event_lines(caplog) -> list[dict]:
    formatter = JsonFormatter()
    return [
        json.loads(formatter.format(record))
        for record in caplog.records
        if record.name == "stringsight.events"
    ]


def test_each_job_and_row_event_is_one_json_line_with_the_job_id(user, sim, caplog):
    rows = simple_rows(3)
    rows[1]["prompt"] += " [[sim:bad_json]]"
    with caplog.at_level(logging.INFO, logger="stringsight.events"):
        job = make_job(user, rows)
        run_job(job.id, base_url=sim.base_url)

    events = event_lines(caplog)

    names = [event["event"] for event in events]
    # Rows finish in any order; the job's own events frame them.
    assert (names[0], names[1], names[-1]) == ("job_started", "job_running", "job_done")
    assert sorted(names[2:-1]) == ["row_done", "row_done", "row_failed"]
    assert {event["job_id"] for event in events} == {str(job.id)}
    failed = next(event for event in events if event["event"] == "row_failed")
    assert (failed["row_index"], failed["attempts"]) == (1, 2)  # asked twice
    assert failed["error"].startswith("no valid property in the LLM answer")
    done = next(event for event in events if event["event"] == "row_done")
    assert done["properties"] == Property.objects.filter(job=job, row_index=done["row_index"]).count()
    assert {"ts", "level", "logger"} <= set(done)


def test_a_cancel_is_logged_with_the_properties_it_keeps(user, caplog):
    job = make_job(user)
    with caplog.at_level(logging.INFO, logger="stringsight.events"):
        lifecycle.job_cancel(job=job)

    assert event_lines(caplog)[-1] | {"ts": None} == {
        "ts": None,
        "level": "info",
        "logger": "stringsight.events",
        "event": "job_cancelled",
        "job_id": str(job.id),
        "properties_count": 0,
    }


def test_health_reports_the_database_and_the_workers_last_sweep(client):
    never = client.get("/healthz")
    recovery.sweep()
    fresh = client.get("/healthz", {"require_worker": "1"})
    Heartbeat.objects.filter(name="sweep").update(at=timezone.now() - timedelta(minutes=10))
    stale = client.get("/healthz", {"require_worker": "1"})

    assert (never.status_code, never.json()["status"], never.json()["worker"]) == (
        200,
        "degraded",
        {"heartbeat_age_seconds": None, "ok": False},
    )
    assert (fresh.status_code, fresh.json()["status"], fresh.json()["database"]) == (200, "ok", "ok")
    assert fresh.json()["worker"]["heartbeat_age_seconds"] < 30  # just swept (stale is a minute)
    assert (stale.status_code, stale.json()["status"]) == (503, "degraded")
