"""Batch mode as callers see it (issue 18): the `mode` start parameter on
every interface, the batch price, both modes' cost in the estimate, and a
job's provider batches in its status, the CLI and the admin. The batches
themselves are made here as the batch mode's worker records them; sending
and importing them is tested with the worker."""

import io
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.management.commands import extract
from jobs.models import ExtractJob, JobMode, ProviderBatch
from jobs.services import budgets, lifecycle, options
from jobs.services.errors import InvalidInput
from stringsight_site.settings import envprices
from tests.factories import job_params, make_job, provider_batch, simple_rows

pytestmark = pytest.mark.django_db

START_PATHS = ["/api/jobs/", "/extract/jobs/start"]
ESTIMATE_PATHS = ["/api/jobs/estimate/", "/extract/jobs/estimate"]
ONLINE_STATUS = {"mode": "online", "provider_batches": [], "pending_provider_results": False}


def start(client, path="/api/jobs/", **body):
    return client.post(path, {"rows": simple_rows(2), **body}, format="json")


def batch_job(owner, **params) -> ExtractJob:
    return make_job(owner, mode=JobMode.BATCH, **params)


def status_fields(body: dict) -> dict:
    return {field: body[field] for field in ONLINE_STATUS}


def test_the_batch_price_is_half_the_list_price(settings):
    assert budgets.price_for("gpt-4o-mini") == (0.15, 0.60)
    assert budgets.price_for("gpt-4o-mini", "online") == (0.15, 0.60)
    assert budgets.price_for("gpt-4o-mini", "batch") == (0.075, 0.30)
    assert budgets.price_for("gpt-4o", "batch") == (1.25, 5.00)
    assert budgets.price_for("my-local-model", "batch") is None
    with pytest.raises(ValueError, match="no price for mode 'later'"):
        budgets.price_for("gpt-4o", "later")


def test_a_price_table_entry_may_give_its_own_batch_price(settings):
    settings.STRINGSIGHT_PRICES = {
        "own": (1.0, 4.0, 0.3, 1.2),
        "output-only": (1.0, 4.0, None, 1.0),
        "listed": (1.0, 4.0),
    }

    assert budgets.price_for("own", "batch") == (0.3, 1.2)
    assert budgets.price_for("own") == (1.0, 4.0)
    assert budgets.price_for("output-only", "batch") == (0.5, 1.0)
    assert budgets.price_for("listed", "batch") == (0.5, 2.0)


def test_stringsight_prices_takes_batch_prices_as_a_list_or_by_name(monkeypatch):
    monkeypatch.setenv(
        "STRINGSIGHT_PRICES",
        '{"a": [1, 4], "b": [1, 4, 0.3, 1.2], "c": {"input": 1, "output": 4, "batch_output": 1.5},'
        ' "d": {"input": 2, "output": 8}}',
    )

    assert envprices("STRINGSIGHT_PRICES") == {
        "a": (1.0, 4.0),
        "b": (1.0, 4.0, 0.3, 1.2),
        "c": (1.0, 4.0, None, 1.5),
        "d": (2.0, 8.0),
    }


@pytest.mark.parametrize(
    "value",
    ['{"a": [1]}', '{"a": [1, 2, 3]}', '{"a": {"input": 1}}', '{"a": {"input": 1, "output": 2, "batch": 1}}'],
)
def test_stringsight_prices_refuses_a_malformed_entry(monkeypatch, value):
    monkeypatch.setenv("STRINGSIGHT_PRICES", value)

    with pytest.raises(ImproperlyConfigured, match="STRINGSIGHT_PRICES must be JSON mapping each model"):
        envprices("STRINGSIGHT_PRICES")


def test_the_start_estimate_is_at_the_modes_price():
    texts = ['{"prompt": "p", "model": "m", "model_response": "r"}'] * 3

    online = budgets.estimate_cost(job_params(model_name="gpt-4o-mini", max_tokens=100), texts)
    batch = budgets.estimate_cost(job_params(model_name="gpt-4o-mini", max_tokens=100, mode="batch"), texts)

    assert batch == pytest.approx(online / 2)
    assert budgets.estimate_cost(job_params(mode="batch"), texts) is None  # sim-model has no price


def run_jobs(*arguments: str) -> str:
    out = io.StringIO()
    call_command("jobs", *arguments, stdout=out)
    return out.getvalue()


def write_rows(path, count: int = 2):
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in simple_rows(count)))
    return path


JOBS_URL = "/admin/jobs/extractjob/"
