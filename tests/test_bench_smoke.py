"""The benchmarks in bench/ at smoke sizes, so the harness cannot rot: every
script runs end to end against real processes (simulator, gunicorn,
qcluster) and prints its table. No target is judged at these sizes.

The benchmarks make their own database, never the suite's: a SQLite file
under tmp_path, or a database of their own on the suite's PostgreSQL server
when the suite runs on PostgreSQL."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLE_HEADER = "| figure | measured | target | verdict |"

pytestmark = [pytest.mark.e2e, pytest.mark.bench]


def database_options() -> list[str]:
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        return ["--db", "postgres", "--postgres-url", url]
    return ["--db", "sqlite"]


def run_all_smoke(work_dir: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        [sys.executable, "bench/run_all.py", "--smoke", "--work-dir", str(work_dir), *database_options()],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the harness then stops the processes it started.
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"the smoke run took over {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_every_benchmark_runs_at_smoke_size_and_prints_its_table(tmp_path):
    completed = run_all_smoke(tmp_path)

    output = completed.stdout
    assert completed.returncode == 0, f"{output[-4000:]}\n{completed.stderr[-4000:]}"
    titles = [line.split()[1] for line in output.splitlines() if line.startswith("### #")]
    expected = [f"#{number}" for number in range(14)]
    assert titles == expected
    assert output.count(TABLE_HEADER) == len(expected)
    assert output.count("SMOKE RUN: tiny sizes, targets not judged") == len(expected)
    summary = output[output.index("### summary") :].splitlines()[1 : len(expected) + 1]
    assert [line.split(":")[1].split("(")[0].strip() for line in summary] == ["ran"] * len(expected)
