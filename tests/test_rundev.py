"""The README's run command: web server, worker and simulator in one
terminal, a banner saying how to log in, and Ctrl-C stopping everything."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> set[int]:
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        children = Path(f"/proc/{parent}/task/{parent}/children")
        if children.exists():
            for child in map(int, children.read_text().split()):
                found.add(child)
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    "sigint",
    [
        signal.SIG_DFL,
        # What a shell without job control does to a background command
        # (`make run &` in a script); the children inherit it.
        signal.SIG_IGN,
    ],
    ids=["terminal", "started-with-sigint-ignored"],
)
def test_rundev_starts_everything_says_how_to_log_in_and_stops_on_ctrl_c(tmp_path, sigint):
    port, simulator_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("OPENAI_API_KEY", "DATABASE_URL")}
    env.update({"STRINGSIGHT_VAR_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"})
    log = tmp_path / "rundev.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "rundev",
                "--port",
                str(port),
                "--simulator-port",
                str(simulator_port),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
        )
    try:
        deadline = time.monotonic() + 60
        while "Quit the server" not in log.read_text() or "running." not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        banner = log.read_text()
        token = re.search(r"API token \(admin\):\s+([0-9a-f]{40})", banner).group(1)
        assert re.search(r"user: admin\s+password: \S{8,}", banner)
        assert f"http://127.0.0.1:{port}/api/docs/" in banner
        assert "Properties are SYNTHETIC" in banner

        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/extract/jobs/start",
            data=json.dumps({"rows": [{"prompt": "2+2?", "model": "m", "model_response": "4"}]}).encode(),
            headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        )
        job_id = json.load(urllib.request.urlopen(request, timeout=10))["job_id"]
        status_url = f"http://127.0.0.1:{port}/extract/jobs/status?job_id={job_id}"
        status = {}
        while status.get("state") != "done":
            assert time.monotonic() < deadline + 30, status
            time.sleep(0.3)
            status = json.load(
                urllib.request.urlopen(
                    urllib.request.Request(status_url, headers={"Authorization": f"Token {token}"}),
                    timeout=10,
                )
            )
        children = descendants(process.pid)
        assert len(children) >= 3

        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert process.wait(timeout=30) == 0
        assert [pid for pid in children if alive(pid)] == []
        # Every child stopped on the signal, none had to be killed.
        assert "exited with an error" not in log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
