import json
from pathlib import Path

import pytest

from extraction.render import render_response, render_row
from tests.factories import pair_side_by_side

DEMO_PATH = Path(__file__).parent / "data" / "airline_data_demo.jsonl"
BASE64_PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"


def demo_rows() -> list[dict]:
    with DEMO_PATH.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def test_render_response_returns_a_plain_string_stripped():
    assert render_response("  The answer is 4.\n") == "The answer is 4."


def test_render_response_renders_each_message_under_its_role():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]

    assert render_response(messages) == "[system]\nBe brief.\n\n[user]\n2+2?\n\n[assistant]\n4"


def test_render_response_omits_messages_with_empty_content():
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": []},
        {"role": "assistant", "content": "hello"},
    ]

    assert render_response(messages) == "[user]\nhi\n\n[assistant]\nhello"


def test_render_response_renders_a_list_of_content_parts():
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture?"},
            "and this one",
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            {"type": "input_image", "image_url": "https://example.com/dog.png"},
        ],
    }

    assert render_response([message]) == (
        "[user]\nWhat is in this picture?\nand this one\n"
        "[image: https://example.com/cat.png]\n[image: https://example.com/dog.png]"
    )


def test_render_response_never_pastes_base64_image_data():
    message = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": BASE64_PNG}},
            {"type": "input_image", "image_url": BASE64_PNG},
            {"type": "image", "source": {"type": "base64", "data": "iVBORw0KGgo"}},
            {"type": "audio", "data": BASE64_PNG},
        ],
    }

    rendered = render_response([message])

    assert rendered == (
        "[user]\n[image: inline data]\n[image: inline data]\n[image: inline data]\n"
        '{"type":"audio","data":"[inline data]"}'
    )
    assert "iVBOR" not in rendered


def test_render_response_renders_a_dict_content_with_text_and_flat_tool_calls():
    message = {
        "role": "assistant",
        "content": {
            "text": "Let me look you up.",
            "tool_calls": [
                {"name": "get_user_details", "arguments": '{"user_id": "mia_li_3668"}', "id": "c1"}
            ],
        },
    }

    assert render_response([message]) == (
        '[assistant]\nLet me look you up.\ncall get_user_details with {"user_id":"mia_li_3668"}'
    )


def test_render_response_renders_openai_shaped_tool_calls_on_the_message():
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {
                    "name": "search_flights",
                    "arguments": '{"origin": "JFK", "date": "2024-05-20"}',
                },
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "list_all_airports", "arguments": "{}"},
            },
        ],
    }

    assert render_response([message]) == (
        '[assistant]\ncall search_flights with {"origin":"JFK","date":"2024-05-20"}\n'
        "call list_all_airports with {}"
    )


@pytest.mark.parametrize(
    ("arguments", "shown"),
    [
        ({"user_id": "u1", "flags": [1, 2]}, '{"user_id":"u1","flags":[1,2]}'),
        ("not json at all", "not json at all"),
        ('{"broken": ', '{"broken":'),
        (None, "{}"),
        ("", "{}"),
    ],
)
def test_render_response_shows_tool_call_arguments_compactly(arguments, shown):
    message = {"role": "assistant", "tool_calls": [{"name": "lookup", "arguments": arguments}]}

    assert render_response([message]) == f"[assistant]\ncall lookup with {shown}"


def test_render_response_labels_a_tool_output_with_its_name():
    messages = [{"role": "tool", "name": "get_user_details", "tool_call_id": "c1", "content": '{"id": 1}'}]

    assert render_response(messages) == '[tool: get_user_details]\n{"id": 1}'


def test_render_response_labels_a_tool_output_from_the_earlier_call_id():
    messages = [
        {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "first", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "assistant", "content": {"text": "", "tool_calls": [{"id": "c2", "name": "second"}]}},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "two"}]},
        {"role": "tool", "tool_call_id": "unknown", "content": "three"},
    ]

    assert render_response(messages) == (
        "[assistant]\ncall first with {}\n\n[tool: first]\none\n\n"
        "[assistant]\ncall second with {}\n\n[tool: second]\ntwo\n\n[tool]\nthree"
    )


def test_render_response_renders_odd_shapes_as_compact_json():
    messages = [
        "a bare string message",
        {"role": "assistant", "content": 42},
        {"role": "assistant", "content": {"answer": {"value": 1}}},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}, 7, None]},
        {"content": "no role"},
        17,
        None,
    ]

    assert render_response(messages) == (
        "a bare string message\n\n[assistant]\n42\n\n"
        '[assistant]\n{"answer":{"value":1}}\n\n'
        '[assistant]\n{"type":"refusal","refusal":"no"}\n7\n\n'
        "[message]\nno role\n\n17"
    )


@pytest.mark.parametrize(
    ("response", "rendered"),
    [
        (None, ""),
        (3.5, "3.5"),
        ({"text": "just text"}, "just text"),
        ({"role": "assistant", "content": "one message"}, "[assistant]\none message"),
        ([], ""),
    ],
)
def test_render_response_accepts_any_top_level_shape(response, rendered):
    assert render_response(response) == rendered


def test_render_response_cuts_circular_content_at_a_fixed_depth():
    content = {"kind": "loop"}
    content["self"] = content

    rendered = render_response([{"role": "user", "content": [content]}])

    assert rendered == "[user]\n" + '{"kind":"loop","self":' * 31 + '"..."' + "}" * 31


def test_render_row_single_model_shows_the_prompt_then_the_response():
    row = {"prompt": "What is 2+2?", "model": "gpt-4o", "model_response": "4"}

    assert render_row(row, "single_model") == "# User prompt\nWhat is 2+2?\n\n# Model response\n4"


def test_render_row_single_model_shows_the_prompt_with_a_message_list():
    row = {"prompt": 7, "model": "m", "model_response": [{"role": "assistant", "content": "seven"}]}

    assert render_row(row, "single_model") == "# User prompt\n7\n\n# Model response\n[assistant]\nseven"


def test_render_row_side_by_side_uses_labels_not_model_names():
    row = {
        "prompt": "Say hi",
        "model_a": "gpt-4o",
        "model_b": "claude-sonnet-35",
        "model_a_response": "Hi!",
        "model_b_response": [{"role": "assistant", "content": "Hello."}],
    }

    rendered = render_row(row, "side_by_side")

    assert rendered == (
        "# User prompt\nSay hi\n\n"
        "=== Model A response ===\nHi!\n=== end of Model A response ===\n\n"
        "=== Model B response ===\n[assistant]\nHello.\n=== end of Model B response ==="
    )
    assert "gpt-4o" not in rendered
    assert "claude" not in rendered


def test_render_row_leaves_scores_out_unless_asked():
    row = {"prompt": "p", "model": "m", "model_response": "r", "score": 1}

    assert render_row(row, "single_model") == "# User prompt\np\n\n# Model response\nr"


def test_render_row_adds_a_bare_number_score_when_asked():
    row = {"prompt": "p", "model": "m", "model_response": "r", "score": 1}

    assert render_row(row, "single_model", include_scores=True) == (
        '# User prompt\np\n\n# Model response\nr\n\n# Scores\nScores: {"score": 1}'
    )


def test_render_row_adds_side_by_side_scores_and_the_winner_as_a_label():
    row = {
        "prompt": "p",
        "model_a": "gpt-4o",
        "model_b": "claude",
        "model_a_response": "a",
        "model_b_response": "b",
        "score_a": {"accuracy": 1},
        "score_b": 0.5,
        "winner": "Claude",
    }

    rendered = render_row(row, "side_by_side", include_scores=True)

    assert rendered.endswith(
        '# Scores\nModel A scores: {"accuracy": 1}\nModel B scores: {"score": 0.5}\nWinner: Model B'
    )
    assert "laude" not in rendered


@pytest.mark.parametrize(
    ("winner", "label"), [("gpt-4o", "Model A"), ("model_a", "Model A"), ("B", "Model B"), ("tie", "tie")]
)
def test_render_row_maps_the_winner_to_a_label(winner, label):
    row = {"prompt": "p", "model_a": "gpt-4o", "model_b": "claude", "model_a_response": "a"}
    row |= {"model_b_response": "b", "winner": winner}

    assert render_row(row, "side_by_side", include_scores=True).endswith(f"# Scores\nWinner: {label}")


def test_render_row_omits_the_scores_section_when_there_are_none():
    row = {"prompt": "p", "model": "m", "model_response": "r"}

    assert render_row(row, "single_model", include_scores=True) == "# User prompt\np\n\n# Model response\nr"


def test_render_row_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'pairwise'"):
        render_row({"prompt": "p"}, "pairwise")


def test_render_row_renders_every_demo_row_with_its_tool_calls():
    for row in demo_rows():
        rendered = render_row(row, "single_model")

        assert rendered.startswith(
            "# User prompt\n" + row["prompt"].strip() + "\n\n# Model response\n[info: "
        )
        for message in row["model_response"]:
            for call in message["content"].get("tool_calls", []):
                assert f"call {call['name']} with " in rendered
            if message["role"] == "tool" and message["content"]["text"]:
                assert f"[tool: {message['name']}]" in rendered


def test_render_row_shows_the_first_demo_call_with_compact_arguments():
    rendered = render_row(demo_rows()[0], "single_model")

    assert 'call get_user_details with {"user_id":"mia_li_3668"}' in rendered


def test_render_row_renders_demo_pairs_side_by_side():
    for row in pair_side_by_side(demo_rows()):
        rendered = render_row(row, "side_by_side")

        assert rendered.startswith(
            "# User prompt\n" + row["prompt"].strip() + "\n\n=== Model A response ===\n"
        )
        assert rendered.endswith("\n=== end of Model B response ===")
        assert "\n=== end of Model A response ===\n\n=== Model B response ===\n" in rendered
