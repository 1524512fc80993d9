"""The admin and the API agree on who may see, cancel and export another
user's jobs: seeing and exporting need jobs.view_extractjob, cancelling also
jobs.change_extractjob, and only staff hold them (issue 19)."""

import pytest
from django.test import Client

from jobs.models import ExtractJob, Property
from jobs.services import lifecycle
from tests.conftest import grant, token_client
from tests.factories import make_job, property_dict

pytestmark = pytest.mark.django_db

ADMIN_JOBS = "/admin/jobs/extractjob/"
ROLES = {
    #                     staff, permissions
    "user": (False, ()),
    "user_with_view": (False, ("view_extractjob",)),
    "user_with_both": (False, ("view_extractjob", "change_extractjob")),
    "staff": (True, ()),
    "staff_with_view": (True, ("view_extractjob",)),
    "staff_with_change": (True, ("change_extractjob",)),
    "staff_with_both": (True, ("view_extractjob", "change_extractjob")),
}
# What each role may do to another user's job: see it, export its
# properties, cancel it. The admin's answer for its job list comes first.
EXPECTED = {
    "user": ("login", False, False, False),
    "user_with_view": ("login", False, False, False),
    "user_with_both": ("login", False, False, False),
    "staff": (403, False, False, False),
    "staff_with_view": (200, True, True, False),
    "staff_with_change": (403, False, False, False),
    "staff_with_both": (200, True, True, True),
}


@pytest.fixture
def theirs(other_user):
    job = make_job(other_user)
    ExtractJob.objects.filter(pk=job.pk).update(state="running")
    row = job.rows.get(index=0)
    Property.objects.create(job=job, row=row, row_index=0, position=0, **property_dict("Their property."))
    return job


def person(django_user_model, role: str):
    staff, permissions = ROLES[role]
    member = django_user_model.objects.create_user(role, password="x", is_staff=staff)
    return grant(member, *permissions) if permissions else member


def in_the_admin(member, job) -> tuple:
    client = Client()
    client.force_login(member)
    listed = client.get(ADMIN_JOBS)
    page = client.get(f"{ADMIN_JOBS}{job.pk}/change/")
    exported = client.post(ADMIN_JOBS, {"action": "export_csv", "_selected_action": [str(job.pk)]})
    export_holds_it = exported.status_code == 200 and b"Their property." in b"".join(
        exported.streaming_content
    )
    client.post(f"{ADMIN_JOBS}{job.pk}/cancel/")
    client.post(ADMIN_JOBS, {"action": "cancel_jobs", "_selected_action": [str(job.pk)]})
    job.refresh_from_db()
    list_answer = "login" if listed.status_code == 302 else listed.status_code
    if list_answer == 200:
        assert page.status_code == 200
    return list_answer, page.status_code == 200, export_holds_it, job.state == "cancelled"


def in_the_api(member, job) -> tuple:
    api = token_client(member)
    seen = api.get(f"/api/jobs/{job.pk}/").status_code
    exported = api.get(f"/api/jobs/{job.pk}/properties/", {"format": "csv"})
    export_holds_it = exported.status_code == 200 and b"Their property." in b"".join(
        exported.streaming_content
    )
    api.post(f"/api/jobs/{job.pk}/cancel/")
    job.refresh_from_db()
    assert seen in (200, 404)
    return seen == 200, export_holds_it, job.state == "cancelled"


@pytest.mark.parametrize("role", list(ROLES))
def test_the_admin_grants_what_the_api_grants(django_user_model, theirs, role):
    member = person(django_user_model, role)

    admin_answers = in_the_admin(member, theirs)

    assert admin_answers == EXPECTED[role]


@pytest.mark.parametrize("role", list(ROLES))
def test_the_api_grants_what_the_admin_grants(django_user_model, theirs, role):
    member = person(django_user_model, role)

    api_answers = in_the_api(member, theirs)

    assert api_answers == EXPECTED[role][1:]


def test_staff_with_the_view_permission_may_still_cancel_their_own_jobs_in_the_api(django_user_model):
    member = person(django_user_model, "staff_with_view")
    job = make_job(member)

    assert token_client(member).post(f"/api/jobs/{job.pk}/cancel/").json()["state"] == "cancelled"


def test_rows_and_properties_pages_need_the_permission_to_see_jobs(django_user_model, theirs):
    member = person(django_user_model, "staff")
    member = grant(member, "view_extractrow", "view_property")
    client = Client()
    client.force_login(member)

    assert client.get("/admin/jobs/property/").status_code == 403
    assert client.get("/admin/jobs/extractrow/").status_code == 403
    member = grant(member, "view_extractjob")
    client.force_login(member)
    assert client.get("/admin/jobs/property/").status_code == 200


def test_a_cancel_in_the_admin_goes_through_the_service(django_user_model, theirs):
    member = person(django_user_model, "staff_with_both")
    client = Client()
    client.force_login(member)

    client.post(f"{ADMIN_JOBS}{theirs.pk}/cancel/")

    theirs.refresh_from_db()
    assert (theirs.state, theirs.cancelled_at is not None) == ("cancelled", True)
    assert lifecycle.job_cancel(job=theirs).cancelled_now is False
