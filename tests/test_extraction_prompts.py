import pytest

from extraction.prompts import (
    DEFAULT_TASK_DESCRIPTIONS,
    PROMPT_NAMES,
    UnknownPromptError,
    list_prompts,
    named_prompt,
    prompt_catalogue,
    property_json_schema,
    resolve_system_prompt,
    response_format,
)

TASK = "Help airline customers change bookings while following the policy."
TASK_SECTION = (
    f"What the evaluated model was asked to do:\n{TASK}\nJudge each behaviour with that task in mind."
)
COMMON_FIELDS = (
    '"property_description"',
    '"category"',
    '"reason"',
    '"evidence"',
    '"behavior_type"',
    '"contains_errors"',
    '"unexpected_behavior"',
)
LONG_TEXT = "You are an expert reviewer. List the behaviours of the response as a JSON array."


@pytest.mark.parametrize("name", PROMPT_NAMES)
@pytest.mark.parametrize("method", ["single_model", "side_by_side"])
def test_named_prompt_asks_for_every_property_field_as_json(name, method):
    text = resolve_system_prompt(name, method)

    assert text == named_prompt(name, method)
    for field in COMMON_FIELDS:
        assert field in text
    assert ('"model": "Model A" or "Model B"' in text) == (method == "side_by_side")
    assert "20 words or fewer" in text
    assert "one JSON array of 3 to 10 objects" in text
    assert "you may first think briefly" in text
    for behavior_type in ('"Positive"', '"Negative (critical)"', '"Negative (non-critical)"', '"Style"'):
        assert behavior_type in text
    assert "None" not in text


def test_named_prompts_differ_by_name_and_method():
    texts = {
        named_prompt(name, method) for name in PROMPT_NAMES for method in ("single_model", "side_by_side")
    }

    assert len(texts) == 4


def test_agent_prompt_covers_tool_use_policy_and_confirmation():
    text = named_prompt("agent", "single_model")

    for topic in ("tool use", "policy", "confirm", "invents data"):
        assert topic in text


def test_side_by_side_prompts_name_the_two_labels():
    for name in PROMPT_NAMES:
        assert "labelled Model A and Model B" in named_prompt(name, "side_by_side")


@pytest.mark.parametrize("system_prompt", [None, "", "   "])
def test_resolve_system_prompt_defaults_to_the_default_prompt(system_prompt):
    assert resolve_system_prompt(system_prompt, "single_model") == named_prompt("default", "single_model")


@pytest.mark.parametrize("system_prompt", ["Agent", " agent ", "AGENT"])
def test_resolve_system_prompt_matches_names_case_insensitively(system_prompt):
    assert resolve_system_prompt(system_prompt, "side_by_side") == named_prompt("agent", "side_by_side")


def test_resolve_system_prompt_places_the_task_description_in_its_own_section():
    text = resolve_system_prompt("default", "single_model", task_description=f"  {TASK}\n")

    intro, task_section, rest = text.split("\n\n", 2)
    assert task_section == TASK_SECTION
    assert intro.startswith("You study how language models behave.")
    assert rest.startswith("Things worth noticing:")


@pytest.mark.parametrize("task_description", [None, "", "  "])
def test_resolve_system_prompt_omits_an_absent_task_description(task_description):
    text = resolve_system_prompt("agent", "single_model", task_description=task_description)

    assert "asked to do" not in text
    assert "None" not in text
    assert text == named_prompt("agent", "single_model")


def test_resolve_system_prompt_uses_custom_text_literally():
    text = resolve_system_prompt("agent", "single_model", custom_system_prompt="  Rate it.  ")

    assert text == "Rate it."


def test_resolve_system_prompt_appends_the_task_to_custom_text():
    text = resolve_system_prompt(None, "side_by_side", task_description=TASK, custom_system_prompt="Rate it.")

    assert text == f"Rate it.\n\n{TASK_SECTION}"


def test_resolve_system_prompt_ignores_an_empty_custom_prompt():
    assert resolve_system_prompt("agent", "single_model", custom_system_prompt="") == named_prompt(
        "agent", "single_model"
    )


@pytest.mark.parametrize("text", [LONG_TEXT, "Short\nbut on two lines"])
def test_resolve_system_prompt_passes_clear_text_through(text):
    assert resolve_system_prompt(text, "single_model") == text


def test_resolve_system_prompt_rejects_a_misspelled_name():
    with pytest.raises(UnknownPromptError) as info:
        resolve_system_prompt("defualt", "single_model")

    assert str(info.value) == (
        "system_prompt: unknown prompt name 'defualt'; known names: default, agent "
        "(send custom_system_prompt for literal text)"
    )
    assert info.value.name == "defualt"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "system_prompt",
    [
        "agent_v2",
        " Agnet ",
        "default-prompt",
        "agent v2",
        "x" * 40,
        "a_very_long_prompt_name_without_any_spaces_x",
    ],
)
def test_resolve_system_prompt_never_sends_a_name_like_value_as_text(system_prompt):
    with pytest.raises(UnknownPromptError, match="unknown prompt name"):
        resolve_system_prompt(system_prompt, "single_model")


def test_named_prompt_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'pairwise'"):
        resolve_system_prompt("default", "pairwise")


def test_list_prompts_lists_every_name_and_method():
    prompts = list_prompts()

    assert [(prompt["name"], prompt["method"]) for prompt in prompts] == [
        ("default", "single_model"),
        ("default", "side_by_side"),
        ("agent", "single_model"),
        ("agent", "side_by_side"),
    ]
    assert [prompt["text"] for prompt in prompts] == [
        named_prompt(prompt["name"], prompt["method"]) for prompt in prompts
    ]


def test_list_prompts_places_the_task_description():
    prompts = list_prompts(task_description=TASK)

    assert all(prompt["text"].count(TASK_SECTION) == 1 for prompt in prompts)


SINGLE_MODEL_SCHEMA = property_json_schema("single_model")


def item_schema(schema: dict) -> dict:
    return schema["properties"]["properties"]["items"]


def test_property_json_schema_is_strict():
    assert SINGLE_MODEL_SCHEMA["type"] == "object"
    assert SINGLE_MODEL_SCHEMA["required"] == ["properties"]
    assert SINGLE_MODEL_SCHEMA["additionalProperties"] is False
    assert SINGLE_MODEL_SCHEMA["properties"]["properties"]["type"] == "array"
    items = item_schema(SINGLE_MODEL_SCHEMA)
    assert items["additionalProperties"] is False
    assert items["required"] == list(items["properties"])
    assert items["properties"] == {
        "property_description": {"type": "string"},
        "category": {"type": "string"},
        "reason": {"type": "string"},
        "evidence": {"type": "array", "items": {"type": "string"}},
        "behavior_type": {
            "type": "string",
            "enum": ["Positive", "Negative (critical)", "Negative (non-critical)", "Style"],
        },
        "contains_errors": {"type": "boolean"},
        "unexpected_behavior": {"type": "boolean"},
    }


def test_response_format_wraps_the_schema_for_structured_outputs():
    assert response_format("single_model") == {
        "type": "json_schema",
        "json_schema": {"name": "properties", "strict": True, "schema": SINGLE_MODEL_SCHEMA},
    }


def test_response_format_adds_the_model_label_for_side_by_side():
    items = item_schema(response_format("side_by_side")["json_schema"]["schema"])

    assert items["properties"]["model"] == {"type": "string", "enum": ["Model A", "Model B"]}
    assert items["required"][-1] == "model"
    assert items["required"] == list(items["properties"])
    assert "model" not in item_schema(SINGLE_MODEL_SCHEMA)["properties"]


def test_response_format_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'pairwise'"):
        response_format("pairwise")


def test_the_prompt_catalogue_offers_each_named_prompt_with_its_defaults():
    catalogue = prompt_catalogue()

    assert [(p["name"], p["label"], p["has_task_description"]) for p in catalogue] == [
        ("default", "Default", True),
        ("agent", "Agent", True),
    ]
    for prompt in catalogue:
        assert prompt["preview"] == named_prompt(prompt["name"], "single_model")[:180]
        assert (
            prompt["default_task_description_single"]
            == DEFAULT_TASK_DESCRIPTIONS[prompt["name"], "single_model"]
        )
        assert (
            prompt["default_task_description_sbs"]
            == DEFAULT_TASK_DESCRIPTIONS[prompt["name"], "side_by_side"]
        )


@pytest.mark.parametrize(("name", "method"), list(DEFAULT_TASK_DESCRIPTIONS))
def test_a_default_task_description_lands_verbatim_in_its_prompt(name, method):
    task = DEFAULT_TASK_DESCRIPTIONS[name, method]

    text = named_prompt(name, method, task_description=task)

    assert text.count(task) == 1
    assert len(task) < 300
