"""The TypeScript client in clients/typescript: its Node test suite passes
against a live server with a real worker, and its generated types match
the API's schema."""

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from django.core.management import call_command
from rest_framework.authtoken.models import Token

CLIENT = Path(__file__).resolve().parent.parent / "clients" / "typescript"

pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(
        shutil.which("node") is None or shutil.which("npm") is None,
        reason="Node.js (node and npm) is not installed; the TypeScript client's tests need it",
    ),
]


def npm(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run npm in the client's folder; return its exit code and output. On a
    timeout the whole process group goes, since npm's child node would
    otherwise outlive it."""
    with subprocess.Popen(
        ["npm", *args],
        cwd=CLIENT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            return -1, f"npm {' '.join(args)} timed out after {timeout} s\n{output}"
    return process.returncode, output


@pytest.fixture(scope="module")
def node_modules():
    # npm ci leaves node_modules/.package-lock.json; older than the lockfile means stale.
    installed = CLIENT / "node_modules" / ".package-lock.json"
    lockfile = CLIENT / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lockfile.stat().st_mtime:
        code, output = npm("ci", "--no-audit", "--no-fund", timeout=300)
        assert code == 0, f"npm ci failed:\n{output}"


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_typescript_client_suite_passes_against_a_live_server(
    live_server, qcluster, sim, node_modules, user, other_user, monkeypatch
):
    # Slow enough that a job is still running when the suite cancels it
    # (the resume test cancels a 12-row job after its first row: 5 s
    # later at 1 s a call, on however busy a machine).
    sim.configure(latency_ms=1000)
    # The live server runs in this process: /extract/single calls the simulator too.
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sim-key")
    env = {
        **os.environ,
        "STRINGSIGHT_BASE_URL": live_server.url,
        "STRINGSIGHT_TOKEN": Token.objects.create(user=user).key,
        "STRINGSIGHT_OTHER_TOKEN": Token.objects.create(user=other_user).key,
    }

    code, output = npm("test", env=env, timeout=120)

    assert code == 0, f"npm test failed (exit code {code}):\n{output}"
    # The spec reporter ends with "pass N" and "fail N" lines: exit code 0 must also mean tests ran.
    counts = dict(re.findall(r"^\S+ (pass|fail) (\d+)$", output, re.MULTILINE))
    assert counts.get("fail") == "0", output
    assert int(counts.get("pass", "0")) > 0, f"npm test ran no test:\n{output}"


def test_typescript_types_match_the_api_schema(tmp_path, node_modules):
    schema = tmp_path / "openapi.json"
    call_command("spectacular", "--format", "openapi-json", "--file", str(schema))

    code, output = npm("run", "check-schema", env={**os.environ, "SCHEMA": str(schema)})

    assert code == 0, f"clients/typescript/src/schema.ts is out of date:\n{output}"
