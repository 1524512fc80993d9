import hashlib
import json
from pathlib import Path

import pytest

from extraction.rows import (
    RowError,
    encode_row,
    holds_lone_surrogates,
    input_index_for,
    question_id_for,
    validate_rows,
)

DEMO_PATH = Path(__file__).parent / "data" / "airline_data_demo.jsonl"


def demo_rows() -> list[dict]:
    with DEMO_PATH.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def single(**overrides) -> dict:
    return {"prompt": "Book a flight", "model": "gpt-4o", "model_response": "Done.", **overrides}


def side(**overrides) -> dict:
    row = {
        "prompt": "Book a flight",
        "model_a": "gpt-4o",
        "model_b": "claude",
        "model_a_response": "Done.",
        "model_b_response": "Which date?",
    }
    return {**row, **overrides}


def raised(rows, method=None) -> RowError:
    with pytest.raises(RowError) as info:
        validate_rows(rows, method)
    return info.value


def test_validate_rows_detects_single_model_in_demo_data():
    assert validate_rows(demo_rows()) == "single_model"


def test_validate_rows_detects_side_by_side():
    assert validate_rows([side()]) == "side_by_side"


def test_validate_rows_uses_the_given_method():
    assert validate_rows([side()], "side_by_side") == "side_by_side"


def test_validate_rows_detects_when_method_is_empty_string():
    assert validate_rows([single()], "") == "single_model"


@pytest.mark.parametrize(
    ("rows", "found"), [({"prompt": "x"}, "object"), ("rows", "string"), (None, "null"), (3, "number")]
)
def test_validate_rows_rejects_rows_that_are_not_a_list(rows, found):
    error = raised(rows)

    assert (error.field, error.index) == ("rows", None)
    assert error.message == f"rows: expected a list of row objects, got {found}"


def test_validate_rows_rejects_an_empty_list():
    error = raised([])

    assert (error.field, error.index, error.message) == (
        "rows",
        None,
        "rows: the list is empty; send at least one row",
    )


def test_validate_rows_rejects_an_item_that_is_not_an_object():
    error = raised([single(), ["prompt", "model"]])

    assert (error.field, error.index, error.message) == (
        "rows[1]",
        1,
        "rows[1]: expected a JSON object, got array",
    )


def test_validate_rows_rejects_an_unknown_method():
    error = raised([single()], "pairwise")

    assert (error.field, error.index, error.message) == (
        "method",
        None,
        "method: unknown method 'pairwise'; expected one of single_model, side_by_side",
    )


def test_validate_rows_rejects_rows_whose_method_cannot_be_detected():
    error = raised([{"prompt": "x", "answer": "y"}])

    assert (error.field, error.index) == ("rows[0]", 0)
    assert error.message == (
        "rows[0]: cannot detect the method: the row has neither model_response (single_model) "
        "nor model_a_response and model_b_response (side_by_side); the row has prompt, answer"
    )


def test_validate_rows_names_the_missing_column():
    rows = [single(), single(), single(), {"prompt": "x", "model": "m"}]

    error = raised(rows)

    assert (error.field, error.index) == ("rows[3].model_response", 3)
    assert error.message == (
        "rows[3]: missing column 'model_response' "
        "(single_model needs prompt, model, model_response; the row has prompt, model)"
    )
    assert str(error) == error.message
    assert isinstance(error, ValueError)


def test_validate_rows_names_several_missing_columns():
    error = raised([{"prompt": "x", "model_a_response": "a", "model_b_response": "b"}])

    assert (error.field, error.index) == ("rows[0].model_a", 0)
    assert error.message == (
        "rows[0]: missing columns 'model_a', 'model_b' (side_by_side needs prompt, model_a, model_b, "
        "model_a_response, model_b_response; the row has prompt, model_a_response, model_b_response)"
    )


@pytest.mark.parametrize("empty", [None, "", []])
def test_validate_rows_rejects_an_empty_required_column(empty):
    error = raised([single(model_response=empty)])

    assert (error.field, error.index) == ("rows[0].model_response", 0)
    assert error.message == (
        "rows[0]: empty column 'model_response' "
        "(single_model needs prompt, model, model_response; the row has prompt, model, model_response)"
    )


def test_validate_rows_reports_missing_and_empty_columns_together():
    error = raised([{"prompt": "", "model_response": "x"}])

    assert error.field == "rows[0].model"
    assert error.message == (
        "rows[0]: missing column 'model' and empty column 'prompt' "
        "(single_model needs prompt, model, model_response; the row has prompt, model_response)"
    )


def test_validate_rows_checks_columns_of_the_given_method():
    error = raised([single()], "side_by_side")

    assert error.field == "rows[0].model_a"
    assert error.message.startswith("rows[0]: missing columns 'model_a', 'model_b', 'model_a_response'")


def test_validate_rows_accepts_numbers_as_prompt_and_model():
    assert validate_rows([single(prompt=12, model=4.5, question_id=7)]) == "single_model"


@pytest.mark.parametrize(
    ("column", "value", "found"),
    [("prompt", ["x"], "array"), ("model", True, "boolean"), ("model", {"name": "m"}, "object")],
)
def test_validate_rows_rejects_a_prompt_or_model_that_is_not_text(column, value, found):
    error = raised([single(), single(**{column: value})])

    assert (error.field, error.index) == (f"rows[1].{column}", 1)
    assert error.message == f"rows[1].{column}: expected a string, got {found}"


def test_validate_rows_rejects_model_names_of_side_by_side_that_are_not_text():
    error = raised([side(model_b=["claude"])])

    assert (error.field, error.message) == (
        "rows[0].model_b",
        "rows[0].model_b: expected a string, got array",
    )


@pytest.mark.parametrize("response", ["text", {"text": "hi"}, [{"role": "assistant", "content": "hi"}]])
def test_validate_rows_accepts_each_response_shape(response):
    assert validate_rows([single(model_response=response)]) == "single_model"


def test_validate_rows_rejects_a_response_of_another_type():
    error = raised([single(model_response=42)])

    assert (error.field, error.index) == ("rows[0].model_response", 0)
    assert error.message == (
        "rows[0].model_response: expected a string, an object or a list of chat messages, got number"
    )


def test_validate_rows_rejects_a_message_list_with_a_non_object():
    error = raised([side(model_b_response=[{"role": "user", "content": "hi"}, "bye"])])

    assert (error.field, error.index) == ("rows[0].model_b_response", 0)
    assert error.message == "rows[0].model_b_response[1]: expected a chat message object, got string"


def test_validate_rows_rejects_a_question_id_that_is_not_a_string_or_number():
    error = raised([single(question_id=["q1"])])

    assert (error.field, error.message) == (
        "rows[0].question_id",
        "rows[0].question_id: expected a string or a number, got array",
    )


@pytest.mark.parametrize("score", [1, 0.5, {"accuracy": 1, "helpfulness": 0.25}, None])
def test_validate_rows_accepts_number_or_metric_scores(score):
    assert validate_rows([single(score=score)]) == "single_model"


def test_validate_rows_rejects_a_score_of_another_type():
    error = raised([side(score_a="high")])

    assert (error.field, error.message) == (
        "rows[0].score_a",
        "rows[0].score_a: expected a number or an object of metric to number, got string",
    )


def test_validate_rows_rejects_a_metric_that_is_not_a_number():
    error = raised([single(score={"accuracy": "1"})])

    assert (error.field, error.message) == (
        "rows[0].score.accuracy",
        "rows[0].score.accuracy: expected a number, got string",
    )


def test_validate_rows_rejects_a_winner_that_is_not_a_string():
    error = raised([side(winner=1)])

    assert (error.field, error.message) == ("rows[0].winner", "rows[0].winner: expected a string, got number")


def test_question_id_for_uses_the_given_id():
    assert question_id_for(single(question_id="abc"), 0) == "abc"
    assert question_id_for(single(question_id=17), 0) == "17"


def test_question_id_for_derives_a_stable_id_from_the_prompt():
    expected = "q-" + hashlib.sha1(b"Book a flight").hexdigest()[:12]

    assert question_id_for(single(), 0) == expected
    assert question_id_for(single(model="claude", question_id=None), 5) == expected
    assert question_id_for(side(), 9) == expected


def test_question_id_for_differs_between_prompts():
    assert question_id_for(single(prompt="a"), 0) != question_id_for(single(prompt="b"), 0)


def test_question_id_for_gives_demo_rows_of_one_prompt_the_same_id():
    ids = {}
    for index, row in enumerate(demo_rows()):
        ids.setdefault(row["prompt"], set()).add(question_id_for(row, index))

    assert len(ids) == 50
    assert {len(group) for group in ids.values()} == {1}
    assert len({group.pop() for group in ids.values()}) == 50


def test_encode_row_writes_the_demo_rows_exactly_as_the_standard_library_would():
    rows = demo_rows()

    assert [encode_row(row) for row in rows] == [stdlib_text(row) for row in rows]


@pytest.mark.parametrize(
    "row",
    [
        {"score": 10**30, "prompt": "p"},  # beyond 64 bits: orjson refuses it
        {1: "a non-string key"},
        {"text": 'café ✈ \u2028 "quoted" \\ back\nslash', "nested": [{"a": None, "b": True, "c": 1.5}]},
    ],
)
def test_encode_row_writes_what_orjson_refuses_as_the_standard_library_would(row):
    assert encode_row(row) == stdlib_text(row)
    assert json.loads(encode_row(row)) == json.loads(stdlib_text(row))


@pytest.mark.parametrize(
    ("text", "lone"),
    [
        ('{"rows": [{"prompt": "a \\ud800 b"}]}', True),
        ('["\\uDFFF"]', True),
        ('{"prompt": "a pair \\ud83d\\ude00 is one character"}', False),
        ('{"prompt": "a backslash and u: \\\\ud800 is text"}', False),
    ],
)
def test_holds_lone_surrogates_finds_half_a_pair_only(text, lone):
    assert holds_lone_surrogates(text, json.loads(text)) is lone
    assert holds_lone_surrogates(text.encode(), json.loads(text)) is lone


def stdlib_text(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (14, 14),
        (0, 0),
        (2**31 - 1, 2**31 - 1),
        (2**31, 5),  # more than the database column holds
        (-1, 5),
        (True, 5),  # a boolean is not an index
        (3.0, 5),
        ("14", 5),
        (None, 5),
    ],
)
def test_input_index_is_the_rows_own_integer_index_else_its_position(value, expected):
    assert input_index_for(single(__index=value), 5) == expected
    assert input_index_for(single(), 5) == 5
