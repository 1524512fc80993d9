"""The staff admin in a real browser: Debian's Chromium driven by Playwright
against the live server, while a real `qcluster` runs the job against the
LLM simulator. With STRINGSIGHT_SCREENSHOTS=1 it also saves the screenshots
the README shows (docs/admin-job-list.png, docs/admin-job-page.png)."""

import os
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connections
from django.utils import timezone

from jobs.models import ExtractJob, JobState
from jobs.services import budgets

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need playwright (pip install -r requirements-dev.txt)"
)
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
# Playwright cannot download its own browser here, so it drives Debian's,
# headless and without any of the calls home a fresh profile makes.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS = Path(__file__).resolve().parent.parent / "docs"
PASSWORD = "browser-password"
# Generous: the machine may be busy with other test runs.
TIMEOUT_MS = 30_000
COUNT_DONE = '#job-progress [data-field="count_done"]'
COUNT_DONE_JS = f"Number(document.querySelector({COUNT_DONE!r}).textContent)"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="the browser tests need Debian's chromium (apt-get install -y chromium)"
    ),
]


@pytest.fixture
def page(monkeypatch):
    # Playwright's sync API keeps an event loop running in this thread, and
    # Django refuses ORM calls under a running loop unless told it is safe;
    # it is, as nothing else runs on that loop.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        context.set_default_timeout(TIMEOUT_MS)
        # The admin's navigation sidebar, closed: the job list needs the width.
        context.add_init_script("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")
        yield context.new_page()
        browser.close()
        # Under a running loop Django keeps connections per context, so the
        # ORM calls above opened their own; left open, they would keep
        # PostgreSQL from dropping the test database.
        connections.close_all()


def log_in(page, base_url: str, username: str) -> None:
    page.goto(f"{base_url}/admin/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{base_url}/admin/")


def count_done(page) -> int:
    return int(page.locator(COUNT_DONE).inner_text())


def taking_screenshots() -> bool:
    return os.environ.get("STRINGSIGHT_SCREENSHOTS") == "1"


def test_staff_watch_a_job_run_cancel_it_and_find_its_properties(
    page, live_server, qcluster, sim, api, airline_rows, django_user_model
):
    django_user_model.objects.create_superuser("root", password=PASSWORD)
    # 60 rows two at a time: half a minute, time enough to watch two
    # counts; the simulator is then paused so the job runs until cancelled.
    sim.configure(latency_ms=1000)
    started = api.post("/extract/jobs/start", {"rows": airline_rows[:60], "max_workers": 2}, format="json")
    job_id = started.json()["job_id"]

    log_in(page, live_server.url, "root")
    page.goto(f"{live_server.url}/admin/jobs/extractjob/{job_id}/change/")
    page.evaluate("window.stillTheSamePage = true")
    page.wait_for_function(f"() => {COUNT_DONE_JS} > 0", timeout=TIMEOUT_MS)
    first = count_done(page)
    page.wait_for_function(f"(first) => {COUNT_DONE_JS} > first", arg=first, timeout=TIMEOUT_MS)
    second = count_done(page)
    sim.configure(paused=True)
    bar_width, percent = page.evaluate(
        "() => [document.getElementById('job-progress-bar').style.width,"
        " document.getElementById('job-progress-percent').textContent]"
    )

    assert 0 < first < second < 60
    # The browser writes 20.0% back as 20%.
    assert (float(bar_width.removesuffix("%")), float(percent) > 0) == (float(percent), True)
    assert page.evaluate("window.stillTheSamePage") is True  # the numbers moved without a reload
    expect(page.locator("#job-state")).to_have_text("running")
    if taking_screenshots():
        page.reload()  # so that the tokens and cost are as recent as the progress
        page.screenshot(path=str(DOCS / "admin-job-page.png"))

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel job").click()

    expect(page.locator("#job-state")).to_have_text("cancelled")
    expect(page.locator(".messagelist")).to_contain_text("Job cancelled;")
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    shown = int(page.locator('#job-progress [data-field="properties_count"]').inner_text())
    job = ExtractJob.objects.get(pk=job_id)
    assert (job.state, job.properties_count) == ("cancelled", shown)
    assert shown > 0
    assert job.count_done < 60

    page.locator("#job-properties-link").click()

    expect(page.locator("#result_list tbody tr")).to_have_count(min(shown, 100))
    expect(page.locator("p.paginator")).to_contain_text(f"{shown} properties")

    if taking_screenshots():
        add_jobs_in_other_states(job.owner)
        page.set_viewport_size({"width": 1600, "height": 720})
        page.goto(f"{live_server.url}/admin/jobs/extractjob/")
        page.screenshot(path=str(DOCS / "admin-job-list.png"))


def add_jobs_in_other_states(owner) -> None:
    """A few jobs beside the cancelled one, so the list shows every colour."""
    now = timezone.now()
    for minutes_ago, state, total, done, failed, model, error in (
        (50, JobState.DONE, 100, 98, 2, "gpt-4o-mini", ""),
        (40, JobState.ERROR, 100, 12, 0, "gpt-4.1", "the LLM refused the API key (401)"),
        (30, JobState.DONE, 500, 500, 0, "gpt-4o", ""),
        (2, JobState.RUNNING, 400, 140, 3, "gpt-4o-mini", ""),
        (0, JobState.QUEUED, 250, 0, 0, "my-local-model", ""),
    ):
        started = None if state == JobState.QUEUED else now - timedelta(minutes=minutes_ago)
        price_input, price_output = budgets.price_for(model) or (None, None)
        job = ExtractJob.objects.create(
            owner=owner,
            state=state,
            error=error,
            method="single_model",
            system_prompt="default",
            resolved_system_prompt="(the default prompt)",
            model_name=model,
            temperature=0.6,
            top_p=0.95,
            max_tokens=2048,
            max_workers=16,
            price_input_per_mtok=price_input,
            price_output_per_mtok=price_output,
            count_total=total,
            count_done=done,
            count_failed=failed,
            properties_count=done * 4,
            prompt_tokens=(done + failed) * 1900,
            completion_tokens=(done + failed) * 420,
            started_at=started,
            finished_at=None
            if state in (JobState.QUEUED, JobState.RUNNING)
            else started + timedelta(minutes=3),
        )
        ExtractJob.objects.filter(pk=job.pk).update(
            created_at=now - timedelta(minutes=minutes_ago, seconds=5)
        )
