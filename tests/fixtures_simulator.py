"""The LLM simulator (`manage.py llm_simulator`) as a subprocess for the test session,
and a small client for its control endpoints (/_sim/...)."""

import hashlib
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import llm_simulator
from llm_simulator import READY_PREFIX

ROOT = Path(__file__).resolve().parent.parent


class SimulatorClient(llm_simulator.SimulatorClient):
    """The session's simulator, which a test may reconfigure and then restore."""

    def __init__(self, base_url: str):
        super().__init__(base_url, timeout=10)
        self.defaults = self.config()

    def restore_defaults(self) -> dict:
        return self.configure(**self.defaults)


def user_sha256(user_content: str) -> str:
    """The `user_sha256` of a logged request whose user message(s) together were `user_content`."""
    return hashlib.sha256(user_content.encode()).hexdigest()


MANAGE_PY = ("manage.py", "llm_simulator")
MODULE = ("-m", "llm_simulator")


def start_simulator(
    *arguments: str, command: tuple[str, ...] = MANAGE_PY, timeout: float = 30.0
) -> tuple[subprocess.Popen, str]:
    """Start `manage.py llm_simulator --port 0 ...` (or `python -m llm_simulator`); return
    the process and its base URL."""
    process = subprocess.Popen(
        [sys.executable, *command, "--port", "0", *arguments],
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
    yield llm_simulator
    # A paused simulator must not hold the calls of whatever runs next.
    llm_simulator.restore_defaults()
