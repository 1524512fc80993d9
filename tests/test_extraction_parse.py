# Smart single quotes are this module's test input on purpose (the parser must read them).
# ruff: noqa: RUF001
import json
import random

import pytest

from extraction.parse import BEHAVIOR_TYPES, ParseResult, parse_properties

OUTPUT_KEYS = [
    "property_description",
    "category",
    "reason",
    "evidence",
    "behavior_type",
    "contains_errors",
    "unexpected_behavior",
    "model",
    "question_id",
]

ITEM_1 = {
    "property_description": "Asks for the user ID before looking up the booking",
    "category": "Policy",
    "reason": "The policy requires authentication first",
    "evidence": ["Could you please provide your user ID?"],
    "behavior_type": "Positive",
    "contains_errors": False,
    "unexpected_behavior": False,
}
ITEM_2 = {
    "property_description": "Invents a flight number the search never returned",
    "category": "Grounding",
    "reason": "The user may book a flight that does not exist",
    "evidence": ["Flight HAT999 departs at 9am"],
    "behavior_type": "Negative (critical)",
    "contains_errors": True,
    "unexpected_behavior": True,
}
ITEM_3 = {
    "property_description": "Uses numbered lists for options",
    "category": "Formatting",
    "reason": "Easier to scan",
    "evidence": [],
    "behavior_type": "Style",
    "contains_errors": False,
    "unexpected_behavior": False,
}


def expected(item: dict, model: str = "gpt-4o", question_id: str = "q1") -> dict:
    return {**item, "model": model, "question_id": question_id}


EXPECTED_ALL = [expected(ITEM_1), expected(ITEM_2), expected(ITEM_3)]


def parse(text: str) -> ParseResult:
    return parse_properties(text, method="single_model", model_names=("gpt-4o",), question_id="q1")


def parse_side(text: str) -> ParseResult:
    return parse_properties(text, method="side_by_side", model_names=("gpt-4o", "claude"), question_id="q1")


def array_text(*items, indent=2) -> str:
    return json.dumps(list(items), indent=indent)


ALL_ITEMS = array_text(ITEM_1, ITEM_2, ITEM_3)


def test_parse_properties_reads_a_bare_json_array():
    assert parse(ALL_ITEMS) == ParseResult(properties=EXPECTED_ALL, dropped=0, problems=[])


def test_parse_properties_returns_exactly_the_output_keys():
    result = parse(json.dumps([{**ITEM_1, "id": "x", "model": "Model B", "extra": 1}]))

    assert [list(prop) for prop in result.properties] == [OUTPUT_KEYS]
    assert result.properties == [expected(ITEM_1)]


@pytest.mark.parametrize(
    "text",
    [
        f"```json\n{ALL_ITEMS}\n```",
        f"```\n{ALL_ITEMS}\n```",
        f"```JSON {ALL_ITEMS}```",
        f"Reasoning: the agent [mostly] followed {{the policy}}.\n\n```json\n{ALL_ITEMS}\n```\nThat's all.",
        f"I looked at the transcript [1] and found three properties:\n{ALL_ITEMS}\nAsk if you need more.",
        json.dumps({"properties": [ITEM_1, ITEM_2, ITEM_3]}),
        json.dumps({"behaviors": [ITEM_1, ITEM_2, ITEM_3]}),
        json.dumps({"reasoning": "short", "properties": [ITEM_1, ITEM_2, ITEM_3]}),
        json.dumps({"reasoning": "short", "found": [ITEM_1, ITEM_2, ITEM_3]}),
        json.dumps([ITEM_1, ITEM_2, ITEM_3], separators=(",", ":")),
    ],
)
def test_parse_properties_finds_the_array_in_any_wrapping(text):
    assert parse(text) == ParseResult(properties=EXPECTED_ALL, dropped=0, problems=[])


def test_parse_properties_reads_a_single_object():
    text = "Only one stands out:\n```json\n" + json.dumps(ITEM_2) + "\n```"

    assert parse(text) == ParseResult(properties=[expected(ITEM_2)], dropped=0, problems=[])


def test_parse_properties_takes_the_fenced_block_that_holds_properties():
    text = (
        "First the schema I will follow:\n```json\n"
        '{"fields": ["property_description", "behavior_type"]}\n```\n'
        "Some code from the transcript:\n```python\nprint([1, 2])\n```\n"
        f"And the answer:\n```json\n{ALL_ITEMS}\n```\n"
        f"```json\n{array_text(ITEM_3)}\n```"
    )

    assert parse(text) == ParseResult(properties=EXPECTED_ALL, dropped=0, problems=[])


def test_parse_properties_reads_smart_double_quotes():
    text = (
        "[{“property_description”: “Says “sure” before checking the policy”, “behavior_type”: “Style”, "
        "“evidence”: [“Sure, I’ll do it”]}]"
    )

    assert parse(text).properties == [
        expected(
            {
                **ITEM_3,
                "property_description": "Says “sure” before checking the policy",
                "category": "",
                "reason": "",
                "evidence": ["Sure, I’ll do it"],
            }
        )
    ]


def test_parse_properties_reads_smart_single_quotes():
    text = "[{‘property_description’: ‘Checks the user’s ID first’, ‘behavior_type’: ‘Positive’}]"

    assert parse(text).properties == [
        expected(
            {**ITEM_1, "property_description": "Checks the user’s ID first", "reason": "", "category": ""}
        )
        | {"evidence": []}
    ]


def test_parse_properties_keeps_smart_quotes_inside_normal_strings():
    item = {**ITEM_3, "property_description": "Wraps “terms” in quotes"}

    assert parse(json.dumps([item], ensure_ascii=False)).properties == [expected(item)]


def test_parse_properties_tolerates_trailing_commas():
    text = ALL_ITEMS.replace("e\n  }", "e,\n  }").replace("\n]", ",\n]")

    assert text.count(",\n  }") == 3

    assert parse(text) == ParseResult(properties=EXPECTED_ALL, dropped=0, problems=[])


def test_parse_properties_reads_python_literals_and_single_quotes():
    text = (
        "[{'property_description': \"Doesn't confirm the booking\", 'category': 'Consent', "
        "'reason': None, 'evidence': ['Booked!'], 'behavior_type': 'Negative (critical)', "
        "'contains_errors': True, 'unexpected_behavior': False}]"
    )

    assert parse(text).properties == [
        expected(
            {
                "property_description": "Doesn't confirm the booking",
                "category": "Consent",
                "reason": "",
                "evidence": ["Booked!"],
                "behavior_type": "Negative (critical)",
                "contains_errors": True,
                "unexpected_behavior": False,
            }
        )
    ]


def test_parse_properties_reads_raw_newlines_and_stray_backslashes_in_strings():
    text = '[{"property_description": "Matches \\d+ ids\nacross lines", "behavior_type": "Style"}]'

    assert [prop["property_description"] for prop in parse(text).properties] == [
        "Matches \\d+ ids\nacross lines"
    ]


@pytest.mark.parametrize("cut", [10, 40, 120])
def test_parse_properties_keeps_complete_items_of_a_truncated_answer(cut):
    complete = array_text(ITEM_1, ITEM_2)[:-2]  # without the closing "\n]"
    text = "Thinking first.\n```json\n" + complete + ",\n" + json.dumps(ITEM_3)[:cut]

    assert parse(text) == ParseResult(
        properties=[expected(ITEM_1), expected(ITEM_2)],
        dropped=1,
        problems=["item 3: cut off at the end of the answer"],
    )


def test_parse_properties_keeps_items_of_a_truncated_wrapper():
    text = json.dumps({"properties": [ITEM_1, ITEM_2, ITEM_3]})[:-60]

    assert parse(text) == ParseResult(
        properties=[expected(ITEM_1), expected(ITEM_2)],
        dropped=1,
        problems=["item 3: cut off at the end of the answer"],
    )


def test_parse_properties_reports_an_array_cut_between_items():
    text = array_text(ITEM_1, ITEM_2)[:-2] + ","

    assert parse(text) == ParseResult(
        properties=[expected(ITEM_1), expected(ITEM_2)],
        dropped=0,
        problems=["the JSON array is not closed (the answer was probably cut off)"],
    )


def test_parse_properties_drops_an_item_with_broken_json_and_keeps_the_next():
    broken = '{"property_description": "Missing a comma" "behavior_type": "Style"}'
    text = f"[{json.dumps(ITEM_1)}, {broken}, {json.dumps(ITEM_2)}]"

    assert parse(text) == ParseResult(
        properties=[expected(ITEM_1), expected(ITEM_2)], dropped=1, problems=["item 2: not valid JSON"]
    )


def test_parse_properties_drops_a_broken_last_item_of_a_closed_array():
    broken = '{"property_description": "Missing a comma" "behavior_type": "Style"}'

    assert parse(f"[{json.dumps(ITEM_1)}, {broken}]") == ParseResult(
        properties=[expected(ITEM_1)], dropped=1, problems=["item 2: not valid JSON"]
    )


def test_parse_properties_drops_each_invalid_item_and_keeps_its_siblings():
    items = [
        ITEM_1,
        "a string",
        {**ITEM_2, "property_description": "   "},
        {key: value for key, value in ITEM_2.items() if key != "property_description"},
        {**ITEM_2, "behavior_type": "Mostly fine"},
        {key: value for key, value in ITEM_2.items() if key != "behavior_type"},
        {**ITEM_2, "property_description": ["a", "list"]},
        ITEM_3,
    ]

    assert parse(json.dumps(items)) == ParseResult(
        properties=[expected(ITEM_1), expected(ITEM_3)],
        dropped=6,
        problems=[
            "item 2: not a JSON object (got string)",
            "item 3: empty property_description",
            "item 4: missing property_description",
            "item 5: unknown behavior_type 'Mostly fine'",
            "item 6: missing behavior_type",
            "item 7: property_description is not text (got array)",
        ],
    )


@pytest.mark.parametrize(
    ("raw", "behavior_type"),
    [
        ("positive", "Positive"),
        (" STYLE ", "Style"),
        ("Negative (critical)", "Negative (critical)"),
        ("negative(critical)", "Negative (critical)"),
        ("Negative - critical", "Negative (critical)"),
        ("negative_critical", "Negative (critical)"),
        ("Negative (non-critical)", "Negative (non-critical)"),
        ("negative  (non critical)", "Negative (non-critical)"),
        ("NEGATIVE - NONCRITICAL", "Negative (non-critical)"),
    ],
)
def test_parse_properties_normalises_behavior_type(raw, behavior_type):
    result = parse(json.dumps([{**ITEM_1, "behavior_type": raw}]))

    assert [prop["behavior_type"] for prop in result.properties] == [behavior_type]


def test_parse_properties_strips_strings_and_defaults_missing_fields():
    text = json.dumps(
        [{"property_description": "  Greets the user  ", "behavior_type": "Style", "reason": " x "}]
    )

    assert parse(text).properties == [
        {
            "property_description": "Greets the user",
            "category": "",
            "reason": "x",
            "evidence": [],
            "behavior_type": "Style",
            "contains_errors": False,
            "unexpected_behavior": False,
            "model": "gpt-4o",
            "question_id": "q1",
        }
    ]


@pytest.mark.parametrize(
    ("evidence", "normalised"),
    [
        ("one quote", ["one quote"]),
        (None, []),
        ("", []),
        ([" a ", 3, None, "", 2.5], ["a", "3", "2.5"]),
        (42, ["42"]),
    ],
)
def test_parse_properties_normalises_evidence(evidence, normalised):
    result = parse(json.dumps([{**ITEM_1, "evidence": evidence}]))

    assert [prop["evidence"] for prop in result.properties] == [normalised]


@pytest.mark.parametrize(
    ("value", "flag"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("False", False),
        ("yes", True),
        ("no", False),
        (1, True),
        (0, False),
        (None, False),
    ],
)
def test_parse_properties_normalises_flags(value, flag):
    result = parse(json.dumps([{**ITEM_1, "contains_errors": value, "unexpected_behavior": value}]))

    assert [(prop["contains_errors"], prop["unexpected_behavior"]) for prop in result.properties] == [
        (flag, flag)
    ]


def test_parse_properties_defaults_missing_flags_to_false():
    item = {
        key: value for key, value in ITEM_2.items() if key not in ("contains_errors", "unexpected_behavior")
    }

    prop = parse(json.dumps([item])).properties[0]

    assert (prop["contains_errors"], prop["unexpected_behavior"]) == (False, False)


def test_parse_properties_single_model_always_uses_the_row_model():
    result = parse(json.dumps([{**ITEM_1, "model": "Model B"}, {**ITEM_2, "model": "claude"}]))

    assert [prop["model"] for prop in result.properties] == ["gpt-4o", "gpt-4o"]


@pytest.mark.parametrize(
    ("label", "model"),
    [
        ("Model A", "gpt-4o"),
        ("model a", "gpt-4o"),
        ("model_a", "gpt-4o"),
        ("A", "gpt-4o"),
        ("Response A", "gpt-4o"),
        ("Assistant A", "gpt-4o"),
        ("model A's response", "gpt-4o"),
        ("ModelA", "gpt-4o"),
        ("Model B", "claude"),
        ("b", "claude"),
        ("Model-B", "claude"),
        ("The response of model B", "claude"),
        ("GPT-4o", "gpt-4o"),
        ("Claude", "claude"),
    ],
)
def test_parse_properties_maps_side_by_side_labels_to_model_names(label, model):
    result = parse_side(json.dumps([{**ITEM_1, "model": label}]))

    assert result.properties == [expected(ITEM_1, model=model)]


def test_parse_properties_drops_side_by_side_items_without_a_clear_model():
    items = [
        {**ITEM_1, "model": "Model A"},
        ITEM_2,
        {**ITEM_3, "model": "Model C"},
        {**ITEM_3, "model": "Model A and Model B"},
        {**ITEM_2, "model": "Model B"},
    ]

    assert parse_side(json.dumps(items)) == ParseResult(
        properties=[expected(ITEM_1, model="gpt-4o"), expected(ITEM_2, model="claude")],
        dropped=3,
        problems=[
            "item 2: missing model (expected Model A or Model B)",
            "item 3: cannot tell which model 'Model C' means",
            "item 4: cannot tell which model 'Model A and Model B' means",
        ],
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty answer"),
        ("   \n", "empty answer"),
        ("I could not find any notable behaviour.", "no JSON found in the answer"),
        ("Here: [see below", "no JSON found in the answer"),
        ('{"summary": "fine", "score": [1, 2]}', "the JSON in the answer holds no properties"),
        ("[1, 2, 3]", "the JSON in the answer holds no properties"),
    ],
)
def test_parse_properties_explains_an_answer_without_properties(text, problem):
    assert parse(text) == ParseResult(properties=[], dropped=0, problems=[problem])


def test_parse_properties_accepts_an_explicit_empty_array():
    assert parse("Nothing stands out.\n```json\n[]\n```") == ParseResult(
        properties=[], dropped=0, problems=[]
    )


def test_parse_properties_does_not_cut_a_fenced_array_at_a_fence_inside_a_string():
    item = {**ITEM_3, "evidence": ["```python\nprint(1)\n```"]}
    text = f"```json\n{array_text(item)}\n```"

    assert parse(text) == ParseResult(properties=[expected(item)], dropped=0, problems=[])


def test_parse_properties_never_raises_on_garbled_answers():
    rng = random.Random(20240515)
    good = "Reasoning.\n```json\n" + ALL_ITEMS + "\n```\nDone."
    pieces = [
        "[", "]", "{", "}", '"', "'", "“", "”", "‘", "’", ",", ":", "```", "```json\n", "True", "None",
        "\\", "\n", " ", "property_description", "behavior_type", '"Style"', '"Model A"', '{"properties": ',
        "1e999", "-", "é", "\x00", "\ud800",
    ]  # fmt: skip
    answers = []
    for _ in range(3000):
        roll = rng.random()
        if roll < 0.3:
            answers.append("".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))))
        elif roll < 0.6:
            answers.append(good[: rng.randint(0, len(good))])
        else:
            chars = list(good)
            for _ in range(rng.randint(1, 8)):
                position = rng.randrange(len(chars))
                edit = rng.random()
                if edit < 0.4:
                    del chars[position]
                elif edit < 0.7:
                    chars.insert(position, rng.choice(pieces))
                else:
                    chars[position] = rng.choice(pieces)
            answers.append("".join(chars))

    for index, answer in enumerate(answers):
        side_by_side = index % 2 == 1
        result = parse_side(answer) if side_by_side else parse(answer)

        # Every dropped item is explained once, by its number.
        explained = [problem.split(":")[0] for problem in result.problems if problem.startswith("item ")]
        assert result.dropped == len(explained) == len(set(explained))
        for prop in result.properties:
            assert list(prop) == OUTPUT_KEYS
            assert prop["behavior_type"] in BEHAVIOR_TYPES
            assert prop["property_description"]
            assert prop["model"] in (("gpt-4o", "claude") if side_by_side else ("gpt-4o",))


def test_parse_properties_survives_deeply_nested_brackets():
    assert parse("[" * 50_000) == ParseResult(
        properties=[], dropped=0, problems=["no JSON found in the answer"]
    )
    assert parse('{"a": ' * 20_000) == ParseResult(
        properties=[], dropped=0, problems=["no JSON found in the answer"]
    )


@pytest.mark.parametrize("text", [None, 42])
def test_parse_properties_treats_a_non_string_answer_as_empty(text):
    assert parse(text) == ParseResult(properties=[], dropped=0, problems=["empty answer"])
