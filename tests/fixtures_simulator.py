"""The LLM simulator (`manage.py llm_simulator`) as a subprocess for the test session,
and a small client for its control endpoints (/_sim/...)."""

import hashlib
import json
import queue
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READY_PREFIX = "LLM simulator listening on "


class SimulatorClient:
    """Talks to a running simulator; `base_url` is what the openai SDK needs."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.root_url = base_url.removesuffix("/v1")
        # An HTTP(S)_PROXY in the environment must not capture loopback calls.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.defaults = self.config()

    def configure(self, **options) -> dict:
        """Change options at run time; a bad option raises urllib.error.HTTPError (400)."""
        return self._call("POST", "/_sim/config", options)

    def config(self) -> dict:
        return self._call("GET", "/_sim/config")

    def restore_defaults(self) -> dict:
        return self.configure(**self.defaults)

    def reset(self) -> None:
        self._call("POST", "/_sim/reset", {})

    def requests(self) -> list[dict]:
        return self._call("GET", "/_sim/requests")["requests"]

    def stats(self) -> dict:
        return self._call("GET", "/_sim/stats")

    def _call(self, method: str, path: str, payload: dict | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.root_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with self._opener.open(request, timeout=10) as response:
            return json.load(response)


def user_sha256(user_content: str) -> str:
    """The `user_sha256` of a logged request whose user message(s) together were `user_content`."""
    return hashlib.sha256(user_content.encode()).hexdigest()


def start_simulator(*arguments: str, timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Start `manage.py llm_simulator --port 0 ...`; return the process and its base URL."""
    process = subprocess.Popen(
        [sys.executable, "manage.py", "llm_simulator", "--port", "0", *arguments],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = queue.Queue()
    # The reader keeps draining stdout so that a chatty simulator never blocks on a full pipe.
    threading.Thread(target=_forward_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    if not line.startswith(READY_PREFIX):
        stop_simulator(process)
        raise RuntimeError(f"llm_simulator did not start (exit code {process.returncode}): {line!r}")
    return process, line.removeprefix(READY_PREFIX).strip()


def _forward_lines(stream, lines: queue.Queue):
    with stream:
        for line in stream:
            lines.put(line)
    lines.put("")


def stop_simulator(process: subprocess.Popen, timeout: float = 10.0) -> int:
    process.terminate()
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@pytest.fixture(scope="session")
def llm_simulator():
    process, base_url = start_simulator()
    try:
        yield SimulatorClient(base_url)
    finally:
        stop_simulator(process)


@pytest.fixture
def sim(llm_simulator):
    """The session's simulator with default options and an empty log."""
    llm_simulator.restore_defaults()
    llm_simulator.reset()
    return llm_simulator
