"""The processes under test: the LLM simulator, the web server and a
`qcluster`, each in its own session with its output in a log file."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llm_simulator.client import READY_PREFIX

ROOT = Path(__file__).resolve().parent.parent
SIMULATOR_READY = re.compile(re.escape(READY_PREFIX) + r"(\S+)")
GUNICORN_READY = re.compile(r"Listening at: (http://\S+)")
WORKER_READY = re.compile(r"ready for work at (\d+)")


class Service:
    """A child process in its own session (stop() ends its whole process
    group and nothing else), its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, ready: Callable[[str], object], timeout: float = 60.0):
        """Wait until `ready(log text)` returns something true, and return it."""
        deadline = time.monotonic() + timeout
        while True:
            found = ready(self.log_text())
            if found:
                return found
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start; the end of {self.log_path}:\n{self.tail()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> None:
        self.request_stop(sig)
        self.wait_stopped(timeout)

    def request_stop(self, sig: int = signal.SIGINT) -> None:
        """Ask the main process to stop; it stops its own children."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait_stopped(self, timeout: float = 20.0) -> None:
        """Wait for the main process, then kill whatever is left of its group."""
        if self.process is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def describe_server(server: str, workers: int) -> str:
    if server == "runserver":
        return "manage.py runserver --noreload (threaded, one process)"
    import gunicorn

    return f"gunicorn {gunicorn.__version__}, {workers} gthread workers x 4 threads"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Process:
    """A Service that knows when it is ready to use (`_ready`, on its log)."""

    service: Service

    @property
    def pid(self) -> int:
        return self.service.pid

    def spawn(self) -> None:
        self.service.spawn()

    def wait_ready(self) -> None:
        self.service.wait_ready(self._ready)

    def _ready(self, log_text: str) -> bool:
        raise NotImplementedError

    def request_stop(self) -> None:
        # SIGINT: a quick shutdown for gunicorn too (its graceful one, on
        # SIGTERM, waits on kept-alive connections).
        self.service.request_stop(signal.SIGINT)

    def wait_stopped(self) -> None:
        self.service.wait_stopped()


class WebServer(_Process):
    def __init__(self, server: str, env: dict[str, str], log_path: Path, *, workers: int):
        self.base_url = ""
        if server == "gunicorn":
            argv = [
                sys.executable,
                "-m",
                "gunicorn",
                "stringsight_site.wsgi:application",
                "--bind",
                "127.0.0.1:0",
                "--workers",
                str(workers),
                "--worker-class",
                "gthread",
                "--threads",
                "4",
                "--timeout",
                "300",
                # Django is imported once, before the workers fork: a faster start.
                "--preload",
                "--graceful-timeout",
                "2",
                # A second gunicorn (another engineer's run) would fight over the default socket.
                "--no-control-socket",
            ]
        else:
            self.base_url = f"http://127.0.0.1:{free_port()}"
            argv = [
                sys.executable,
                "manage.py",
                "runserver",
                self.base_url.removeprefix("http://"),
                "--noreload",
            ]
        self.service = Service(server, argv, env, log_path)

    def _ready(self, log_text: str) -> bool:
        if not self.base_url:
            match = GUNICORN_READY.search(log_text)
            if not match:
                return False
            self.base_url = match.group(1)
        connection = http.client.HTTPConnection(self.base_url.removeprefix("http://"), timeout=5)
        try:
            connection.request("GET", "/extract/prompts")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()


class Cluster(_Process):
    """One `manage.py qcluster` with its worker processes."""

    def __init__(self, env: dict[str, str], log_path: Path, *, workers: int):
        self.workers = workers
        self.service = Service("qcluster", [sys.executable, "manage.py", "qcluster"], env, log_path)

    def _ready(self, log_text: str) -> bool:
        return "running." in log_text and len(WORKER_READY.findall(log_text)) >= self.workers

    def worker_pids(self) -> list[int]:
        """The task-running processes (not the sentinel, pusher or monitor)."""
        return [int(pid) for pid in WORKER_READY.findall(self.service.log_text())]


class Profiler:
    """py-spy recording a service and its children (qcluster's workers,
    gunicorn's) as collapsed stacks, for `--profile DIR`."""

    def __init__(self, service: Service, output: Path, *, rate: int = 100):
        self.output = output
        self.argv = [
            shutil.which("py-spy") or "py-spy",
            "record",
            "--pid",
            str(service.pid),
            "--subprocesses",
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(output),
        ]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        # SIGINT makes py-spy write what it has recorded.
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
