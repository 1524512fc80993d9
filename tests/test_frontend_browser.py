"""The StringSight frontend's flow in a real browser: a page of our own
(tests/pages/frontend_flow.html), served from another origin than the API,
calls /health, /detect-and-validate, /prompts, /prompt-text (also with a
stale name, whose error body it shows), /extract/single and a job's start,
status, cancel and result with `fetch` exactly as the frontend does (no
credentials, JSON bodies), in anonymous mode with that origin allowed by
CORS. Debian's Chromium driven by Playwright; a real `qcluster` runs the
job against the LLM simulator."""

import functools
import json
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.db import connections

from extraction.prompts import DEFAULT_TASK_DESCRIPTIONS, named_prompt
from jobs.models import ExtractJob, JobKind
from tests.test_admin_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need playwright (pip install -r requirements-dev.txt)"
)
expect = sync_api.expect

PAGE = Path(__file__).parent / "pages" / "frontend_flow.html"
ROWS = 60
FIRST_INDEX = 100  # not 0: a row's __index differs from its position in the job
FLOW_TIMEOUT_MS = 90_000

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="the browser tests need Debian's chromium (apt-get install -y chromium)"
    ),
]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def page_origin(tmp_path, airline_rows):
    """A static server on its own port: the page and the rows it sends, as
    the frontend holds them after loading a file."""
    rows = [
        {
            "__index": FIRST_INDEX + position,
            "question_id": str(FIRST_INDEX + position),
            "prompt": row["prompt"],
            "model": row["model"],
            "model_response": row["model_response"],
        }
        for position, row in enumerate(airline_rows[:ROWS])
    ]
    shutil.copy(PAGE, tmp_path / PAGE.name)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def page(monkeypatch):
    # Playwright's sync API keeps an event loop running in this thread; the
    # ORM calls here are safe, as nothing else runs on that loop.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        yield context.new_page()
        browser.close()
        connections.close_all()


def test_the_frontends_flow_runs_from_another_origin(
    page, page_origin, live_server, qcluster, sim, settings, monkeypatch
):
    settings.STRINGSIGHT_ALLOW_ANONYMOUS = True
    settings.CORS_ALLOWED_ORIGINS = [page_origin]
    # The live server runs in this process: /extract/single calls the simulator from here.
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sim-key")
    # Slow enough (60 rows, 2 calls at a time, 1 s each) that the job still runs when the page
    # cancels it, after its first rows, even on a loaded machine.
    sim.configure(latency_ms=1000)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(f"{page_origin}/{PAGE.name}?api={live_server.url}")

    expect(page.locator("#flow")).to_have_text("finished", timeout=FLOW_TIMEOUT_MS)
    shown = {
        field: page.locator(f"#{field}").inner_text()
        for field in (
            "health",
            "upload",
            "prompts",
            "stale-prompt",
            "prompt-text",
            "single",
            "batch",
            "cancel",
            "results",
            "view",
            "error",
        )
    }
    single = ExtractJob.objects.get(kind=JobKind.SINGLE)
    batch = ExtractJob.objects.get(kind=JobKind.ROWS)
    prompt = named_prompt(
        "default", "single_model", task_description=DEFAULT_TASK_DESCRIPTIONS["default", "single_model"]
    )
    opened = set(batch.properties.values_list("input_index", flat=True))
    assert shown == {
        "health": "connected",
        "upload": f"single_model: {ROWS} rows, valid, 50 previewed",
        "prompts": "2 prompts available: default, agent",
        # The error's body reaches the page (CORS headers on errors too), short JSON.
        "stale-prompt": "Failed to load prompt 'defualt': prompt text: "
        + json.dumps(
            {
                "detail": "name: unknown prompt name 'defualt'; known names: default, agent",
                "code": "invalid",
                "field": "name",
                "errors": {"name": ["unknown prompt name 'defualt'; known names: default, agent"]},
            },
            separators=(",", ":"),
        ),
        "prompt-text": f"default: {len(prompt)} characters, task description highlighted",
        "single": f"{single.properties_count} properties for row {FIRST_INDEX}; 0 parsing issues",
        "batch": f"Batch: cancelled • {round(100 * batch.progress)}%",
        "cancel": f"cancelled: job cancelled ({batch.properties_count} properties)",
        "results": f"Job cancelled. Retrieved {batch.properties_count} partial results.",
        "view": f"{len(opened)} conversations, every property opens its own",
        "error": "",
    }
    assert errors == []
    assert (single.owner, single.state, single.resolved_system_prompt) == (None, "done", prompt)
    assert single.properties_count >= 3
    assert (batch.owner, batch.state) == (None, "cancelled")
    assert 2 <= batch.count_done < ROWS
    assert batch.properties_count > 0
    assert opened <= set(range(FIRST_INDEX, FIRST_INDEX + ROWS))
