"""A real `manage.py qcluster` process on the test database, for end-to-end
tests. It talks to the LLM simulator over HTTP like a production worker
talks to a provider."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parent.parent


def database_url(settings_dict: dict) -> str:
    """The URL of the database this test session really uses (the test copy)."""
    if settings_dict["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{settings_dict['NAME']}"
    user = quote(settings_dict.get("USER") or "")
    password = f":{quote(settings_dict['PASSWORD'])}" if settings_dict.get("PASSWORD") else ""
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{settings_dict['NAME']}"


class WorkerProcess:
    """Starts and stops one qcluster process; its output goes to a log file
    that a failing test can print."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while b"running." not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qcluster did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> None:
        if not self.running:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL the whole cluster at once, as a crashed machine would."""
        self.stop(sig=signal.SIGKILL)

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def worker_env(db_url: str, simulator_url: str, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": db_url,
            "OPENAI_BASE_URL": simulator_url,
            "OPENAI_API_KEY": "sim-key",
            "Q_WORKERS": "2",
            "STRINGSIGHT_RETRY_BASE_SECONDS": "0.05",
            "STRINGSIGHT_RETRY_MAX_SECONDS": "0.5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


@pytest.fixture(scope="session")
def worker_process(django_db_setup, llm_simulator, tmp_path_factory):
    from django.db import connection

    process = WorkerProcess(
        worker_env(database_url(connection.settings_dict), llm_simulator.base_url),
        tmp_path_factory.mktemp("qcluster") / "qcluster.log",
    )
    yield process
    process.stop()


@pytest.fixture
def qcluster(worker_process, request):
    """A running worker for this test; its log is printed if the test fails."""
    worker_process.start()
    yield worker_process
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(f"--- qcluster log ---\n{worker_process.log_tail()}")


@pytest.fixture
def start_worker(worker_process, llm_simulator, tmp_path, request):
    """Start extra qcluster processes with their own settings; the shared
    worker is stopped first so that only these work. All are stopped (and
    their logs printed on failure) at the end of the test."""
    from django.db import connection

    worker_process.stop()
    started: list[WorkerProcess] = []

    def start(name: str = "worker", **overrides: str) -> WorkerProcess:
        env = worker_env(database_url(connection.settings_dict), llm_simulator.base_url, **overrides)
        env["STRINGSIGHT_WORKER_NAME"] = name
        process = WorkerProcess(env, tmp_path / f"{name}-{len(started)}.log")
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for process in started:
            print(f"--- {process.log_path.name} ---\n{process.log_tail()}")


@pytest.fixture
def no_background_worker(worker_process):
    """For transactional tests that run the worker loop themselves: the
    session's qcluster, if an earlier test started it, would pick up the
    tasks their jobs enqueue and take a share of the rows."""
    worker_process.stop()
