import pytest
from django.db import IntegrityError, transaction

from jobs.models import ExtractJob, ExtractRow, Property
from tests.factories import make_job, property_dict

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("done", "failed", "total", "progress"),
    [(0, 0, 4, 0.0), (1, 0, 4, 0.25), (2, 1, 4, 0.75), (3, 1, 4, 1.0), (0, 0, 0, 0.0)],
)
def test_progress_counts_finished_rows(done, failed, total, progress):
    job = ExtractJob(count_done=done, count_failed=failed, count_total=total)
    assert job.progress == progress


def test_total_tokens_adds_prompt_and_completion():
    assert ExtractJob(prompt_tokens=120, completion_tokens=30).total_tokens == 150


def test_a_job_holds_each_row_index_once(user):
    job = make_job(user)
    with pytest.raises(IntegrityError), transaction.atomic():
        ExtractRow.objects.create(job=job, index=0, question_id="dup", data={})


def test_a_row_holds_each_property_position_once(user):
    job = make_job(user)
    row = job.rows.get(index=0)
    Property.objects.create(job=job, row=row, row_index=0, position=0, **property_dict())
    with pytest.raises(IntegrityError), transaction.atomic():
        Property.objects.create(job=job, row=row, row_index=0, position=0, **property_dict("Again."))


def test_deleting_a_job_deletes_its_rows_and_properties(user):
    job = make_job(user)
    row = job.rows.get(index=0)
    Property.objects.create(job=job, row=row, row_index=0, position=0, **property_dict())

    job.delete()

    assert (ExtractRow.objects.count(), Property.objects.count()) == (0, 0)
