"""A job that stopped with an error says so first: in `manage.py jobs show`
and on its admin page (issue 14)."""

import io

import pytest
from django.core.management import call_command

from jobs.services import lifecycle
from tests.factories import make_job, simple_rows

pytestmark = pytest.mark.django_db

QUOTA = "the LLM provider says the key's quota is spent: You exceeded your current quota"


def test_jobs_show_puts_the_error_first_with_how_to_resume(user):
    job = make_job(user, simple_rows(3))
    lifecycle.job_fail(job_id=job.id, error=QUOTA)
    out = io.StringIO()

    call_command("jobs", "show", str(job.id), stdout=out)

    lines = out.getvalue().splitlines()
    assert lines[:3] == [
        f"Job {job.id}",
        f"  ERROR: {QUOTA}",
        f"  Its unfinished rows are kept: `manage.py jobs resume {job.id}` runs them once the cause "
        "is fixed.",
    ]


def test_the_admin_page_of_a_failed_job_shows_its_error_at_the_top(admin_client, user):
    job = make_job(user, simple_rows(3))
    lifecycle.job_fail(job_id=job.id, error=QUOTA)

    html = admin_client.get(f"/admin/jobs/extractjob/{job.pk}/change/").content.decode()

    stopped = html.index('id="job-stopped"')
    assert stopped < html.index('id="job-progress"')
    assert f"<strong>This job stopped with an error:</strong> {QUOTA.replace(chr(39), '&#x27;')}" in html


def test_a_job_without_an_error_has_no_such_banner(admin_client, user):
    job = make_job(user, simple_rows(1))

    assert (
        'id="job-stopped"'
        not in admin_client.get(f"/admin/jobs/extractjob/{job.pk}/change/").content.decode()
    )
