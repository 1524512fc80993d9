"""The job API: RESTful paths under /api/jobs/ and the StringSight seed's
paths under /extract/jobs/, served by one viewset. Views translate HTTP to
service calls and back."""

import hashlib
import json
import re
import uuid

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status, viewsets
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.utils.encoders import JSONEncoder
from rest_framework.views import APIView

from extraction.prompts import PROMPT_NAMES, list_prompts

from .. import exports, presenter
from ..models import ExtractJob
from ..services import access, lifecycle, options, standing
from ..services.idempotency import IdempotentStart, start_replay
from .permissions import JobAPIPermission
from .renderers import DOWNLOAD_FORMATS, CSVRenderer, ExplicitFormatFirst, JSONLRenderer, ParquetRenderer
from .serializers import (
    CancelRequestSerializer,
    CancelResponseSerializer,
    ErrorSerializer,
    JobDetailSerializer,
    JobListQuerySerializer,
    JobPageSerializer,
    JobStatusSerializer,
    PromptListSerializer,
    PropertyPageSerializer,
    ResultSerializer,
    ResumeRequestSerializer,
    RowPageSerializer,
    RowQuerySerializer,
    SeedResultSerializer,
    StartJobSerializer,
)

ERRORS = {code: ErrorSerializer for code in (400, 401, 403, 404, 413, 415)}
JOB_ID_QUERY = OpenApiParameter(
    "job_id", str, OpenApiParameter.QUERY, required=True, description="The job's UUID."
)
JOB_ID_PATH = OpenApiParameter("job_id", str, OpenApiParameter.PATH, description="The job's UUID.")
IDEMPOTENCY_KEY = "Idempotency-Key"
# C0 controls and DEL; bytes 0x80-0x9f stay allowed, as a header's
# non-ASCII bytes arrive decoded as Latin-1.
KEY_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
IDEMPOTENCY_KEY_HEADER = OpenApiParameter(
    IDEMPOTENCY_KEY,
    str,
    OpenApiParameter.HEADER,
    required=False,
    description=(
        "A key of your choosing (1-255 characters, e.g. a UUID) that makes a retried start safe: "
        "a start with a key you (or, anonymously, any anonymous caller) used in the last 24 hours "
        "answers 200 with that start's job and response instead of starting another job, or 409 "
        "if its body differs."
    ),
)
START_RESPONSES = {
    201: JobStatusSerializer,
    200: OpenApiResponse(JobStatusSerializer, description="A replayed start: the job the key started."),
    409: ErrorSerializer,
    429: ErrorSerializer,
    **ERRORS,
}


class _Cursor(CursorPagination):
    page_size_query_param = "page_size"
    invalid_cursor_message = "cursor: not a cursor this API gave out; follow the next and previous links"

    def paginate_queryset(self, queryset, request, view=None):
        self.model = queryset.model
        return super().paginate_queryset(queryset, request, view)

    def decode_cursor(self, request):
        try:
            cursor = super().decode_cursor(request)
        except NotFound:
            raise ValidationError({"cursor": [self.invalid_cursor_message]}) from None
        if cursor is not None and cursor.position is not None:
            # The position goes into the query as it is: one the ordering's
            # column cannot hold ("x" for a date, 10**20 for an integer) was a 500.
            first = self.ordering if isinstance(self.ordering, str) else self.ordering[0]
            field = self.model._meta.get_field(first.lstrip("-"))
            try:
                field.clean(cursor.position, None)
            except (DjangoValidationError, ValueError, TypeError, OverflowError):
                raise ValidationError({"cursor": [self.invalid_cursor_message]}) from None
        return cursor


PAGE_PARAMETERS = [
    OpenApiParameter(
        "cursor", str, OpenApiParameter.QUERY, description="From a page's next or previous link."
    ),
    OpenApiParameter("page_size", int, OpenApiParameter.QUERY, description="Items per page."),
]


class JobCursor(_Cursor):
    ordering = "-created_at"
    page_size = 50
    max_page_size = 200


class RowCursor(_Cursor):
    ordering = "index"
    page_size = 100
    max_page_size = 1000


class PropertyCursor(_Cursor):
    ordering = ("row_index", "position")
    page_size = 500
    max_page_size = 5000


class ExtractJobViewSet(viewsets.GenericViewSet):
    lookup_url_kwarg = "job_id"
    serializer_class = JobStatusSerializer
    permission_classes = [JobAPIPermission]
    throttle_scope = "job_start"
    content_negotiation_class = ExplicitFormatFirst

    def get_throttles(self):
        # Only starting a job is throttled: polling status must never be.
        return super().get_throttles() if self.action in ("create", "seed_start") else []

    def get_queryset(self):
        return access.jobs_visible_to(self.request.user)

    def find_job(self, job_id, *, with_standing: bool = False) -> ExtractJob:
        if job_id is None or job_id == "":
            raise ValidationError({"job_id": ["this field is required"]})
        try:
            pk = uuid.UUID(str(job_id))
        except ValueError:
            raise ValidationError(
                {"job_id": [f"{str(job_id)[:100]!r} is not a valid job id (expected a UUID)"]}
            ) from None
        jobs = self.get_queryset().filter(pk=pk)
        job = (standing.with_standing(jobs) if with_standing else jobs).first()
        if job is None:
            raise NotFound(f"job_id: no job {pk}")
        return job

    @extend_schema(
        operation_id="jobs_start",
        summary="Start an extraction job",
        parameters=[IDEMPOTENCY_KEY_HEADER],
        request=StartJobSerializer,
        responses=START_RESPONSES,
    )
    def create(self, request):
        owner = request.user if request.user.is_authenticated else None
        idempotency = idempotent_start(request)
        if idempotency is not None:
            # A replay is answered before the body is validated again.
            replay = self.replay(owner, idempotency)
            if replay is not None:
                return replay
        serializer = StartJobSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        accepted = options.accept_start(serializer.validated_data["request"])
        start = {"rows": accepted.rows, "params": accepted.params, "encoded_rows": accepted.encoded_rows}
        if idempotency is None:
            job = lifecycle.job_start(owner=owner, **start)
            return Response(presenter.status_payload(job), status=status.HTTP_201_CREATED)
        started = lifecycle.job_start_once(owner=owner, idempotency=idempotency, **start)
        return Response(
            json.loads(started.answer),
            status=status.HTTP_200_OK if started.replayed else status.HTTP_201_CREATED,
        )

    def replay(self, owner, idempotency: IdempotentStart) -> Response | None:
        earlier = start_replay(owner=owner, idempotency=idempotency)
        return None if earlier is None else Response(json.loads(earlier.answer), status=status.HTTP_200_OK)

    @extend_schema(
        operation_id="extract_jobs_start",
        summary="Start an extraction job (StringSight path)",
        parameters=[IDEMPOTENCY_KEY_HEADER],
        request=StartJobSerializer,
        responses=START_RESPONSES,
    )
    def seed_start(self, request):
        return self.create(request)

    @extend_schema(
        operation_id="jobs_detail",
        summary="A job's status, with a count per row outcome, its rate and ETA",
        parameters=[JOB_ID_PATH],
        responses={200: JobDetailSerializer, **ERRORS},
    )
    def retrieve(self, request, job_id=None):
        return Response(presenter.detail_payload(self.find_job(job_id, with_standing=True)))

    @extend_schema(
        operation_id="jobs_cancel",
        summary="Cancel a job at once",
        parameters=[JOB_ID_PATH],
        request=None,
        responses={200: CancelResponseSerializer, 409: ErrorSerializer, **ERRORS},
    )
    def cancel(self, request, job_id=None):
        return self.cancel_response(self.find_job(job_id), refuse_finished=True)

    @extend_schema(
        operation_id="jobs_result",
        summary="A finished job's properties",
        parameters=[JOB_ID_PATH],
        responses={200: ResultSerializer, 409: ErrorSerializer, **ERRORS},
    )
    def result(self, request, job_id=None):
        return self.result_response(self.find_job(job_id))

    @extend_schema(
        operation_id="extract_jobs_status",
        summary="A job's status (StringSight path)",
        parameters=[JOB_ID_QUERY],
        responses={200: JobStatusSerializer, **ERRORS},
    )
    def seed_status(self, request):
        job = self.find_job(request.query_params.get("job_id"), with_standing=True)
        return Response(presenter.status_payload(job))

    @extend_schema(
        operation_id="extract_jobs_cancel",
        summary="Cancel a job at once (StringSight path)",
        description="A job that had already finished is left as it is: the answer is 200 with its "
        "final state, as upstream StringSight answers (the RESTful path answers 409).",
        request=CancelRequestSerializer,
        responses={200: CancelResponseSerializer, **ERRORS},
    )
    def seed_cancel(self, request):
        body = request.data if isinstance(request.data, dict) else {}
        return self.cancel_response(self.find_job(body.get("job_id")), refuse_finished=False)

    @extend_schema(
        operation_id="extract_jobs_result",
        summary="A finished job's properties (StringSight path)",
        description="row_index and __index are the caller's index of each property's row.",
        parameters=[JOB_ID_QUERY],
        responses={200: SeedResultSerializer, 409: ErrorSerializer, **ERRORS},
    )
    def seed_result(self, request):
        return self.result_response(self.find_job(request.query_params.get("job_id")), seed=True)

    def require_change(self, job: ExtractJob, verb: str) -> None:
        if not access.may_change(self.request.user, job):
            raise PermissionDenied(f"{verb} another user's job needs the jobs.change_extractjob permission")

    def cancel_response(self, job: ExtractJob, *, refuse_finished: bool) -> Response:
        self.require_change(job, "cancelling")
        outcome = lifecycle.job_cancel(job=job, refuse_finished=refuse_finished)
        return Response(presenter.cancel_payload(outcome))

    def result_response(self, job: ExtractJob, *, seed: bool = False) -> StreamingHttpResponse:
        lifecycle.require_result_ready(job)
        # Streamed a batch of properties at a time: built whole, 100,000
        # properties held the web process's memory many times over.
        return StreamingHttpResponse(presenter.result_chunks(job, seed=seed), content_type="application/json")

    @extend_schema(
        operation_id="jobs_list",
        summary="The caller's jobs, newest first",
        parameters=[JobListQuerySerializer, PAGE_PARAMETERS[0]],
        responses={200: JobPageSerializer, 400: ErrorSerializer, 401: ErrorSerializer},
    )
    def list_jobs(self, request):
        query = JobListQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        filters = {
            "state": query.validated_data.get("state"),
            "kind": query.validated_data.get("kind"),
            "mode": query.validated_data.get("mode"),
            "model_name": query.validated_data.get("model"),
            "created_at__gte": query.validated_data.get("created_after"),
            "created_at__lt": query.validated_data.get("created_before"),
        }
        jobs = self.get_queryset().filter(
            **{key: value for key, value in filters.items() if value is not None}
        )
        paginator = JobCursor()
        page = paginator.paginate_queryset(standing.with_standing(jobs), request, view=self)
        return paginator.get_paginated_response(presenter.status_payloads(page))

    @extend_schema(
        operation_id="jobs_delete",
        summary="Delete a finished job with its rows and properties",
        parameters=[JOB_ID_PATH],
        responses={204: None, 409: ErrorSerializer, **ERRORS},
    )
    def destroy(self, request, job_id=None):
        job = self.find_job(job_id)
        if not access.may_delete(request.user, job):
            raise PermissionDenied("deleting another user's job needs the jobs.delete_extractjob permission")
        lifecycle.job_delete(job=job)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        operation_id="jobs_resume",
        summary="Run a cancelled or failed job's unfinished rows again",
        parameters=[JOB_ID_PATH],
        request=ResumeRequestSerializer,
        responses={200: JobStatusSerializer, 409: ErrorSerializer, 429: ErrorSerializer, **ERRORS},
    )
    def resume(self, request, job_id=None):
        job = self.find_job(job_id)
        self.require_change(job, "resuming")
        body = ResumeRequestSerializer(data=request.data if isinstance(request.data, dict) else {})
        body.is_valid(raise_exception=True)
        job = lifecycle.job_resume(job=job, **body.validated_data)
        return Response(presenter.status_payload(job))

    @extend_schema(
        operation_id="jobs_rows",
        summary="Each row's outcome, with its error and raw answer",
        parameters=[JOB_ID_PATH, RowQuerySerializer, *PAGE_PARAMETERS],
        responses={200: RowPageSerializer, **ERRORS},
    )
    def rows(self, request, job_id=None):
        job = self.find_job(job_id)
        query = RowQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        rows = presenter.rows_for_page(job)
        if "status" in query.validated_data:
            rows = rows.filter(status=query.validated_data["status"])
        paginator = RowCursor()
        page = paginator.paginate_queryset(rows, request, view=self)
        return paginator.get_paginated_response(presenter.row_items(page))

    @extend_schema(
        operation_id="jobs_properties",
        summary="A job's properties: pages of JSON, or the whole set as JSONL, CSV or Parquet",
        parameters=[
            JOB_ID_PATH,
            *PAGE_PARAMETERS,
            OpenApiParameter(
                "format",
                str,
                OpenApiParameter.QUERY,
                enum=["json", *DOWNLOAD_FORMATS],
                description="json (paginated, the default) or a download of every property.",
            ),
        ],
        responses={
            (200, "application/json"): PropertyPageSerializer,
            (200, "application/x-ndjson"): OpenApiResponse(OpenApiTypes.BINARY, description="JSON lines"),
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.BINARY, description="CSV, evidence as JSON"),
            (200, "application/vnd.apache.parquet"): OpenApiResponse(OpenApiTypes.BINARY),
            **ERRORS,
        },
    )
    def properties(self, request, job_id=None):
        job = self.find_job(job_id)
        download = request.accepted_renderer.format
        if download in DOWNLOAD_FORMATS:
            return self.download(job, download)
        paginator = PropertyCursor()
        page = paginator.paginate_queryset(
            presenter.property_values(job.properties.all()), request, view=self
        )
        return paginator.get_paginated_response([presenter.as_listed(record, seed=False) for record in page])

    def get_renderers(self):
        if self.action == "properties":
            return [JSONRenderer(), JSONLRenderer(), CSVRenderer(), ParquetRenderer()]
        return super().get_renderers()

    def handle_exception(self, exc):
        # An error answers in JSON even where a download format was asked for.
        if getattr(self.request, "accepted_renderer", None) is not None and self.action == "properties":
            self.request.accepted_renderer = JSONRenderer()
            self.request.accepted_media_type = JSONRenderer.media_type
        return super().handle_exception(exc)

    def perform_content_negotiation(self, request, force=False):
        # Only the properties download has formats; elsewhere ?format= is ignored.
        force = force or self.action != "properties"
        try:
            return super().perform_content_negotiation(request, force)
        except Http404:
            raise ValidationError(
                {"format": [f"unknown format; use one of json, {', '.join(DOWNLOAD_FORMATS)}"]}
            ) from None

    def download(self, job: ExtractJob, download: str):
        records = exports.export_records(job.properties.all(), download)
        writer = exports.parquet_chunks if download == "parquet" else exports.TEXT_WRITERS[download]
        response = StreamingHttpResponse(writer(records), content_type=exports.CONTENT_TYPES[download])
        response["Content-Disposition"] = f'attachment; filename="job-{job.id}-properties.{download}"'
        return response


def idempotent_start(request) -> IdempotentStart | None:
    """The start's Idempotency-Key, if it sent one, with its request's hash:
    the media type and the raw body, whichever of the two start paths it
    came by. Read before the body is parsed (the raw body is gone after)."""
    key = request.headers.get(IDEMPOTENCY_KEY)
    if key is None:
        return None
    if not key.strip():
        raise ValidationError({IDEMPOTENCY_KEY: ["the header is empty; send a unique key, or no header"]})
    if len(key) > 255:
        raise ValidationError({IDEMPOTENCY_KEY: [f"{len(key)} characters is more than the limit of 255"]})
    if KEY_CONTROL_CHARACTERS.search(key):
        # The key is stored as it is, and PostgreSQL cannot hold a NUL.
        raise ValidationError(
            {IDEMPOTENCY_KEY: ["the key holds a control character (such as NUL); send printable text"]}
        )
    digest = hashlib.sha256(request.content_type.partition(";")[0].strip().lower().encode())
    digest.update(b"\n")
    digest.update(request.body)
    return IdempotentStart(
        key=key,
        request_hash=digest.hexdigest(),
        answer=lambda job: json.dumps(presenter.status_payload(job), cls=JSONEncoder),
    )


class PromptListView(APIView):
    """The named system prompts, rendered for each method (public: they are
    the same for everyone)."""

    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="extract_prompts",
        summary="The named system prompts and their text",
        parameters=[
            OpenApiParameter(
                "task_description", str, OpenApiParameter.QUERY, description="Shown inside each prompt."
            )
        ],
        responses={200: PromptListSerializer},
    )
    def get(self, request):
        task_description = request.query_params.get("task_description") or None
        return Response({"names": list(PROMPT_NAMES), "prompts": list_prompts(task_description)})
