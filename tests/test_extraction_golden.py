"""Whole transcripts rendered exactly as the extraction LLM sees them.
After a deliberate change to the rendering, regenerate the files and read
the diff before committing it."""

import json
from pathlib import Path

import pytest

from extraction.render import render_row
from tests.factories import pair_side_by_side

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"


@pytest.fixture(scope="module")
def demo_rows():
    return [json.loads(line) for line in (DATA / "airline_data_demo.jsonl").read_text().splitlines()]


def test_a_demo_transcript_renders_exactly_as_recorded(demo_rows):
    assert render_row(demo_rows[0], "single_model") == (GOLDEN / "single_model_row0.txt").read_text()


def test_a_demo_pair_renders_side_by_side_exactly_as_recorded(demo_rows):
    pair = pair_side_by_side(demo_rows)[0]
    assert render_row(pair, "side_by_side") == (GOLDEN / "side_by_side_pair0.txt").read_text()


def test_every_message_shape_renders_exactly_as_recorded():
    row = json.loads((GOLDEN / "every_shape.json").read_text())
    assert render_row(row, "single_model", include_scores=True) == (GOLDEN / "every_shape.txt").read_text()
