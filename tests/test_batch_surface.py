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


@pytest.mark.parametrize("path", START_PATHS)
def test_start_takes_mode_batch_on_both_paths(api, path):
    response = start(api, path, mode="batch")

    assert response.status_code == 201
    assert status_fields(response.json()) == {
        "mode": "batch",
        "provider_batches": [],
        "pending_provider_results": False,
    }
    assert ExtractJob.objects.get(pk=response.json()["job_id"]).mode == "batch"


@pytest.mark.parametrize("path", START_PATHS)
@pytest.mark.parametrize("body", [{}, {"mode": None}, {"mode": "online"}])
def test_a_start_without_batch_mode_is_online(api, path, body):
    response = start(api, path, **body)

    assert response.status_code == 201
    assert status_fields(response.json()) == ONLINE_STATUS
    assert ExtractJob.objects.get(pk=response.json()["job_id"]).mode == "online"


@pytest.mark.parametrize("path", START_PATHS + ESTIMATE_PATHS)
@pytest.mark.parametrize(("mode", "shown"), [("fast", "fast"), ("BATCH", "BATCH"), (5, "5"), ("", "")])
def test_a_bad_mode_is_a_400_naming_mode(api, path, mode, shown):
    response = start(api, path, mode=mode)

    assert response.status_code == 400
    assert response.json() == {
        "detail": f"mode: '{shown}' is not a mode; use one of online, batch",
        "code": "invalid",
        "field": "mode",
        "errors": {"mode": [f"'{shown}' is not a mode; use one of online, batch"]},
    }
    assert ExtractJob.objects.count() == 0


def test_the_start_rules_refuse_a_bad_mode_for_every_interface():
    with pytest.raises(InvalidInput) as refused:
        options.accept_start(options.StartRequest(rows=simple_rows(1), mode="later"))

    assert (refused.value.field, refused.value.detail) == (
        "mode",
        "mode: 'later' is not a mode; use one of online, batch",
    )
    accepted = options.accept_start(options.StartRequest(rows=simple_rows(1), mode="batch"))
    assert accepted.params.mode == "batch"
    assert options.accept_start(options.StartRequest(rows=simple_rows(1))).params.mode == "online"


def test_extract_single_refuses_batch_mode_naming_it(api):
    row = {"prompt": "What is 2+2?", "model": "demo", "model_response": "4"}

    response = api.post("/extract/single", {"row": row, "mode": "batch"}, format="json")

    assert response.status_code == 400
    assert response.json()["field"] == "mode"
    assert response.json()["detail"] == (
        "mode: /extract/single answers within the request, so it runs online only; "
        "start a job (POST /api/jobs/) for batch mode"
    )
    assert ExtractJob.objects.count() == 0


def test_extract_single_takes_online_mode():
    request = options.StartRequest(rows=[simple_rows(1)[0]], mode="online")

    assert options.accept_single_row(request).params.mode == "online"


def test_resume_keeps_the_jobs_mode(user):
    job = lifecycle.job_cancel(job=batch_job(user)).job

    resumed = lifecycle.job_resume(job=job)

    assert (resumed.state, resumed.mode) == ("queued", "batch")


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


def test_the_daily_budget_is_kept_at_the_modes_price(api, settings):
    body = {"rows": simple_rows(1), "model_name": "gpt-4o-mini", "max_tokens": 1000}
    accepted = {
        mode: options.accept_start(options.StartRequest(**body, mode=mode)) for mode in ("online", "batch")
    }
    online, batch = (
        budgets.estimate_cost(accepted[mode].params, accepted[mode].encoded_rows)
        for mode in ("online", "batch")
    )
    settings.STRINGSIGHT_USER_DAILY_BUDGET_USD = (online + batch) / 2

    refused = api.post("/api/jobs/", body, format="json")
    started = api.post("/api/jobs/", {**body, "mode": "batch"}, format="json")

    assert refused.status_code == 429
    assert refused.json()["code"] == "daily_budget_exceeded"
    assert started.status_code == 201
    assert ExtractJob.objects.get().estimated_cost_usd == pytest.approx(batch)


@pytest.mark.parametrize("path", ESTIMATE_PATHS)
@pytest.mark.parametrize("mode", ["online", "batch"])
def test_an_estimate_gives_both_modes_cost(api, path, mode):
    body = {"rows": simple_rows(3), "model_name": "gpt-4o-mini", "max_tokens": 1000, "mode": mode}

    answer = api.post(path, body, format="json").json()

    prompt = answer["prompt_tokens"]

    def cost(price_input, price_output):
        return {
            "low": round(prompt * price_input / 1e6, 6),
            "expected": None,
            "high": round((prompt * price_input + 3000 * price_output) / 1e6, 6),
        }

    assert answer["cost_usd_by_mode"] == {"online": cost(0.15, 0.60), "batch": cost(0.075, 0.30)}
    assert answer["mode"] == mode
    assert answer["cost_usd"] == answer["cost_usd_by_mode"][mode]
    assert answer["duration_s"] == {"expected": None}
    assert ExtractJob.objects.count() == 0


def test_a_batch_estimate_has_no_duration_and_no_price_means_no_cost(api, user, settings):
    settings.STRINGSIGHT_ALLOWED_MODELS = ["*"]
    now = timezone.now()
    # A done row of each mode: an online call's latency to go by, and a
    # batch's hour in the provider's window, which is no call's latency.
    for job, took in (
        (make_job(user, model_name="sim-model"), 2),
        (batch_job(user, model_name="sim-model"), 3600),
    ):
        lifecycle.job_mark_running(job_id=job.id)
        job.rows.filter(index=0).update(
            status="done", started_at=now - timedelta(seconds=took), finished_at=now
        )
    body = {"rows": simple_rows(2), "model_name": "sim-model"}

    answers = {
        mode: api.post("/api/jobs/estimate/", {**body, "mode": mode}, format="json").json()
        for mode in ("online", "batch")
    }

    assert answers["online"]["duration_s"]["expected"] == 2.0
    assert answers["batch"]["duration_s"] == {"expected": None}
    nothing = {"low": None, "expected": None, "high": None}
    assert answers["batch"]["cost_usd_by_mode"] == {"online": nothing, "batch": nothing}


def test_an_online_jobs_status_says_so_on_every_path(api, user):
    job = make_job(user)

    bodies = [
        api.get(f"/api/jobs/{job.id}/").json(),
        api.get("/extract/jobs/status", {"job_id": str(job.id)}).json(),
        api.get("/api/jobs/").json()["results"][0],
    ]

    assert [status_fields(body) for body in bodies] == [ONLINE_STATUS] * 3


def test_a_batch_jobs_status_lists_its_provider_batches_oldest_first(api, user):
    job = batch_job(user, rows=simple_rows(5))
    now = timezone.now()
    provider_batch(
        job,
        batch_id="batch_2",
        attempt=2,
        provider_status="in_progress",
        request_counts={"total": 2, "completed": 1, "failed": 0},
        created_at=now - timedelta(minutes=1),
    )
    provider_batch(
        job,
        batch_id="batch_1",
        state="imported",
        provider_status="completed",
        request_counts={"total": 5, "completed": 3, "failed": 2},
        created_at=now - timedelta(minutes=5),
    )
    # Not created at the provider yet: nothing to show there.
    provider_batch(job, state="uploaded", input_file_id="file-3", created_at=now)

    bodies = [
        api.get(f"/api/jobs/{job.id}/").json(),
        api.get("/extract/jobs/status", {"job_id": str(job.id)}).json(),
        api.get("/api/jobs/").json()["results"][0],
    ]

    expected = {
        "mode": "batch",
        "provider_batches": [
            {
                "id": "batch_1",
                "status": "completed",
                "request_counts": {"total": 5, "completed": 3, "failed": 2},
            },
            {
                "id": "batch_2",
                "status": "in_progress",
                "request_counts": {"total": 2, "completed": 1, "failed": 0},
            },
        ],
        "pending_provider_results": True,
    }
    assert [status_fields(body) for body in bodies] == [expected] * 3


@pytest.mark.parametrize(
    ("state", "pending"), [("submitted", True), ("imported", False), ("abandoned", False)]
)
def test_pending_provider_results_until_every_batch_is_imported(api, user, state, pending):
    job = batch_job(user)
    provider_batch(job, batch_id="batch_done", state="imported", provider_status="completed")
    provider_batch(job, batch_id="batch_last", state=state, provider_status="cancelled")

    body = api.get(f"/api/jobs/{job.id}/").json()

    assert body["pending_provider_results"] is pending


def test_a_batch_that_has_not_reported_counts_shows_zeros(api, user):
    job = batch_job(user)
    provider_batch(job, batch_id="batch_new", provider_status="")

    body = api.get(f"/api/jobs/{job.id}/").json()

    assert body["provider_batches"] == [
        {"id": "batch_new", "status": "", "request_counts": {"total": 0, "completed": 0, "failed": 0}}
    ]


def test_the_cancel_answer_keeps_its_shape_for_a_batch_job(api, user):
    job = batch_job(user)
    provider_batch(job, batch_id="batch_1", provider_status="in_progress")

    cancelled = api.post("/extract/jobs/cancel", {"job_id": str(job.id)}, format="json")

    assert cancelled.status_code == 200
    assert set(cancelled.json()) == {"job_id", "state", "message", "properties_count"}
    assert cancelled.json()["state"] == "cancelled"


def test_the_job_list_filters_by_mode(api, user):
    online, batch = make_job(user), batch_job(user)

    listed = {
        mode: [job["job_id"] for job in api.get("/api/jobs/", {"mode": mode}).json()["results"]]
        for mode in ("online", "batch")
    }

    assert listed == {"online": [str(online.id)], "batch": [str(batch.id)]}
    assert api.get("/api/jobs/", {"mode": "later"}).json()["field"] == "mode"


@pytest.mark.parametrize("jobs", [2, 40])
def test_a_list_of_batch_jobs_reads_their_batches_in_one_query(api, user, django_assert_num_queries, jobs):
    from tests.test_query_counts import LIST_QUERIES

    created = [batch_job(user) if n % 2 else make_job(user) for n in range(jobs)]
    for job in created[1::2]:
        provider_batch(job, batch_id=f"batch_{job.id}", provider_status="in_progress")

    with django_assert_num_queries(LIST_QUERIES + 1):
        body = api.get("/api/jobs/", {"page_size": jobs}).json()

    batches = {job["job_id"]: [batch["id"] for batch in job["provider_batches"]] for job in body["results"]}
    assert batches == {str(job.id): [f"batch_{job.id}"] if job.mode == "batch" else [] for job in created}


def test_a_batch_jobs_status_reads_its_batches_in_one_query(api, user):
    online, batch = make_job(user), batch_job(user)
    provider_batch(batch, batch_id="batch_1")

    def queries(job) -> int:
        with CaptureQueriesContext(connection) as captured:
            assert api.get("/extract/jobs/status", {"job_id": str(job.id)}).status_code == 200
        return len(captured)

    assert queries(batch) == queries(online) + 1


def run_jobs(*arguments: str) -> str:
    out = io.StringIO()
    call_command("jobs", *arguments, stdout=out)
    return out.getvalue()


def test_jobs_show_gives_a_batch_jobs_mode_and_provider_batches(user):
    job = batch_job(user)
    now = timezone.now()
    provider_batch(
        job,
        batch_id="batch_1",
        state="imported",
        provider_status="completed",
        request_counts={"total": 3, "completed": 2, "failed": 1},
        created_at=now - timedelta(minutes=2),
    )
    provider_batch(
        job,
        batch_id="batch_2",
        attempt=2,
        provider_status="in_progress",
        request_counts={"total": 1, "completed": 0, "failed": 0},
        created_at=now,
    )

    shown = run_jobs("show", str(job.id))

    assert "  mode:        batch\n" in shown
    assert (
        "  batches:     batch_1 completed: 2 completed, 1 failed of 3\n"
        "               batch_2 in_progress: 0 completed, 0 failed of 1\n"
        "  pending:     the provider holds results not imported yet; counts may still grow\n"
    ) in shown


def test_jobs_show_gives_an_online_jobs_mode_and_no_batches(user):
    shown = run_jobs("show", str(make_job(user).id))

    assert "  mode:        online\n" in shown
    assert "batches:" not in shown
    assert "pending:" not in shown


def write_rows(path, count: int = 2):
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in simple_rows(count)))
    return path


def test_extract_starts_a_batch_job_with_mode_batch(tmp_path, user, settings):
    source = write_rows(tmp_path / "rows.jsonl")
    given = {option: None for option in extract.START_OPTIONS} | {"mode": "batch"}

    job = extract.start_job(source, None, given)

    assert (job.mode, job.count_total) == ("batch", 2)


def test_extract_refuses_an_unknown_mode_and_batch_mode_inline(tmp_path):
    source = write_rows(tmp_path / "rows.jsonl")

    with pytest.raises(CommandError) as unknown:
        call_command("extract", str(source), "--mode", "later")
    with pytest.raises(CommandError) as inline:
        call_command("extract", str(source), "--mode", "batch", "--inline")

    assert "argument --mode: invalid choice: 'later'" in str(unknown.value)
    assert str(inline.value) == "--inline runs online jobs only; a batch-mode job is run by a qcluster"
    assert ExtractJob.objects.count() == 0


@pytest.mark.parametrize(("mode", "other"), [("online", "batch"), ("batch", "online")])
def test_extract_estimate_prints_both_modes_cost(tmp_path, mode, other):
    source = write_rows(tmp_path / "rows.jsonl", 4)
    out = io.StringIO()

    call_command("extract", str(source), "--estimate", "--model", "gpt-4o-mini", "--mode", mode, stdout=out)

    lines = out.getvalue().splitlines()
    cost = next(line for line in lines if line.startswith("  cost:"))
    other_cost = next(line for line in lines if line.startswith(f"  in {other} mode:"))
    assert cost.endswith(f"({mode} mode)")
    assert other_cost.startswith(f"  in {other} mode:".ljust(22) + "$")
    if mode == "batch":
        assert "  duration:           within the provider's 24 h batch window" in lines
    assert ExtractJob.objects.count() == 0


JOBS_URL = "/admin/jobs/extractjob/"


def test_admin_job_list_shows_and_filters_the_mode(admin_client, user):
    from tests.test_admin import cells_of, listed_ids

    online, batch = make_job(user), batch_job(user)

    html = admin_client.get(JOBS_URL).content.decode()

    assert (cells_of(html, online)["mode"], cells_of(html, batch)["mode"]) == ("Online", "Batch")
    assert listed_ids(admin_client.get(JOBS_URL, {"mode__exact": "batch"})) == [str(batch.pk)]


def test_admin_job_page_lists_a_batch_jobs_provider_batches(admin_client, user):
    job = batch_job(user)
    now = timezone.now()
    provider_batch(
        job,
        batch_id="batch_abc",
        provider_status="in_progress",
        request_counts={"total": 3, "completed": 2, "failed": 1},
        created_at=now - timedelta(seconds=1),
    )
    provider_batch(job, state="uploaded", input_file_id="file-1", created_at=now)

    response = admin_client.get(f"{JOBS_URL}{job.pk}/change/")

    html = response.content.decode()
    assert response.context["provider_batches"] == [
        {
            "id": "batch_abc",
            "attempt": 1,
            "state": "submitted",
            "status": "in_progress",
            "counts": {"total": 3, "completed": 2, "failed": 1},
            "created_at": ProviderBatch.objects.get(batch_id="batch_abc").created_at,
        },
        {
            "id": "—",
            "attempt": 1,
            "state": "uploaded",
            "status": "—",
            "counts": {"total": 0, "completed": 0, "failed": 0},
            "created_at": ProviderBatch.objects.get(state="uploaded").created_at,
        },
    ]
    assert response.context["pending_provider_results"] is True
    assert 'id="job-provider-batches"' in html
    assert (
        '<td class="batch-id">batch_abc</td><td>1</td><td>in_progress</td><td>2</td><td>1</td><td>3</td>'
        in html
    )
    assert 'id="job-pending-provider-results"' in html
    assert '<div class="readonly">Batch</div>' in html


def test_admin_job_page_of_an_online_job_has_no_provider_batches(admin_client, user):
    html = admin_client.get(f"{JOBS_URL}{make_job(user).pk}/change/").content.decode()

    assert 'id="job-provider-batches"' not in html
    assert '<div class="readonly">Online</div>' in html


def test_batch_bodies_match_the_schema(api, user):
    from tests.test_schema import assert_matches

    openapi = api.get("/api/schema/", {"format": "json"}).json()
    job = batch_job(user)
    provider_batch(
        job,
        batch_id="batch_1",
        provider_status="in_progress",
        request_counts={"total": 3, "completed": 1, "failed": 0},
    )
    estimated = api.post(
        "/api/jobs/estimate/",
        {"rows": simple_rows(1), "model_name": "gpt-4o-mini", "mode": "batch"},
        format="json",
    )

    assert_matches(openapi, "JobStatus", api.get("/extract/jobs/status", {"job_id": str(job.id)}).json())
    assert_matches(openapi, "JobDetail", api.get(f"/api/jobs/{job.id}/").json())
    assert_matches(openapi, "JobPage", api.get("/api/jobs/").json())
    assert_matches(openapi, "Estimate", estimated.json())
    assert openapi["components"]["schemas"]["ModeEnum"]["enum"] == ["online", "batch"]


def test_a_batch_job_freezes_the_batch_price(user):
    online = make_job(user, model_name="gpt-4o-mini")
    batch = batch_job(user, model_name="gpt-4o-mini")

    frozen = [(job.price_input_per_mtok, job.price_output_per_mtok) for job in (online, batch)]

    assert frozen == [(0.15, 0.60), (0.075, 0.30)]
