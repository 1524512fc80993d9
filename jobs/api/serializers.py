"""Request validation and the documented shapes of every response.

Responses are built as plain dicts (see `payloads`) for speed; the output
serializers here describe them for the OpenAPI schema, and a test checks
that real responses match it.
"""

import re

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from extraction.prompts import UnknownPromptError, resolve_system_prompt
from extraction.rows import RowError, encode_row, json_type, nul_path, validate_rows

from ..models import JobKind, JobState, Method, RowStatus
from ..services.budgets import model_allowed, price_for
from ..services.lifecycle import JobParams

# Upstream StringSight's frontend sends these; a caller who omits a value
# (or sends null) gets the same.
DEFAULTS = {
    "system_prompt": "default",
    "task_description": "",
    "temperature": 0.6,
    "top_p": 0.95,
    "max_tokens": 2048,
    "max_workers": 16,
    "include_scores_in_prompt": False,
    "use_cache": True,
}


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


# C0 and C1 controls and DEL: a model id is sent in a JSON body, logged and
# shown; CR, LF or ESC in it could forge log lines or terminal output.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def prompt_within_limit(value: str | None) -> str | None:
    """A prompt is copied into every LLM call in flight: its size is a
    worker's memory and every call's cost."""
    limit = settings.STRINGSIGHT_MAX_PROMPT_BYTES
    if value is not None and len(value) * 4 > limit and (size := len(value.encode())) > limit:
        raise serializers.ValidationError(
            f"{size} bytes is more than the limit of {limit} bytes (STRINGSIGHT_MAX_PROMPT_BYTES)"
        )
    return value


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
    output_dir = serializers.CharField(
        required=False,
        allow_null=True,
        allow_blank=True,
        help_text="Accepted for compatibility with StringSight; ignored.",
    )

    def validate_system_prompt(self, value):
        return prompt_within_limit(value)

    def validate_custom_system_prompt(self, value):
        return prompt_within_limit(value)

    def validate_task_description(self, value):
        return prompt_within_limit(value)

    def validate_model_name(self, value):
        if value is not None and CONTROL_CHARACTERS.search(value):
            raise serializers.ValidationError(
                "a model id holds no control characters (such as CR, LF, tab or ESC)"
            )
        return value

    def validate_max_tokens(self, value):
        cap = settings.STRINGSIGHT_MAX_TOKENS_CAP
        if value is not None and value > cap:
            raise serializers.ValidationError(
                f"{value} is above the limit of {cap} (STRINGSIGHT_MAX_TOKENS_CAP)"
            )
        return value

    def validate_max_workers(self, value):
        cap = settings.STRINGSIGHT_MAX_WORKERS
        if value is not None and value > cap:
            raise serializers.ValidationError(
                f"{value} is above the limit of {cap} (STRINGSIGHT_MAX_WORKERS)"
            )
        return value

    def validate_rows(self, rows):
        limit = settings.STRINGSIGHT_MAX_ROWS
        if isinstance(rows, list) and len(rows) > limit:
            raise serializers.ValidationError(
                f"{len(rows)} rows are more than the limit of {limit} per job (STRINGSIGHT_MAX_ROWS)"
            )
        if isinstance(rows, list):
            row_limit = settings.STRINGSIGHT_MAX_ROW_BYTES
            # Encoded once: the size check's text is what the rows are stored as.
            self.encoded_rows = [encode_row(row) for row in rows]
            for index, encoded in enumerate(self.encoded_rows):
                # orjson writes NUL as \u0000: a cheap test before the walk.
                if "\\u0000" in encoded and (where := nul_path(rows[index])) is not None:
                    raise serializers.ValidationError(
                        {index: {where: ["holds a NUL character (\\u0000), which cannot be stored"]}}
                    )
                size = len(encoded.encode())
                if size > row_limit:
                    raise serializers.ValidationError(
                        {
                            index: [
                                f"{size} bytes is more than the limit of {row_limit} bytes per row "
                                "(STRINGSIGHT_MAX_ROW_BYTES)"
                            ]
                        }
                    )
        return rows

    def validate(self, attrs):
        values = {name: attrs.get(name) for name in DEFAULTS}
        for name, default in DEFAULTS.items():
            if values[name] is None:
                values[name] = default
        try:
            method = validate_rows(attrs["rows"], attrs.get("method"))
        except RowError as exc:
            raise serializers.ValidationError({exc.field: [exc.message]}) from None
        try:
            resolved = resolve_system_prompt(
                values["system_prompt"],
                method,
                task_description=values["task_description"] or None,
                custom_system_prompt=attrs.get("custom_system_prompt") or None,
            )
        except UnknownPromptError as exc:
            raise serializers.ValidationError({"system_prompt": [str(exc)]}) from None
        system_prompt = attrs.get("custom_system_prompt") or values["system_prompt"]
        model_name = attrs.get("model_name") or settings.STRINGSIGHT_DEFAULT_MODEL
        if not model_allowed(model_name):
            raise serializers.ValidationError(
                {
                    "model_name": [
                        f"{model_name!r} is not an allowed model; allowed: "
                        f"{', '.join(settings.STRINGSIGHT_ALLOWED_MODELS)} (STRINGSIGHT_ALLOWED_MODELS)"
                    ]
                }
            )
        max_cost_usd = attrs.get("max_cost_usd")
        if max_cost_usd is None and price_for(model_name) is not None:
            max_cost_usd = settings.STRINGSIGHT_DEFAULT_MAX_COST_USD
        if attrs.get("max_cost_usd") is not None and price_for(model_name) is None:
            raise serializers.ValidationError(
                {
                    "max_cost_usd": [
                        f"no price is known for model {model_name!r}, so a cost budget cannot be kept; "
                        "add it to STRINGSIGHT_PRICES or use max_total_tokens"
                    ]
                }
            )
        params = JobParams(
            method=method,
            system_prompt=system_prompt,
            resolved_system_prompt=resolved,
            task_description=values["task_description"],
            model_name=model_name,
            temperature=values["temperature"],
            top_p=values["top_p"],
            max_tokens=values["max_tokens"],
            max_workers=values["max_workers"],
            include_scores_in_prompt=values["include_scores_in_prompt"],
            sample_size=attrs.get("sample_size"),
            use_cache=values["use_cache"],
            max_cost_usd=max_cost_usd,
            max_total_tokens=attrs.get("max_total_tokens"),
        )
        return {"rows": attrs["rows"], "params": params, "encoded_rows": getattr(self, "encoded_rows", None)}


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class BudgetSerializer(serializers.Serializer):
    max_cost_usd = serializers.FloatField(allow_null=True)
    max_total_tokens = serializers.IntegerField(allow_null=True)


class JobStatusSerializer(serializers.Serializer):
    job_id = serializers.UUIDField()
    state = serializers.ChoiceField(choices=JobState.choices)
    kind = serializers.ChoiceField(
        choices=JobKind.choices,
        help_text="rows: rows run by workers; single: one row extracted by /extract/single.",
    )
    progress = serializers.FloatField(help_text="Finished rows (done or failed) over all rows, 0..1.")
    count_done = serializers.IntegerField()
    count_failed = serializers.IntegerField()
    count_total = serializers.IntegerField()
    properties_count = serializers.IntegerField()
    error = serializers.CharField(allow_null=True)
    method = serializers.ChoiceField(choices=Method.choices)
    model_name = serializers.CharField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    cancelled_at = serializers.DateTimeField(allow_null=True)
    usage = UsageSerializer()
    cost_usd = serializers.FloatField(
        allow_null=True,
        help_text="Estimated from the tokens used; null when no price is known for the model.",
    )
    cache_hits = serializers.IntegerField(
        help_text="Rows answered from the completion cache, with no LLM call."
    )
    sample_size = serializers.IntegerField(allow_null=True)
    budget = BudgetSerializer()


class CancelRequestSerializer(serializers.Serializer):
    job_id = serializers.UUIDField()


class CancelResponseSerializer(serializers.Serializer):
    job_id = serializers.UUIDField()
    state = serializers.ChoiceField(choices=JobState.choices)
    message = serializers.CharField()
    properties_count = serializers.IntegerField(help_text="Final: it never changes after the cancel.")


class _PropertyContentSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    question_id = serializers.CharField()
    model = serializers.CharField()
    property_description = serializers.CharField()
    category = serializers.CharField(allow_blank=True)
    reason = serializers.CharField(allow_blank=True)
    evidence = serializers.ListField(child=serializers.CharField(allow_blank=True))
    behavior_type = serializers.CharField()
    contains_errors = serializers.BooleanField()
    unexpected_behavior = serializers.BooleanField()


class PropertySerializer(_PropertyContentSerializer):
    row_index = serializers.IntegerField(help_text="The row's position in the job (after sampling).")
    input_index = serializers.IntegerField(
        help_text="The caller's index of the row: its __index when it had one, else its position "
        "in the request."
    )


# The seed paths' property: the caller's index of the row is its row_index,
# and its __index (a name a class body would mangle).
SeedPropertySerializer = type(
    "SeedPropertySerializer",
    (_PropertyContentSerializer,),
    {
        "row_index": serializers.IntegerField(
            help_text="The caller's index of the row: its __index when it had one, else its position "
            "in the request."
        ),
        "__index": serializers.IntegerField(help_text="The same as row_index."),
    },
)


class ResultSerializer(serializers.Serializer):
    job_id = serializers.UUIDField()
    state = serializers.ChoiceField(choices=JobState.choices)
    cancelled = serializers.BooleanField()
    count = serializers.IntegerField()
    properties = PropertySerializer(many=True)


class SeedResultSerializer(ResultSerializer):
    properties = SeedPropertySerializer(many=True)


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


class OutcomesSerializer(serializers.Serializer):
    done = serializers.IntegerField()
    failed = serializers.IntegerField()
    running = serializers.IntegerField()
    pending = serializers.IntegerField()
    cancelled = serializers.IntegerField()


class JobDetailSerializer(JobStatusSerializer):
    outcomes = OutcomesSerializer(help_text="Rows per outcome; they add up to count_total.")
    rows_per_second = serializers.FloatField(
        allow_null=True, help_text="While running: rows finished per second."
    )
    eta_seconds = serializers.FloatField(
        allow_null=True, help_text="While running: seconds until the last row."
    )


class RowOutcomeSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    input_index = serializers.IntegerField(
        help_text="The caller's index of the row: its __index when it had one, else its position "
        "in the request."
    )
    question_id = serializers.CharField()
    status = serializers.ChoiceField(choices=RowStatus.choices)
    attempts = serializers.IntegerField(help_text="LLM calls made for the row.")
    error = serializers.CharField(allow_blank=True)
    raw_answer = serializers.CharField(allow_blank=True, help_text="The LLM's answer, kept once per row.")
    properties_dropped = serializers.IntegerField(help_text="Invalid items in the answer that were dropped.")
    cached = serializers.BooleanField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    claimed_by = serializers.CharField(
        allow_blank=True, help_text="The worker that holds or last held the row."
    )
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)


class ResumeRequestSerializer(serializers.Serializer):
    retry_failed = serializers.BooleanField(default=False, help_text="Also run the failed rows again.")
    max_cost_usd = NumberField(required=False, allow_null=True, min_value=0.0)
    max_total_tokens = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=MAX_INT64
    )


class JobListQuerySerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=JobState.choices, required=False)
    kind = serializers.ChoiceField(choices=JobKind.choices, required=False)
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
