"""The `extract` and `jobs` commands. Where the behaviour is about a process
(its exit code, Ctrl-C) `manage.py extract` runs as a real subprocess on the
test database, talking to the LLM simulator over HTTP."""

import ast
import io
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from extraction.extract import RowOutcome
from jobs import exports
from jobs.cli import ProgressLine, progress_text, read_rows
from jobs.formatting import format_cost, format_duration
from jobs.management.commands import extract
from jobs.models import ExtractJob
from jobs.services import claims, lifecycle
from tests import factories
from tests.factories import done_outcome, job_params, make_job, simple_rows
from tests.fixtures_worker import ROOT, database_url, worker_env

MOMENT = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def write_rows(path, rows) -> None:
    """Rows in the file format its extension names; chat-message lists go
    into CSV and Parquet cells as JSON text, as people store them."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps({"rows": rows}))
    else:
        frame = pd.DataFrame(
            [
                {
                    column: json.dumps(value) if isinstance(value, list) else value
                    for column, value in row.items()
                }
                for row in rows
            ]
        )
        if path.suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)


def plain(record: dict) -> dict:
    return {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in record.items()}


def written_properties(path) -> list[dict]:
    frame = factories.read_export(path.read_bytes(), path.suffix.removeprefix("."))
    return [plain(record) for record in frame.to_dict(orient="records")]


def stored_properties(job) -> list[dict]:
    return list(exports.property_records(job.properties.all()))


def summary(job, output) -> str:
    return (
        f"Job {job.id}: {job.state}\n"
        f"  rows:        {job.count_done} done, {job.count_failed} failed of {job.count_total}\n"
        f"  properties:  {job.properties_count}\n"
        f"  tokens:      {job.total_tokens:,}\n"
        f"  cost:        {format_cost(job.cost_usd)}\n"
        f"  output:      {output}\n"
    )


def extract_process(sim, *arguments: str) -> subprocess.Popen:
    env = worker_env(database_url(connection.settings_dict), sim.base_url)
    return subprocess.Popen(
        [sys.executable, "manage.py", "extract", *arguments],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)
    return value


@pytest.fixture
def sim_env(sim, monkeypatch):
    """The simulator as the LLM for a command run in this process."""
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sim-key")
    return sim


def run_extract(*arguments: str) -> tuple[str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    call_command("extract", *arguments, stdout=stdout, stderr=stderr)
    return stdout.getvalue(), stderr.getvalue()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("no_background_worker")
def test_extract_inline_writes_every_property_of_the_airline_rows(sim, airline_rows, tmp_path):
    rows = airline_rows[:12]
    source, output = tmp_path / "airline.jsonl", tmp_path / "out.jsonl"
    write_rows(source, rows)

    process = extract_process(sim, str(source), "--inline", "--out", str(output))
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr
    job = ExtractJob.objects.select_related("owner").get()
    assert (job.state, job.count_done, job.count_failed, job.owner.username) == ("done", 12, 0, "cli")
    assert written_properties(output) == stored_properties(job)
    assert job.properties_count == len(stored_properties(job)) > 12 * 2
    assert [row.data for row in job.rows.order_by("index")] == rows
    assert stdout == (
        f"Job {job.id}: 12 rows (single_model, model {job.model_name}), running here\n" + summary(job, output)
    )
    assert stderr.splitlines()[-1].startswith("done      [########################] 12/12 done, 0 failed")
    assert len(sim.requests()) == 12


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("no_background_worker")
@pytest.mark.parametrize(("source_name", "output_name"), [("in.json", "out.csv"), ("in.csv", "out.parquet")])
def test_extract_reads_and_writes_each_file_format(
    sim_env, user, airline_rows, tmp_path, settings, source_name, output_name
):
    rows = airline_rows[20:24]
    source, output = tmp_path / source_name, tmp_path / output_name
    write_rows(source, rows)

    stdout, _ = run_extract(
        str(source),
        *("--inline", "--out", str(output), "--user", "alice", "--method", "single_model"),
        *("--system-prompt", "agent", "--task-description", "Airline support", "--model", "gpt-4o"),
    )

    job = ExtractJob.objects.get()
    assert (job.state, job.owner, job.method, job.model_name) == ("done", user, "single_model", "gpt-4o")
    assert (job.system_prompt, job.task_description) == ("agent", "Airline support")
    assert "Airline support" in job.resolved_system_prompt
    assert [row.data for row in job.rows.order_by("index")] == rows
    assert written_properties(output) == stored_properties(job)
    assert stdout.endswith(summary(job, output))


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("no_background_worker")
def test_extract_default_output_is_next_to_the_parquet_input(
    sim_env, django_user_model, airline_rows, tmp_path
):
    admin = django_user_model.objects.create_superuser("admin")
    source = tmp_path / "airline.parquet"
    write_rows(source, airline_rows[30:33])

    run_extract(str(source), "--inline", "--sample-size", "2", "--max-workers", "1")

    job = ExtractJob.objects.get()
    assert (job.state, job.owner, job.max_workers) == ("done", admin, 1)
    assert (job.count_total, job.sample_size) == (2, 2)
    assert written_properties(tmp_path / "airline.properties.jsonl") == stored_properties(job)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("no_background_worker")
def test_ctrl_c_cancels_the_job_and_keeps_what_was_extracted(sim, airline_rows, tmp_path):
    # Four rows answered quickly, then calls of a minute that only the
    # cancel's abort ends: no call ends (and none starts in its place)
    # around the Ctrl-C.
    sim.configure(latency_ms=60_000)
    rows = [
        {**row, "prompt": f"{row['prompt']} [[sim:latency=300]]"} if index < 4 else row
        for index, row in enumerate(airline_rows[40:70])
    ]
    source, output = tmp_path / "airline.jsonl", tmp_path / "out.jsonl"
    write_rows(source, rows)
    process = extract_process(sim, str(source), "--inline", "--max-workers", "2", "--out", str(output))
    try:
        job = wait_for(
            lambda: sim.stats()["in_flight"] == 2 and ExtractJob.objects.filter(count_done=4).first(),
            timeout=60,
        )
        process.send_signal(signal.SIGINT)
        interrupted_at = time.time()
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()

    assert process.returncode == 130, stderr
    job.refresh_from_db()
    assert (job.state, job.count_done) == ("cancelled", 4)
    kept = written_properties(output)
    assert kept == stored_properties(job)
    assert 0 < len(kept) == job.properties_count
    assert stdout.endswith(summary(job, output) + f"Interrupted: kept {len(kept)} properties in {output}\n")
    assert f"Ctrl-C: cancelled job {job.id}; {len(kept)} properties are kept." in stderr
    requests = wait_for(
        lambda: (log := sim.requests()) and all(r["ended_at"] for r in log) and log, timeout=30
    )
    assert [r for r in requests if r["started_at"] > interrupted_at] == []
    in_flight = [r for r in requests if r["ended_at"] > interrupted_at]
    assert [r["outcome"] for r in in_flight] == ["aborted", "aborted"]
    assert max(r["ended_at"] - r["started_at"] for r in in_flight) < 30  # not their minute
    assert sorted(tmp_path.iterdir()) == [source, output]  # no partial file left behind


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("no_background_worker")
def test_extract_without_inline_says_when_no_worker_runs(worker_process, monkeypatch, tmp_path):
    worker_process.stop()  # another test may have started the session's worker
    monkeypatch.setattr(extract, "QUEUED_HINT_SECONDS", 0.2)
    source = tmp_path / "rows.jsonl"
    write_rows(source, simple_rows(2))
    stderr, failures = io.StringIO(), []

    def run():
        try:
            call_command("extract", str(source), "--poll", "0.05", stdout=io.StringIO(), stderr=stderr)
        except CommandError as exc:
            failures.append(exc)
        finally:
            connection.close()  # this thread's own connection

    command = threading.Thread(target=run)
    command.start()
    wait_for(lambda: "no worker seems to be running" in stderr.getvalue(), timeout=60)
    job = ExtractJob.objects.get()
    lifecycle.job_cancel(job=job)
    command.join(timeout=60)

    assert not command.is_alive()

    assert extract.NO_WORKER_HINT in stderr.getvalue().splitlines()
    assert [str(exc) for exc in failures] == [
        f"job {job.id} was cancelled elsewhere (the API, the admin or `jobs cancel`)"
    ]
    assert written_properties(tmp_path / "rows.properties.jsonl") == []


@pytest.mark.django_db
def test_extract_rejects_an_invalid_row_like_the_api_and_starts_nothing(django_user_model, tmp_path):
    rows = simple_rows(3)
    del rows[1]["model_response"]
    source = tmp_path / "rows.jsonl"
    write_rows(source, rows)

    with pytest.raises(CommandError) as error:
        run_extract(str(source))

    assert str(error.value) == (
        "rows[1]: missing column 'model_response' (single_model needs prompt, model, model_response; "
        "the row has prompt, model, question_id)"
    )
    assert error.value.returncode == 1
    assert ExtractJob.objects.count() == 0
    assert django_user_model.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json"])
def test_extract_refuses_an_unpaired_surrogate_escape_and_starts_nothing(tmp_path, name):
    rows = simple_rows(2)
    text = "\n".join(json.dumps(row) for row in rows) if name == "rows.jsonl" else json.dumps(rows)
    source = tmp_path / name
    source.write_text(text.replace('"Question 1:', '"Question \\udc00 1:'), encoding="utf-8")

    with pytest.raises(CommandError) as error:
        run_extract(str(source))

    kind, where = ("jsonl", "line 2: ") if name == "rows.jsonl" else ("json", "")
    assert str(error.value) == (
        f"{source}: cannot read it as {kind}: {where}a string holds an unpaired surrogate escape "
        "(such as \\ud800), which is not Unicode text"
    )
    assert ExtractJob.objects.count() == 0


@pytest.mark.django_db
def test_extract_names_the_bad_option(tmp_path):
    source = tmp_path / "rows.jsonl"
    write_rows(source, simple_rows(1))

    with pytest.raises(CommandError) as error:
        run_extract(str(source), "--max-workers", "0")

    assert str(error.value) == "Error: argument --max-workers: expected a whole number of at least 1, got 0"
    assert ExtractJob.objects.count() == 0


@pytest.mark.django_db
def test_extract_keeps_the_apis_rules(tmp_path, settings):
    source = tmp_path / "rows.jsonl"
    write_rows(source, simple_rows(1))

    with pytest.raises(CommandError) as too_many:
        run_extract(str(source), "--max-workers", str(settings.STRINGSIGHT_MAX_WORKERS + 1))
    with pytest.raises(CommandError) as not_allowed:
        run_extract(str(source), "--model", "o1-pro")

    assert str(too_many.value) == (
        f"max_workers: {settings.STRINGSIGHT_MAX_WORKERS + 1} is above the limit of "
        f"{settings.STRINGSIGHT_MAX_WORKERS} (STRINGSIGHT_MAX_WORKERS)"
    )
    assert str(not_allowed.value) == (
        "model_name: 'o1-pro' is not an allowed model; allowed: "
        f"{', '.join(settings.STRINGSIGHT_ALLOWED_MODELS)} (STRINGSIGHT_ALLOWED_MODELS)"
    )
    assert ExtractJob.objects.count() == 0


@pytest.mark.parametrize(
    ("name", "output", "message"),
    [
        (
            "rows.txt",
            "out.jsonl",
            "rows.txt: unknown input format '.txt'; use .jsonl, .json, .csv or .parquet",
        ),
        ("missing.jsonl", "out.jsonl", "missing.jsonl: no such file"),
        ("rows.jsonl", "out.xlsx", "out.xlsx: unknown output format '.xlsx'; use .jsonl, .csv or .parquet"),
    ],
)
def test_extract_refuses_files_it_cannot_use(tmp_path, name, output, message):
    for existing in ("rows.txt", "rows.jsonl"):
        write_rows(tmp_path / existing, simple_rows(1))

    with pytest.raises(CommandError) as error:
        run_extract(str(tmp_path / name), "--out", str(tmp_path / output))

    assert str(error.value) == f"{tmp_path}/{message}"


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.csv", "rows.parquet"])
def test_read_rows_gives_the_rows_as_the_api_would_receive_them(tmp_path, name):
    rows = [
        {
            "prompt": "2+2?",
            "model": "m",
            "model_response": [{"role": "assistant", "content": "4"}],
            "score": 0.5,
        },
        {"prompt": "3+3?", "model": "m", "model_response": "[6] is my answer", "question_id": "007"},
    ]
    write_rows(tmp_path / name, rows)

    assert read_rows(tmp_path / name) == rows


def test_read_rows_makes_parquet_native_types_json(tmp_path):
    # Columns typed by pandas or pyarrow rather than stored as JSON text.
    pd.DataFrame(
        {
            "prompt": ["2+2?"],
            "model": ["m"],
            "model_response": [[{"role": "assistant", "content": "4"}]],
            "asked_on": [date(2025, 1, 2)],
            "asked_at": [pd.Timestamp("2025-01-02T03:04:05")],
            "price": [Decimal("1.25")],
            "tags": [["a", "b"]],
        }
    ).to_parquet(tmp_path / "rows.parquet", index=False)

    rows = read_rows(tmp_path / "rows.parquet")

    assert rows == [
        {
            "prompt": "2+2?",
            "model": "m",
            "model_response": [{"role": "assistant", "content": "4"}],
            "asked_on": "2025-01-02",
            "asked_at": "2025-01-02T03:04:05",
            "price": 1.25,
            "tags": ["a", "b"],
        }
    ]
    json.dumps(rows)  # what the API stores: plain JSON


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (59.4, "59s"), (125, "2m05s"), (7380, "2h03m")],
)
def test_progress_durations_are_compact(seconds, shown):
    assert format_duration(seconds, compact=True) == shown


def test_the_progress_line_shows_rate_eta_tokens_and_cost():
    detail = {
        "state": "running",
        "count_total": 40,
        "count_done": 9,
        "count_failed": 1,
        "rows_per_second": 2.54,
        "eta_seconds": 118.2,
        "usage": {"total_tokens": 251230},
        "cost_usd": 0.0451,
    }

    assert progress_text(detail) == (
        "running   [######..................] 9/40 done, 1 failed"
        " | 2.5 rows/s | ETA 1m58s | 251,230 tokens | $0.0451"
    )
    assert progress_text({**detail, "rows_per_second": None, "eta_seconds": None}).endswith(
        "| — rows/s | ETA — | 251,230 tokens | $0.0451"
    )


def test_off_a_terminal_the_final_progress_line_is_always_written():
    class Log(io.StringIO):
        def write(self, text, style_func=None, ending=""):
            return super().write(text)

    detail = {
        "state": "queued",
        "count_total": 2,
        "count_done": 0,
        "count_failed": 0,
        "rows_per_second": None,
        "eta_seconds": None,
        "usage": {"total_tokens": 0},
        "cost_usd": None,
    }
    done = {**detail, "state": "done", "count_done": 2}
    log = Log()
    progress = ProgressLine(log)

    progress.show(detail)
    progress.show(done)  # within the interval between logs: held back
    progress.show(done, final=True)

    assert log.getvalue().splitlines() == [progress_text(detail), progress_text(done)]


def test_read_rows_takes_a_json_list_too(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(simple_rows(2)))

    assert read_rows(tmp_path / "rows.json") == simple_rows(2)


def job_with(owner, *, done=0, failed=0, pending=0, state=None, model_name="gpt-4o-mini"):
    """A job whose first rows are done (two properties each), then failed,
    then left pending, created at MOMENT."""
    job = make_job(owner, simple_rows(done + failed + pending), model_name=model_name)
    lifecycle.job_mark_running(job_id=job.id)
    claimed = claims.claim_rows(job_id=job.id, worker_id="w", limit=done + failed).rows
    for row in claimed:
        outcome = (
            done_outcome(2) if row.index < done else RowOutcome(error=f"no valid property in row {row.index}")
        )
        factories.record_row_result(
            job_id=job.id, row_id=row.id, row_index=row.index, worker_id="w", outcome=outcome
        )
    ExtractJob.objects.filter(pk=job.id).update(created_at=MOMENT, started_at=MOMENT)
    if state == "cancelled":
        lifecycle.job_cancel(job=job)
    job.refresh_from_db()
    return job


def run_jobs(*arguments: str) -> str:
    out = io.StringIO()
    call_command("jobs", *arguments, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_jobs_list_shows_jobs_newest_first(user, other_user):
    older = job_with(user, done=3)
    newer = job_with(other_user, done=1, failed=1, pending=1, model_name="sim-model")
    ExtractJob.objects.filter(pk=newer.id).update(created_at=MOMENT.replace(hour=4))

    assert run_jobs("list") == (
        f"{'ID':<36}  OWNER  STATE    DONE/FAILED/TOTAL  PROPERTIES  MODEL        CREATED\n"
        f"{newer.id}  bob    running  1/1/3              2           sim-model    2025-01-02 04:04:05\n"
        f"{older.id}  alice  done     3/0/3              6           gpt-4o-mini  2025-01-02 03:04:05\n"
    )
    assert run_jobs("list", "--state", "done") == run_jobs("list", "--user", "alice")
    assert run_jobs("list", "--limit", "1").splitlines()[1].startswith(str(newer.id))
    assert run_jobs("list", "--state", "error") == "No jobs.\n"


@pytest.mark.django_db
def test_jobs_list_refuses_an_unknown_user():
    with pytest.raises(CommandError) as error:
        run_jobs("list", "--user", "nobody")

    assert str(error.value) == "no user named 'nobody'"


@pytest.mark.django_db
def test_jobs_show_gives_the_detail_and_the_first_failed_rows(user):
    job = job_with(user, done=2, failed=1, pending=1, state="cancelled")
    ExtractJob.objects.filter(pk=job.id).update(finished_at=MOMENT, cancelled_at=MOMENT)

    assert run_jobs("show", str(job.id)) == (
        f"Job {job.id}\n"
        "  state:       cancelled\n"
        "  owner:       alice\n"
        "  method:      single_model\n"
        "  model:       gpt-4o-mini\n"
        "  mode:        online\n"
        "  rows:        4: 2 done, 1 failed, 0 running, 0 pending, 1 cancelled\n"
        "  progress:    75%\n"
        "  properties:  4\n"
        "  tokens:      280 (200 prompt, 80 completion)\n"
        "  cost:        $0.000078\n"
        "  cache hits:  0\n"
        "  budget:      none\n"
        "  created:     2025-01-02 03:04:05\n"
        "  started:     2025-01-02 03:04:05\n"
        "  finished:    2025-01-02 03:04:05\n"
        "  cancelled:   2025-01-02 03:04:05\n"
        "Failed rows (the first 1 of 1):\n"
        "  row 2 (q2): no valid property in row 2\n"
    )


@pytest.mark.django_db
def test_jobs_cancel_reports_the_final_properties_count(user):
    running = job_with(user, done=1, pending=2)
    finished = job_with(user, done=1)

    assert run_jobs("cancel", str(running.id)) == f"Cancelled job {running.id}: 2 properties kept.\n"
    assert (
        run_jobs("cancel", str(running.id)) == f"Job {running.id} was already cancelled: 2 properties kept.\n"
    )
    assert run_jobs("cancel", str(finished.id)) == (
        f"Job {finished.id} already finished (state: done): 2 properties.\n"
    )
    assert ExtractJob.objects.get(pk=running.id).state == "cancelled"


@pytest.mark.django_db
def test_jobs_resume_reopens_unfinished_rows(user):
    cancelled = job_with(user, done=1, failed=1, pending=2, state="cancelled")
    done = job_with(user, done=2, failed=1)

    assert run_jobs("resume", str(cancelled.id)) == (
        f"Resumed job {cancelled.id}: 2 rows reopened, 1 done row kept. "
        "It is queued for a worker (python manage.py qcluster).\n"
    )
    assert run_jobs("resume", str(done.id), "--retry-failed") == (
        f"Resumed job {done.id}: 1 row reopened (1 of them failed before), 2 done rows kept. "
        "It is queued for a worker (python manage.py qcluster).\n"
    )
    assert ExtractJob.objects.get(pk=cancelled.id).state == "queued"


@pytest.mark.django_db
def test_jobs_resume_refuses_a_job_that_is_not_resumable(user):
    running = job_with(user, done=1, pending=1)

    with pytest.raises(CommandError) as error:
        run_jobs("resume", str(running.id))

    assert (
        str(error.value)
        == f"job {running.id} cannot be resumed: job is still running; cancel it before resuming"
    )
    assert error.value.returncode == 1


def job_with_id(job_id: str) -> ExtractJob:
    return ExtractJob.objects.create(id=uuid.UUID(job_id), **vars(job_params()))


@pytest.mark.django_db
def test_jobs_take_a_unique_start_of_a_job_id():
    first = job_with_id("abcdef12-0000-4000-8000-000000000000")
    job_with_id("abcdef34-0000-4000-8000-000000000000")

    assert run_jobs("cancel", "ABCDEF12") == f"Cancelled job {first.id}: 0 properties kept.\n"
    assert run_jobs("show", "abcdef12-0000").splitlines()[0] == f"Job {first.id}"
    for prefix, message in [
        ("abcdef", "'abcdef' is the start of more than one job id; give more of it"),
        ("abcde", "'abcde' is not a job id (give the id or at least its first 6 digits)"),
        ("not-an-id", "'not-an-id' is not a job id (give the id or at least its first 6 digits)"),
        ("123456", "no job 123456"),
    ]:
        with pytest.raises(CommandError) as error:
            run_jobs("show", prefix)
        assert str(error.value) == message


@pytest.mark.parametrize(
    "path",
    [
        "jobs/cli.py",
        "jobs/presenter.py",
        "jobs/management/commands/extract.py",
        "jobs/management/commands/jobs.py",
        *sorted(f"jobs/services/{module.name}" for module in (ROOT / "jobs" / "services").glob("*.py")),
    ],
)
def test_the_cli_and_what_it_uses_never_import_the_api(path):
    """The CLI is an interface of its own: it starts, shows and changes jobs
    through the services and the presenter, as the API does, not through
    the API."""
    tree = ast.parse((ROOT / path).read_text())
    package = path.removesuffix(".py").replace("/", ".").rsplit(".", 1)[0]
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            imported += [module, *(f"{module}.{alias.name}" for alias in node.names)]

    assert [name for name in imported if name == "jobs.api" or name.startswith("jobs.api.")] == []
