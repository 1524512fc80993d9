"""The StringSight frontend's calls beside the four job calls: /health,
/prompts, /prompt-text, /extract/single and /detect-and-validate, in the
shapes the frontend reads (see the README's "Using the StringSight
frontend"). Views translate HTTP to service calls and back."""

import io
import math

from django.conf import settings
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from extraction.prompts import PROMPT_NAMES, named_prompt, prompt_catalogue
from extraction.rows import REQUIRED_COLUMNS, RowError, detect_method, json_type

from .. import presenter, rowfiles, single
from ..models import JobMode, Method
from ..services import options
from ..services.errors import InvalidInput, with_field
from .errors import error_response, flatten_errors
from .hangup import client_socket, hung_up
from .parsers import nested_deeper_than, within_value_limit
from .permissions import JobAPIPermission
from .serializers import MODE_CHOICE_ERROR, ErrorSerializer, RowsField, StartJobSerializer

PREVIEW_ROWS = 50
# An answer no one reads: the client has gone (nginx's code for it).
CLIENT_CLOSED_REQUEST = 499


class HealthSerializer(serializers.Serializer):
    ok = serializers.BooleanField()


class HealthView(APIView):
    """Up means this process answers: no database, no worker (GET /healthz
    reports those). The frontend treats anything but `ok: true` as down."""

    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="health",
        summary="The server answers (for the StringSight frontend)",
        auth=[],
        responses={200: HealthSerializer},
    )
    def get(self, request):
        return Response({"ok": True})


class PromptInfoSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="Sent back as system_prompt.")
    label = serializers.CharField()
    has_task_description = serializers.BooleanField()
    preview = serializers.CharField(help_text="The start of the single-model text.")
    default_task_description_single = serializers.CharField(allow_null=True)
    default_task_description_sbs = serializers.CharField(allow_null=True)


class PromptCatalogueSerializer(serializers.Serializer):
    prompts = PromptInfoSerializer(many=True)


class PromptCatalogueView(APIView):
    """The same for everyone, so no one needs to sign in for it."""

    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="prompts",
        summary="The named prompts, with their labels and default task descriptions",
        auth=[],
        responses={200: PromptCatalogueSerializer},
    )
    def get(self, request):
        return Response({"prompts": prompt_catalogue()})


class PromptTextQuerySerializer(serializers.Serializer):
    name = serializers.CharField(help_text=f"A prompt name: {', '.join(PROMPT_NAMES)}.")
    task_description = serializers.CharField(
        required=False, allow_blank=True, help_text="Placed in the prompt's task section."
    )
    method = serializers.ChoiceField(
        choices=Method.choices, required=False, allow_blank=True, help_text="Default single_model."
    )

    def validate_name(self, value):
        name = value.strip().lower()
        if name not in PROMPT_NAMES:
            raise serializers.ValidationError(
                f"unknown prompt name {value[:100]!r}; known names: {', '.join(PROMPT_NAMES)}"
            )
        return name


class PromptTextSerializer(serializers.Serializer):
    name = serializers.CharField()
    text = serializers.CharField(help_text="Exactly the system prompt a job started with these values sends.")


class PromptTextView(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="prompt_text",
        summary="A named prompt's full text, with the task description placed in it",
        auth=[],
        parameters=[PromptTextQuerySerializer],
        responses={200: PromptTextSerializer, 400: ErrorSerializer},
    )
    def get(self, request):
        query = PromptTextQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        name = query.validated_data["name"]
        text = named_prompt(
            name,
            query.validated_data.get("method") or Method.SINGLE_MODEL,
            task_description=query.validated_data.get("task_description") or None,
        )
        return Response({"name": name, "text": text})


@extend_schema_field(
    {
        "type": "object",
        "description": "One StringSight row (single_model or side_by_side columns); "
        "its __index, if any, is reported back as each property's row_index and __index.",
        "additionalProperties": True,
    }
)
class RowField(RowsField):
    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError(f"expected a JSON object, got {json_type(data)}")
        return data


class ExtractSingleSerializer(StartJobSerializer):
    """The start's own fields, for one row."""

    rows = None
    sample_size = None
    max_cost_usd = None
    max_total_tokens = None
    row = RowField()
    mode = serializers.ChoiceField(
        choices=JobMode.choices,
        required=False,
        allow_null=True,
        error_messages={"invalid_choice": MODE_CHOICE_ERROR},
        help_text="online only (the default): the row is extracted within the request; batch answers 400.",
    )
    return_debug = serializers.BooleanField(
        required=False,
        allow_null=True,
        help_text="Also answer the parse failures (up to 5), the raw answer, tokens and cost.",
    )

    def validate(self, attrs):
        row = attrs.pop("row")
        return_debug = bool(attrs.pop("return_debug", None))
        request = super().validate({**attrs, "rows": [row]})["request"]
        return {"request": request, "return_debug": return_debug}


ExtractSingleResponseSerializer = presenter.SINGLE.serializer


class ExtractSingleView(APIView):
    permission_classes = [JobAPIPermission]
    # Counted with job starts: it spends the same LLM calls.
    throttle_scope = "job_start"

    @extend_schema(
        operation_id="extract_single",
        summary="Extract one row now, in this request",
        description="Recorded as a one-row job (kind single) owned by the caller. A row whose "
        "answer held no valid property answers 200 with an error; 502 when the LLM refused the "
        "job (credentials, model), 504 when it gave no answer in time.",
        request=ExtractSingleSerializer,
        responses={
            200: ExtractSingleResponseSerializer,
            **{code: ErrorSerializer for code in (400, 401, 403, 409, 413, 415, 429, 502, 504)},
        },
    )
    def post(self, request):
        body = ExtractSingleSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        accepted = options.accept_single_row(body.validated_data["request"])
        sock = client_socket(request.META)
        result = single.extract_single(
            owner=request.user if request.user.is_authenticated else None,
            row=accepted.rows[0],
            params=accepted.params,
            encoded_row=accepted.encoded_rows[0],
            hung_up=(lambda: hung_up(sock)) if sock is not None else (lambda: False),
        )
        return single_response(result, return_debug=body.validated_data["return_debug"])


def single_response(result: single.SingleResult, *, return_debug: bool):
    job, outcome = result.job, result.outcome
    if result.ended == single.Ended.HUNG_UP:
        return error_response(CLIENT_CLOSED_REQUEST, "the client closed the connection", "client_closed")
    if result.ended == single.Ended.LLM_FAILED:
        return error_response(502, job.error, "llm_error", job_id=str(job.id))
    if result.ended == single.Ended.TIMED_OUT:
        return error_response(504, outcome.error, "timeout", job_id=str(job.id))
    if result.ended == single.Ended.CANCELLED or outcome is None:
        return error_response(
            409, f"the extraction was stopped: its job is {job.state}", "conflict", job_id=str(job.id)
        )
    return Response(presenter.single_payload(job, outcome, return_debug=return_debug))


class DetectResponseSerializer(serializers.Serializer):
    method = serializers.ChoiceField(
        choices=Method.choices, allow_null=True, help_text="Null when the columns fit neither method."
    )
    valid = serializers.BooleanField(help_text="Whether a job could start with these rows.")
    missing = serializers.ListField(
        child=serializers.CharField(), help_text="Columns the method needs that some row lacks."
    )
    row_count = serializers.IntegerField()
    columns = serializers.ListField(child=serializers.CharField(), help_text="Every row's columns, in order.")
    preview = serializers.ListField(child=serializers.DictField(), help_text="The first 50 rows.")
    error = serializers.CharField(allow_null=True, help_text="Why the rows are not valid, naming the row.")


class DetectUploadSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="Rows as .jsonl, .json, .csv or .parquet.")


class DetectAndValidateView(APIView):
    permission_classes = [JobAPIPermission]
    parser_classes = [MultiPartParser]

    @extend_schema(
        operation_id="detect_and_validate",
        summary="Read an uploaded file of rows: its method, whether it is valid, a preview",
        request={"multipart/form-data": DetectUploadSerializer},
        responses={200: DetectResponseSerializer, 400: ErrorSerializer, 401: ErrorSerializer},
    )
    def post(self, request):
        upload = request.FILES.get("file")
        if upload is None:
            return error_response(
                400,
                "file: this field is required (a multipart upload of a .jsonl, .json, .csv or .parquet file)",
                "invalid",
                field="file",
            )
        try:
            rows = read_upload(upload)
        except rowfiles.RowFileError as exc:
            return error_response(400, f"file: {upload.name}: {exc}", "invalid", field="file")
        if not isinstance(rows, list):
            return error_response(
                400,
                f"file: {upload.name}: expected a list of rows (or an object with one under "
                f'"rows"), got {json_type(rows)}',
                "invalid",
                field="file",
            )
        return Response(detect_payload(rows))


def read_upload(upload):
    """The upload's rows, read under a start's own limits on values, rows and
    nesting. JSON is counted from its bytes before any row is built, as a
    start's body is: a 20 MB file of `{}` lines became 7 million dicts."""
    kind = rowfiles.input_format(upload.name or "")
    stream = upload.file
    if kind in ("json", "jsonl"):
        content = upload.read()
        try:
            within_value_limit(content, "utf-8", lines=kind == "jsonl")
        except ParseError as exc:
            raise rowfiles.RowFileError(str(exc.detail).removeprefix("JSON parse error - ")) from None
        except ValidationError as exc:
            raise rowfiles.RowFileError(str(exc.detail["rows"][0])) from None
        stream = io.BytesIO(content)
    rows = rowfiles.read_rows(
        stream,
        kind,
        max_values=settings.STRINGSIGHT_MAX_JSON_VALUES,
        max_bytes=settings.STRINGSIGHT_MAX_REQUEST_BYTES,
    )
    depth = settings.STRINGSIGHT_MAX_JSON_DEPTH
    # Counted as in the body of a start holding these rows.
    if nested_deeper_than({"rows": rows}, depth):
        raise rowfiles.RowFileError(f"nested deeper than {depth} levels (STRINGSIGHT_MAX_JSON_DEPTH)")
    return rows


def detect_payload(rows: list) -> dict:
    """What a start would make of these rows, checked by its own serializer and rules."""
    check = StartJobSerializer(data={"rows": rows})
    error = None
    if not check.is_valid():
        field, messages = next(iter(flatten_errors(check.errors).items()))
        error = with_field(field, messages[0])
    else:
        try:
            options.accept_start(check.validated_data["request"])
        except InvalidInput as exc:
            error = exc.detail
    valid = error is None
    objects = [row for row in rows if isinstance(row, dict)]
    try:
        method = detect_method(objects[0]) if objects else None
    except RowError:
        method = None
    required = REQUIRED_COLUMNS[method] if method else ()
    return {
        "method": method,
        "valid": valid,
        "missing": [column for column in required if any(column not in row for row in objects)],
        "row_count": len(rows),
        "columns": list(dict.fromkeys(str(column) for row in objects for column in row)),
        "preview": [json_safe(row) for row in rows[:PREVIEW_ROWS]],
        "error": error,
    }


def json_safe(value):
    """`value` as a start stores it: JSON has neither NaN nor infinity, which
    a file may hold (Python's json writes NaN, 1e999 reads as infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    return value
