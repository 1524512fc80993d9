"""The shapes of requests (types and ranges: what a start may ask for is
decided by services.options) and the documented shapes of every response.

Response bodies are built by jobs.presenter, from tables that also make
their serializers here: the schema documents exactly what is sent.
"""

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from extraction.rows import json_type

from .. import presenter
from ..models import JobKind, JobMode, JobState, Method, RowStatus
from ..services.options import DEFAULTS, StartRequest  # noqa: F401  (DEFAULTS: bench/rows.py reads them here)

_TEXT = {"type": ["string", "number"], "minLength": 1}
_RESPONSE = {
    "description": "A plain string, or a list of chat messages in OpenAI shape.",
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "object"}},
        {"type": "object", "minProperties": 1},
    ],
}
_SCORE = {
    "anyOf": [{"type": ["number", "null"]}, {"type": "object", "additionalProperties": {"type": "number"}}]
}
_OPTIONAL = {"question_id": {"type": ["string", "number", "null"]}, "winner": {"type": ["string", "null"]}}


def _row_schema(
    title: str, texts: tuple[str, ...], responses: tuple[str, ...], scores: tuple[str, ...]
) -> dict:
    properties = {
        **dict.fromkeys(texts, _TEXT),
        **dict.fromkeys(responses, _RESPONSE),
        **dict.fromkeys(scores, _SCORE),
        **_OPTIONAL,
    }
    return {
        "title": title,
        "type": "object",
        "required": [*texts, *responses],
        "properties": properties,
        "additionalProperties": True,
    }


@extend_schema_field(
    {
        "type": "array",
        "minItems": 1,
        "description": "StringSight rows, all of one method. Other columns are kept as they are.",
        "items": {
            "anyOf": [
                _row_schema("single_model row", ("prompt", "model"), ("model_response",), ("score",)),
                _row_schema(
                    "side_by_side row",
                    ("prompt", "model_a", "model_b"),
                    ("model_a_response", "model_b_response"),
                    ("score_a", "score_b"),
                ),
            ]
        },
    }
)
class RowsField(serializers.JSONField):
    def to_internal_value(self, data):
        # The JSON parser made it, so it is JSON: skip DRF's re-encoding test.
        return data


# The largest values the columns hold (PositiveIntegerField on PostgreSQL,
# PositiveBigIntegerField): beyond them an insert fails with a 500.
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1


@extend_schema_field({"type": "number", "format": "double"})
class NumberField(serializers.FloatField):
    """A JSON number. DRF's FloatField also takes `true` (as 1.0) and
    strings such as "0.5"; a sampling parameter is sent to the LLM as given,
    so only a number is one."""

    default_error_messages = {"not_a_number": "expected a number, got {type}"}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("not_a_number", type=json_type(data))
        return super().to_internal_value(data)


MODE_CHOICE_ERROR = f"'{{input}}' is not a mode; use one of {', '.join(JobMode.values)}"


class StartJobSerializer(serializers.Serializer):
    rows = RowsField()
    method = serializers.ChoiceField(
        choices=Method.choices,
        required=False,
        allow_null=True,
        help_text="Detected from the rows' columns when omitted.",
    )
    system_prompt = serializers.CharField(
        required=False,
        allow_null=True,
        allow_blank=True,
        trim_whitespace=False,
        help_text="A prompt name (default, agent) or literal prompt text.",
    )
    custom_system_prompt = serializers.CharField(
        required=False,
        allow_null=True,
        allow_blank=True,
        trim_whitespace=False,
        help_text="Literal system prompt text; wins over system_prompt.",
    )
    task_description = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    model_name = serializers.CharField(required=False, allow_null=True, max_length=200)
    temperature = NumberField(required=False, allow_null=True, min_value=0.0, max_value=2.0)
    top_p = NumberField(required=False, allow_null=True, min_value=0.0, max_value=1.0)
    max_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    max_workers = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    include_scores_in_prompt = serializers.BooleanField(required=False, allow_null=True)
    sample_size = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=MAX_INT32,
        help_text="Run a deterministic (seeded) sample of this many rows instead of all of them.",
    )
    use_cache = serializers.BooleanField(
        required=False, allow_null=True, help_text="Reuse identical earlier answers (default true)."
    )
    max_cost_usd = NumberField(
        required=False,
        allow_null=True,
        min_value=0.0,
        help_text="Stop (state error) before a call would take the estimated cost over this.",
    )
    max_total_tokens = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=MAX_INT64,
        help_text="Stop (state error) before a call would take the tokens used over this.",
    )
    mode = serializers.ChoiceField(
        choices=JobMode.choices,
        required=False,
        allow_null=True,
        error_messages={"invalid_choice": MODE_CHOICE_ERROR},
        help_text="online (the default): live calls. batch: the provider's Batch API at its batch "
        "price (half the list price by default), results within its 24 h window.",
    )
    output_dir = serializers.CharField(
        required=False,
        allow_null=True,
        allow_blank=True,
        help_text="Accepted for compatibility with StringSight; ignored.",
    )

    def validate(self, attrs):
        return {"request": StartRequest.of(attrs)}


JobStatusSerializer = presenter.STATUS.serializer
JobDetailSerializer = presenter.DETAIL.serializer
CancelResponseSerializer = presenter.CANCEL.serializer
PropertySerializer = presenter.PROPERTY.serializer
SeedPropertySerializer = presenter.SEED_PROPERTY.serializer
ResultSerializer = presenter.RESULT.serializer
SeedResultSerializer = presenter.SEED_RESULT.serializer
RowOutcomeSerializer = presenter.ROW.serializer


class CancelRequestSerializer(serializers.Serializer):
    job_id = serializers.UUIDField()


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()
    code = serializers.CharField()
    field = serializers.CharField(required=False)
    errors = serializers.DictField(child=serializers.ListField(child=serializers.CharField()), required=False)


class PromptSerializer(serializers.Serializer):
    name = serializers.CharField()
    method = serializers.ChoiceField(choices=Method.choices)
    text = serializers.CharField()


class PromptListSerializer(serializers.Serializer):
    names = serializers.ListField(child=serializers.CharField())
    prompts = PromptSerializer(many=True)


class ResumeRequestSerializer(serializers.Serializer):
    retry_failed = serializers.BooleanField(default=False, help_text="Also run the failed rows again.")
    max_cost_usd = NumberField(required=False, allow_null=True, min_value=0.0)
    max_total_tokens = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=MAX_INT64
    )


class JobListQuerySerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=JobState.choices, required=False)
    kind = serializers.ChoiceField(choices=JobKind.choices, required=False)
    mode = serializers.ChoiceField(choices=JobMode.choices, required=False)
    model = serializers.CharField(required=False, max_length=200)
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)
    page_size = serializers.IntegerField(required=False, min_value=1, max_value=200)


class RowQuerySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=RowStatus.choices, required=False)


def page_of(item_serializer, name: str):
    """The documented shape of a cursor-paginated list."""
    return type(
        name,
        (serializers.Serializer,),
        {
            "next": serializers.URLField(allow_null=True, help_text="The next page, or null on the last."),
            "previous": serializers.URLField(allow_null=True),
            "results": item_serializer(many=True),
        },
    )


JobPageSerializer = page_of(JobStatusSerializer, "JobPageSerializer")
RowPageSerializer = page_of(RowOutcomeSerializer, "RowPageSerializer")
PropertyPageSerializer = page_of(PropertySerializer, "PropertyPageSerializer")
