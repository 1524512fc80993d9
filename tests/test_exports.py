import pytest

from jobs import exports
from jobs.models import Property
from tests import factories
from tests.factories import make_job, property_dict

pytestmark = pytest.mark.django_db


@pytest.fixture
def stored(user):
    job = make_job(user)
    tricky = property_dict(
        'Says "hello", then a comma, then\na newline.',
        evidence=["quote, with comma", 'and "quotes"', "ünïcödé"],
        question_id="007",
        contains_errors=True,
    )
    for row in job.rows.order_by("index"):
        Property.objects.bulk_create(
            [
                # The caller's own index of the row (its __index).
                Property(
                    job=job, row=row, row_index=row.index, input_index=row.index + 100, position=0, **tricky
                ),
                # Stored before input_index was recorded: its position stands in.
                Property(
                    job=job, row=row, row_index=row.index, position=1, **property_dict(f"Row {row.index}.")
                ),
            ]
        )
    return job


def export(job, export_format) -> bytes:
    # As the API, the admin and the CLI call it.
    records = exports.export_records(Property.objects.filter(job=job), export_format)
    if export_format == "parquet":
        return factories.parquet_bytes(records)
    return "".join(exports.TEXT_WRITERS[export_format](records)).encode()


def from_the_orm(job) -> list[dict]:
    """What an export must hold, read through Django's own fields."""
    return [
        {
            "id": str(prop.id),
            "job_id": str(prop.job_id),
            "row_index": prop.row_index,
            "input_index": prop.row_index if prop.input_index is None else prop.input_index,
            **{
                name: getattr(prop, name)
                for name in exports.EXPORT_FIELDS
                if name not in ("id", "job_id", "row_index", "input_index")
            },
        }
        for prop in Property.objects.filter(job=job).order_by("row_index", "position")
    ]


def test_records_are_the_stored_properties_in_input_order(stored):
    assert list(exports.property_records(Property.objects.filter(job=stored))) == from_the_orm(stored)


@pytest.mark.parametrize("export_format", ["jsonl", "csv", "parquet"])
def test_every_format_round_trips_through_pandas(stored, export_format):
    expected = from_the_orm(stored)

    frame = factories.read_export(export(stored, export_format), export_format)

    read_back = frame.to_dict(orient="records")
    for record in read_back:
        record["evidence"] = list(record["evidence"])
        record["contains_errors"] = bool(record["contains_errors"])
        record["unexpected_behavior"] = bool(record["unexpected_behavior"])
        record["row_index"] = int(record["row_index"])
        record["input_index"] = int(record["input_index"])
    assert read_back == expected
    assert len(expected) == 6
    assert [record["input_index"] for record in expected] == [100, 0, 101, 1, 102, 2]
    assert expected[0]["question_id"] == "007"


@pytest.mark.parametrize("export_format", ["jsonl", "csv"])
def test_text_exports_write_non_ascii_evidence_as_it_is(stored, export_format):
    # SQLite stores JSON with "\u00fc" escapes; a spreadsheet must show "ü".
    text = export(stored, export_format).decode()
    assert "ünïcödé" in text
    assert "\\u00" not in text


def test_an_empty_export_still_has_its_header(user):
    job = make_job(user)
    assert export(job, "csv").decode().splitlines() == [",".join(exports.EXPORT_FIELDS)]
    assert export(job, "jsonl") == b""
