"""The web server as the Procfile runs it (gunicorn), as a subprocess on the
test database, for tests that need a real web process: its memory, two of
them sharing a throttle, slow clients."""

import http.client
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.fixtures_worker import database_url

ROOT = Path(__file__).resolve().parent.parent


def procfile_web_arguments() -> list[str]:
    """gunicorn's options exactly as the Procfile's web line gives them,
    with the environment's defaults filled in."""
    line = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    command = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda match: match.group(2), line.removeprefix("web:"))
    arguments = shlex.split(command)
    assert arguments[:2] == ["gunicorn", "stringsight_site.wsgi"], arguments
    return arguments[2:]


class WebServer:
    def __init__(self, env: dict[str, str], log_path: Path, arguments: list[str]):
        self.env = env
        self.log_path = log_path
        self.arguments = arguments
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 60.0) -> "WebServer":
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "stringsight_site.wsgi", *self.arguments],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(rb"Listening at: http://127\.0\.0\.1:(\d+)", self.log_path.read_bytes())
            self.port = int(found.group(1)) if found else 0
            if self.answers():
                return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def answers(self) -> bool:
        if not self.port:
            return False
        try:
            return self.request("GET", "/healthz", timeout=5)[0] in (200, 503)
        except OSError:
            return False

    def request(self, method: str, path: str, body: bytes | None = None, headers=None, timeout: float = 120):
        """(status, headers, body) of one request on a connection of its own."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def post_json(self, path: str, payload, token: str, **headers):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, response_headers, content = self.request(
            "POST",
            path,
            body,
            {"Authorization": f"Token {token}", "Content-Type": "application/json", **headers},
        )
        return status, response_headers, json.loads(content) if content else None

    def worker_pids(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.process.pid).children()]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def web_env(db_url: str, **overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DJANGO_")}
    env.update(
        {
            "DATABASE_URL": db_url,
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": "test-" * 12,
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


@pytest.fixture
def web_server(transactional_db, tmp_path, request):
    """Start gunicorn processes as the Procfile does (on 127.0.0.1, a free
    port), with extra settings or options; all stop at the end of the test."""
    from django.db import connection

    started: list[WebServer] = []

    def start(*extra_arguments: str, **settings: str) -> WebServer:
        # Each its own control socket: by default they would share one path.
        arguments = [*procfile_web_arguments(), "--no-control-socket", *extra_arguments]
        arguments = [
            "127.0.0.1:0" if previous == "--bind" else argument
            for previous, argument in zip(["", *arguments[:-1]], arguments, strict=True)
        ]
        server = WebServer(
            web_env(database_url(connection.settings_dict), **settings),
            tmp_path / f"gunicorn-{len(started)}.log",
            arguments,
        )
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for server in started:
            print(f"--- {server.log_path.name} ---\n{server.log_tail()}")


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak since the last reset) of a process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        name: int(re.search(rf"{name}:\s+(\d+) kB", status).group(1)) * 1024 for name in ("VmRSS", "VmHWM")
    }


def reset_peak_memory(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
