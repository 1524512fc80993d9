import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from extraction.extract import RowOutcome
from jobs import exports
from jobs.formatting import format_duration
from jobs.models import ExtractJob, ExtractRow, JobState, Property, RowStatus, WorkerSlots
from jobs.services import claims, grants, lifecycle
from tests import factories
from tests.factories import done_outcome, make_job, property_dict, simple_rows

pytestmark = pytest.mark.django_db

JOBS_URL = "/admin/jobs/extractjob/"
PROPERTIES_URL = "/admin/jobs/property/"
ROWS_URL = "/admin/jobs/extractrow/"
ROW_ERROR = "no valid property in the answer: expected a JSON list of properties"


def failed_outcome() -> RowOutcome:
    return RowOutcome(
        error=ROW_ERROR, raw_answer="I cannot help.", prompt_tokens=100, completion_tokens=10, attempts=2
    )


def run_rows(job: ExtractJob, outcomes: list[RowOutcome]) -> ExtractJob:
    """Run the job's first rows through the services, as a worker does."""
    lifecycle.job_mark_running(job_id=job.id)
    claim = claims.claim_rows(job_id=job.id, worker_id="w1", limit=len(outcomes))
    for row, outcome in zip(claim.rows, outcomes, strict=True):
        factories.record_row_result(
            job_id=job.id, row_id=row.id, row_index=row.index, worker_id="w1", outcome=outcome
        )
    job.refresh_from_db()
    return job


@pytest.fixture
def jobs(user, other_user) -> dict[str, ExtractJob]:
    """One job in each state; the done one has a price and fixed timestamps."""
    queued = make_job(user)
    running = run_rows(make_job(user, simple_rows(4)), [done_outcome(2), failed_outcome()])
    done = run_rows(make_job(other_user, simple_rows(2), model_name="gpt-4o-mini"), [done_outcome(1)] * 2)
    started = timezone.now() - timedelta(hours=1)
    ExtractJob.objects.filter(pk=done.pk).update(
        started_at=started, finished_at=started + timedelta(seconds=125)
    )
    error = make_job(other_user)
    lifecycle.job_mark_running(job_id=error.id)
    lifecycle.job_fail(job_id=error.id, error="the LLM refused the API key")
    cancelled = lifecycle.job_cancel(job=make_job(user)).job
    every = {"queued": queued, "running": running, "done": done, "error": error, "cancelled": cancelled}
    for job in every.values():
        job.refresh_from_db()
    return every


def staff_client(django_user_model, username: str, *codenames: str) -> Client:
    user = django_user_model.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer(django_user_model) -> Client:
    """Staff who may look at jobs, rows and properties but not cancel."""
    return staff_client(django_user_model, "viewer", "view_extractjob", "view_extractrow", "view_property")


@pytest.fixture
def canceller(django_user_model) -> Client:
    return staff_client(django_user_model, "canceller", "view_extractjob", "change_extractjob")


@pytest.fixture
def staff_without_permissions(django_user_model) -> Client:
    return staff_client(django_user_model, "nobody")


def change_url(job) -> str:
    return f"{JOBS_URL}{job.pk}/change/"


def listed_ids(response) -> list[str]:
    return [str(job.pk) for job in response.context["cl"].result_list]


def cells_of(html: str, job) -> dict[str, str]:
    """The rendered cells of a job's row in the changelist, by column."""
    row = re.search(rf'<tr>(?:(?!</tr>).)*value="{job.pk}"(?:(?!</tr>).)*</tr>', html, re.DOTALL).group(0)
    return dict(re.findall(r'<t[dh] class="field-(\w+)[^"]*"[^>]*>(.*?)</t[dh]>', row, re.DOTALL))


def message_texts(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def bulk_jobs(count: int, owners) -> list[ExtractJob]:
    return ExtractJob.objects.bulk_create(
        ExtractJob(
            owner=owners[number % len(owners)],
            method="single_model",
            system_prompt="default",
            resolved_system_prompt="You are a careful assistant.",
            model_name=f"model-{number % 3}",
            temperature=0.6,
            top_p=0.95,
            max_tokens=2048,
            max_workers=8,
            count_total=10,
            count_done=number % 11,
        )
        for number in range(count)
    )


def test_job_list_renders_every_column_with_state_colours(admin_client, jobs):
    html = admin_client.get(JOBS_URL).content.decode()

    badges = {state: cells_of(html, job)["state_badge"] for state, job in jobs.items()}
    assert badges == {
        "queued": '<span class="job-state" style="background-color: #6c757d">queued</span>',
        "running": '<span class="job-state" style="background-color: #0d6efd">running</span>',
        "done": '<span class="job-state" style="background-color: #198754">done</span>',
        "error": '<span class="job-state" style="background-color: #dc3545">error</span>',
        "cancelled": '<span class="job-state" style="background-color: #fd7e14">cancelled</span>',
    }
    running = cells_of(html, jobs["running"])
    assert running["progress"] == (
        '<div class="job-progress" title="50%"><div class="job-progress-bar" style="width: 50.0%"></div>'
        '</div><span class="job-counts">1 done, 1 failed of 4</span>'
    )
    assert (running["owner"], running["tokens"], running["cost"]) == ("alice", "250", "—")
    pk = jobs["running"].pk
    assert running["properties"] == f'<a href="{PROPERTIES_URL}?job={pk}">2</a>'
    assert (
        running["short_id"]
        == f'<a href="{JOBS_URL}{pk}/change/"><span class="job-id" title="{pk}">{str(pk)[:8]}</span></a>'
    )
    assert running["model_name"] == "sim-model"
    done = cells_of(html, jobs["done"])
    # 200 prompt and 80 completion tokens at gpt-4o-mini's $0.15 and $0.60 per million.
    assert (done["owner"], done["tokens"], done["cost"], done["duration"]) == (
        "bob",
        "280",
        "$0.000078",
        "2 min 05 s",
    )
    assert cells_of(html, jobs["queued"])["duration"] == "—"


def test_job_list_is_sorted_newest_first(admin_client, jobs):
    expected = [str(pk) for pk in ExtractJob.objects.order_by("-created_at").values_list("pk", flat=True)]

    assert listed_ids(admin_client.get(JOBS_URL)) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"state__exact": "running"}, ["running"]),
        ({"state__exact": "cancelled"}, ["cancelled"]),
        ({"model_name": "gpt-4o-mini"}, ["done"]),
    ],
)
def test_job_list_filters_by_state_and_model(admin_client, jobs, query, expected):
    ids = listed_ids(admin_client.get(JOBS_URL, query))

    assert ids == [str(jobs[state].pk) for state in expected]


def test_job_list_shows_and_filters_one_row_jobs_from_extract_single(admin_client, jobs):
    ExtractJob.objects.filter(pk=jobs["done"].pk).update(kind="single")

    html = admin_client.get(JOBS_URL).content.decode()
    ids = listed_ids(admin_client.get(JOBS_URL, {"kind__exact": "single"}))

    assert [cells_of(html, jobs[state])["kind"] for state in ("done", "running")] == ["Single", "Rows"]
    assert ids == [str(jobs["done"].pk)]


def test_job_list_filters_by_owner(admin_client, jobs, other_user):
    ids = listed_ids(admin_client.get(JOBS_URL, {"owner__id__exact": other_user.pk}))

    assert sorted(ids) == sorted([str(jobs["done"].pk), str(jobs["error"].pk)])


def test_job_list_filters_by_creation_date(admin_client, jobs):
    ExtractJob.objects.filter(pk=jobs["error"].pk).update(created_at=timezone.now() - timedelta(days=10))
    # The "Past 7 days" choice.
    week_ago = (timezone.now() - timedelta(days=7)).isoformat()

    ids = listed_ids(admin_client.get(JOBS_URL, {"created_at__gte": week_ago}))

    assert sorted(ids) == sorted(str(jobs[state].pk) for state in ("queued", "running", "done", "cancelled"))


def test_job_list_search_finds_a_job_by_its_id_or_the_start_of_it(admin_client, jobs):
    job_id = str(jobs["done"].pk)

    for term in (
        job_id,
        job_id.upper(),
        job_id.replace("-", ""),
        job_id[:8],
        job_id[:13],
        f" {job_id[:10]} ",
    ):
        assert listed_ids(admin_client.get(JOBS_URL, {"q": term})) == [job_id], term


def test_job_list_search_finds_jobs_by_owner_username(admin_client, jobs):
    ids = listed_ids(admin_client.get(JOBS_URL, {"q": "bob"}))

    assert sorted(ids) == sorted([str(jobs["done"].pk), str(jobs["error"].pk)])
    assert listed_ids(admin_client.get(JOBS_URL, {"q": "nobody-has-this-name"})) == []


def test_job_list_query_count_does_not_grow_with_the_number_of_jobs(
    admin_client, django_user_model, django_assert_max_num_queries
):
    owners = [django_user_model.objects.create_user(f"owner{n}") for n in range(5)]
    bulk_jobs(3, owners)
    with CaptureQueriesContext(connection) as few:
        admin_client.get(JOBS_URL)
    bulk_jobs(297, owners)

    with django_assert_max_num_queries(len(few.captured_queries)) as many:
        response = admin_client.get(JOBS_URL)

    assert len(response.context["cl"].result_list) == 100
    assert len(many.captured_queries) == len(few.captured_queries)


def test_job_list_opens_with_ten_thousand_jobs(admin_client, user):
    bulk_jobs(10_000, [user])

    response = admin_client.get(JOBS_URL)

    assert response.status_code == 200
    assert "10000 extract jobs" in response.content.decode()
    assert len(response.context["cl"].result_list) == 100


def run_action(client, action: str, jobs_selected, **extra):
    return client.post(
        JOBS_URL, {"action": action, "_selected_action": [str(job.pk) for job in jobs_selected]}, **extra
    )


def test_cancel_action_cancels_active_jobs_and_reports_the_finished(admin_client, jobs):
    response = run_action(
        admin_client, "cancel_jobs", [jobs["queued"], jobs["running"], jobs["done"]], follow=True
    )

    assert message_texts(response) == ["2 jobs cancelled; 1 already finished."]
    states = {
        state: ExtractJob.objects.get(pk=jobs[state].pk).state for state in ("queued", "running", "done")
    }
    assert states == {"queued": "cancelled", "running": "cancelled", "done": "done"}
    assert list(jobs["queued"].rows.values_list("status", flat=True)) == ["cancelled"] * 3
    assert list(jobs["running"].rows.order_by("index").values_list("status", flat=True)) == [
        "done",
        "failed",
        "cancelled",
        "cancelled",
    ]
    assert ExtractJob.objects.get(pk=jobs["running"].pk).properties_count == 2


def test_cancel_action_is_offered_only_with_the_change_permission(viewer, canceller, jobs):
    offered = {
        name: [choice for choice, _ in client.get(JOBS_URL).context["action_form"].fields["action"].choices]
        for name, client in (("viewer", viewer), ("canceller", canceller))
    }
    run_action(viewer, "cancel_jobs", [jobs["queued"]])

    assert offered == {
        "viewer": ["", "export_csv", "export_jsonl"],
        "canceller": ["", "cancel_jobs", "export_csv", "export_jsonl"],
    }
    assert ExtractJob.objects.get(pk=jobs["queued"].pk).state == "queued"


@pytest.mark.parametrize(("action", "export_format"), [("export_csv", "csv"), ("export_jsonl", "jsonl")])
def test_export_actions_stream_the_selected_jobs_properties(admin_client, jobs, action, export_format):
    selected = [jobs["running"], jobs["done"]]

    response = run_action(admin_client, action, selected)

    assert response.streaming is True
    assert response["Content-Type"] == exports.CONTENT_TYPES[export_format]
    assert re.fullmatch(
        rf'attachment; filename="properties-\d{{8}}-\d{{6}}\.{export_format}"',
        response["Content-Disposition"],
    )
    frame = factories.read_export(b"".join(response.streaming_content), export_format)
    read_back = frame.to_dict(orient="records")
    for record in read_back:
        record["evidence"] = list(record["evidence"])
        record["row_index"] = int(record["row_index"])
        record["contains_errors"] = bool(record["contains_errors"])
        record["unexpected_behavior"] = bool(record["unexpected_behavior"])
    stored = list(exports.property_records(Property.objects.filter(job__in=selected)))
    assert read_back == stored
    assert len(stored) == 4


def test_job_page_has_no_save_or_delete_and_a_posted_form_changes_nothing(admin_client, jobs):
    job = jobs["running"]
    before = ExtractJob.objects.filter(pk=job.pk).values().get()

    page = admin_client.get(change_url(job)).content.decode()
    response = admin_client.post(change_url(job), {"state": "done", "count_done": 4, "_save": "Save"})

    assert (re.findall(r'name="(_\w+)"', page), "deletelink" in page) == ([], False)
    assert response.status_code == 403
    assert ExtractJob.objects.filter(pk=job.pk).values().get() == before


@pytest.mark.parametrize(
    ("state", "shown"),
    [("queued", True), ("running", True), ("done", False), ("error", False), ("cancelled", False)],
)
def test_job_page_shows_the_cancel_button_only_while_the_job_is_active(admin_client, jobs, state, shown):
    page = admin_client.get(change_url(jobs[state])).content.decode()

    assert ("Cancel job</button>" in page) is shown
    assert ('id="job-state-colours"' in page) is shown  # it polls for progress only while active


def test_job_page_shows_no_cancel_button_without_the_change_permission(viewer, jobs):
    response = viewer.get(change_url(jobs["running"]))

    assert response.status_code == 200
    assert "Cancel job</button>" not in response.content.decode()
    assert response.context["can_cancel"] is False


def test_cancel_url_cancels_and_redirects_back_with_a_message(canceller, jobs):
    job = jobs["running"]

    first = canceller.post(f"{JOBS_URL}{job.pk}/cancel/")
    again = canceller.post(f"{JOBS_URL}{job.pk}/cancel/", follow=True)

    assert (first.status_code, first["Location"]) == (302, change_url(job))
    assert message_texts(again) == [
        "Job cancelled; 2 properties kept.",
        "Job already finished (state: cancelled).",
    ]
    assert ExtractJob.objects.get(pk=job.pk).state == "cancelled"
    assert "Cancel job</button>" not in again.content.decode()


def test_cancel_url_needs_post_the_change_permission_and_a_csrf_token(
    admin_user, viewer, staff_without_permissions, client, jobs
):
    url = f"{JOBS_URL}{jobs['running'].pk}/cancel/"
    csrf_checked = Client(enforce_csrf_checks=True)
    csrf_checked.force_login(admin_user)
    admin = Client()
    admin.force_login(admin_user)

    statuses = {
        "get": admin.get(url).status_code,
        "viewer": viewer.post(url).status_code,
        "no permissions": staff_without_permissions.post(url).status_code,
        "no csrf token": csrf_checked.post(url).status_code,
        "unknown job": admin.post(f"{JOBS_URL}00000000-0000-0000-0000-000000000000/cancel/").status_code,
    }
    anonymous = client.post(url)

    assert statuses == {
        "get": 405,
        "viewer": 403,
        "no permissions": 403,
        "no csrf token": 403,
        "unknown job": 404,
    }
    assert (anonymous.status_code, anonymous["Location"]) == (302, f"/admin/login/?next={url}")
    assert ExtractJob.objects.get(pk=jobs["running"].pk).state == "running"


def test_progress_endpoint_reports_the_jobs_counters(viewer, jobs):
    response = viewer.get(f"{JOBS_URL}{jobs['running'].pk}/progress/")

    assert response.json() == {
        "state": "running",
        "count_done": 1,
        "count_failed": 1,
        "count_total": 4,
        "properties_count": 2,
        "progress": 0.5,
    }


def test_progress_endpoint_is_for_staff_with_the_view_permission(
    staff_without_permissions, client, admin_client, jobs
):
    url = f"{JOBS_URL}{jobs['running'].pk}/progress/"

    assert staff_without_permissions.get(url).status_code == 403
    assert client.get(url)["Location"] == f"/admin/login/?next={url}"
    assert admin_client.get(f"{JOBS_URL}not-a-job/progress/").status_code == 404
    assert admin_client.post(url).status_code == 405


def test_job_page_shows_rows_fifty_a_page_with_their_errors(admin_client, user):
    job = make_job(user, simple_rows(120))
    ExtractRow.objects.filter(job=job, index=60).update(status=RowStatus.FAILED, error=ROW_ERROR, attempts=2)

    response = admin_client.get(change_url(job), {"rows_page": 2})

    page = response.context["rows_page"]
    assert [row["index"] for row in page] == list(range(50, 100))
    assert page[10] == {
        "index": 60,
        "question_id": "q60",
        "status": "failed",
        "attempts": 2,
        "error": ROW_ERROR,
    }
    html = response.content.decode()
    assert f'<td class="row-error">{ROW_ERROR}</td>' in html
    assert "Page 2 of 3 (120 rows)" in html


def test_job_page_of_ten_thousand_rows_reads_one_page_of_small_columns(admin_client, user):
    job = make_job(user, simple_rows(1))
    transcript = {"prompt": "x" * 2000, "model": "m", "model_response": "y" * 2000}
    ExtractRow.objects.bulk_create(
        (
            ExtractRow(job=job, index=index, question_id=f"q{index}", data=transcript)
            for index in range(1, 10_000)
        ),
        batch_size=1000,
    )

    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(change_url(job), {"rows_page": 200})

    assert [row["index"] for row in response.context["rows_page"]] == list(range(9950, 10_000))
    row_queries = [query["sql"] for query in queries.captured_queries if "jobs_extractrow" in query["sql"]]
    assert len(row_queries) == 2  # the count and the page
    assert [sql for sql in row_queries if '"data"' in sql or "raw_answer" in sql] == []
    assert "LIMIT 50" in row_queries[1]


def test_job_page_links_to_its_properties(admin_client, jobs):
    job = jobs["running"]
    page = admin_client.get(change_url(job)).content.decode()

    response = admin_client.get(PROPERTIES_URL, {"job": str(job.pk)})

    assert f'<a href="{PROPERTIES_URL}?job={job.pk}" id="job-properties-link">' in page
    listed = [prop.property_description for prop in response.context["cl"].result_list]
    assert sorted(listed) == ["Behaviour 0.", "Behaviour 1."]


@pytest.fixture
def described(user) -> ExtractJob:
    job = make_job(user, simple_rows(1))
    row = job.rows.get()
    specs = [
        ("Books the wrong flight.", "Negative", "Correctness", "model-a"),
        ("Asks for the user id first.", "Positive", "Process", "model-a"),
        ("Invents a flight number.", "Negative", "Hallucination", "model-b"),
    ]
    Property.objects.bulk_create(
        Property(
            job=job,
            row=row,
            row_index=0,
            position=position,
            **property_dict(text, behavior_type=kind, category=category, model=model),
        )
        for position, (text, kind, category, model) in enumerate(specs)
    )
    return job


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"behavior_type": "Negative"}, ["Books the wrong flight.", "Invents a flight number."]),
        ({"category": "Process"}, ["Asks for the user id first."]),
        ({"model": "model-b"}, ["Invents a flight number."]),
        ({"q": "flight"}, ["Books the wrong flight.", "Invents a flight number."]),
    ],
)
def test_property_list_filters_and_searches(admin_client, described, jobs, query, expected):
    response = admin_client.get(PROPERTIES_URL, query)

    assert sorted(prop.property_description for prop in response.context["cl"].result_list) == expected


def test_property_list_with_a_malformed_job_filter_shows_the_error_page(admin_client, described):
    response = admin_client.get(PROPERTIES_URL, {"job": "not-a-uuid"})

    assert (response.status_code, response["Location"]) == (302, f"{PROPERTIES_URL}?e=1")


def test_property_and_row_pages_are_view_only(admin_client, described):
    prop = described.properties.first()
    row = described.rows.get()
    prop_page = admin_client.get(f"{PROPERTIES_URL}{prop.pk}/change/").content.decode()

    statuses = {
        "add property": admin_client.get(f"{PROPERTIES_URL}add/").status_code,
        "post property": admin_client.post(
            f"{PROPERTIES_URL}{prop.pk}/change/", {"category": "x"}
        ).status_code,
        "delete property": admin_client.get(f"{PROPERTIES_URL}{prop.pk}/delete/").status_code,
        "post row": admin_client.post(f"{ROWS_URL}{row.pk}/change/", {"status": "done"}).status_code,
    }

    assert statuses == {"add property": 403, "post property": 403, "delete property": 403, "post row": 403}
    assert (re.findall(r'name="(_\w+)"', prop_page), "deletelink" in prop_page) == ([], False)
    assert Property.objects.get(pk=prop.pk).category == "Correctness"


def test_row_list_leaves_out_the_transcript_and_raw_answer(admin_client, jobs):
    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(ROWS_URL, {"job": str(jobs["running"].pk)})

    assert [row.index for row in response.context["cl"].result_list] == [0, 1, 2, 3]
    row_selects = [q["sql"] for q in queries.captured_queries if 'FROM "jobs_extractrow"' in q["sql"]]
    assert [sql for sql in row_selects if '"data"' in sql or "raw_answer" in sql] == []


@pytest.mark.parametrize(
    "url",
    [
        JOBS_URL,
        f"{JOBS_URL}{{job}}/change/",
        f"{JOBS_URL}{{job}}/progress/",
        PROPERTIES_URL,
        ROWS_URL,
    ],
)
def test_staff_without_job_permissions_get_403_on_job_pages(staff_without_permissions, jobs, url):
    response = staff_without_permissions.get(url.format(job=jobs["running"].pk))

    assert response.status_code == 403


def test_non_staff_users_are_sent_to_the_login_page(client, user, jobs):
    client.force_login(user)

    response = client.get(change_url(jobs["running"]))

    assert (response.status_code, response["Location"]) == (
        302,
        f"/admin/login/?next={change_url(jobs['running'])}",
    )


@pytest.mark.parametrize("model", ["schedule", "success", "failure", "ormq"])
def test_django_q_admin_pages_stay_available(admin_client, model):
    response = admin_client.get(f"/admin/django_q/{model}/")

    assert response.status_code == 200


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0 s"),
        (59.4, "59 s"),
        (60, "1 min 00 s"),
        (125, "2 min 05 s"),
        (3600, "1 h 00 min"),
        (7380, "2 h 03 min"),
    ],
)
def test_format_duration_reads_at_a_glance(seconds, shown):
    assert format_duration(timedelta(seconds=seconds)) == shown


def test_job_state_colours_cover_every_state():
    from jobs.admin import STATE_COLOURS

    assert set(STATE_COLOURS) == set(JobState)


def test_job_list_shows_the_workers_alive_their_calls_and_each_jobs_share(admin_client, jobs, settings):
    running = jobs["running"]
    grants.set_slots(job_id=running.id, worker_id="host-a:11:aa", slots=6, in_flight=0, wants=True)
    grants.set_slots(job_id=running.id, worker_id="host-b:12:bb", slots=2, in_flight=0, wants=True)
    claims.renew_leases(worker_id="host-a:11:aa", in_flight={running.id: 5})
    dead = timezone.now() - timedelta(seconds=settings.STRINGSIGHT_LEASE_SECONDS + 1)
    WorkerSlots.objects.filter(worker_id="host-b:12:bb").update(renewed_at=dead)

    html = admin_client.get(JOBS_URL).content.decode()

    block = html[html.index('id="workers-at-work"') :]
    assert "host-a:11:aa" in block
    assert "host-b:12:bb" not in block  # its grant lapsed: that worker is dead
    assert re.search(r'<td class="calls">5</td>', block)
    assert f"{str(running.id)[:8]}</a> (alice: 5 / 6)" in block


def test_job_list_says_when_no_worker_is_at_work(admin_client, jobs):
    html = admin_client.get(JOBS_URL).content.decode()

    assert "No worker holds a running job's calls right now." in html
