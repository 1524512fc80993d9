"""The job API: RESTful paths under /api/jobs/ and the StringSight seed's
paths under /extract/jobs/, served by one viewset. Views translate HTTP to
service calls and back."""

import uuid

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status, viewsets
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from extraction.prompts import PROMPT_NAMES, list_prompts

from .. import services
from ..models import ExtractJob, JobState
from .errors import Conflict
from .payloads import result_payload, status_payload
from .permissions import JobAPIPermission
from .serializers import (
    CancelRequestSerializer,
    CancelResponseSerializer,
    ErrorSerializer,
    JobStatusSerializer,
    PromptListSerializer,
    ResultSerializer,
    StartJobSerializer,
)

ERRORS = {code: ErrorSerializer for code in (400, 401, 403, 404, 413, 415)}
JOB_ID_QUERY = OpenApiParameter(
    "job_id", str, OpenApiParameter.QUERY, required=True, description="The job's UUID."
)
JOB_ID_PATH = OpenApiParameter("job_id", str, OpenApiParameter.PATH, description="The job's UUID.")


class ExtractJobViewSet(viewsets.GenericViewSet):
    lookup_url_kwarg = "job_id"
    serializer_class = JobStatusSerializer
    permission_classes = [JobAPIPermission]
    throttle_scope = "job_start"

    def get_throttles(self):
        # Only starting a job is throttled: polling status must never be.
        return super().get_throttles() if self.action in ("create", "seed_start") else []

    def get_queryset(self):
        return services.jobs_visible_to(self.request.user)

    def find_job(self, job_id) -> ExtractJob:
        if job_id is None or job_id == "":
            raise ValidationError({"job_id": ["this field is required"]})
        try:
            pk = uuid.UUID(str(job_id))
        except ValueError:
            raise ValidationError(
                {"job_id": [f"{str(job_id)[:100]!r} is not a valid job id (expected a UUID)"]}
            ) from None
        job = self.get_queryset().filter(pk=pk).first()
        if job is None:
            raise NotFound(f"job_id: no job {pk}")
        return job

    @extend_schema(
        operation_id="jobs_start",
        summary="Start an extraction job",
        request=StartJobSerializer,
        responses={201: JobStatusSerializer, 429: ErrorSerializer, **ERRORS},
    )
    def create(self, request):
        serializer = StartJobSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        owner = request.user if request.user.is_authenticated else None
        job = services.job_start(owner=owner, **serializer.validated_data)
        return Response(status_payload(job), status=status.HTTP_201_CREATED)

    @extend_schema(
        operation_id="extract_jobs_start",
        summary="Start an extraction job (StringSight path)",
        request=StartJobSerializer,
        responses={201: JobStatusSerializer, 429: ErrorSerializer, **ERRORS},
    )
    def seed_start(self, request):
        return self.create(request)

    @extend_schema(
        operation_id="jobs_status",
        summary="A job's status",
        parameters=[JOB_ID_PATH],
        responses={200: JobStatusSerializer, **ERRORS},
    )
    def retrieve(self, request, job_id=None):
        return Response(status_payload(self.find_job(job_id)))

    @extend_schema(
        operation_id="jobs_cancel",
        summary="Cancel a job at once",
        parameters=[JOB_ID_PATH],
        request=None,
        responses={200: CancelResponseSerializer, 409: ErrorSerializer, **ERRORS},
    )
    def cancel(self, request, job_id=None):
        return self.cancel_response(self.find_job(job_id))

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
        return Response(status_payload(self.find_job(request.query_params.get("job_id"))))

    @extend_schema(
        operation_id="extract_jobs_cancel",
        summary="Cancel a job at once (StringSight path)",
        request=CancelRequestSerializer,
        responses={200: CancelResponseSerializer, 409: ErrorSerializer, **ERRORS},
    )
    def seed_cancel(self, request):
        body = request.data if isinstance(request.data, dict) else {}
        return self.cancel_response(self.find_job(body.get("job_id")))

    @extend_schema(
        operation_id="extract_jobs_result",
        summary="A finished job's properties (StringSight path)",
        parameters=[JOB_ID_QUERY],
        responses={200: ResultSerializer, 409: ErrorSerializer, **ERRORS},
    )
    def seed_result(self, request):
        return self.result_response(self.find_job(request.query_params.get("job_id")))

    def cancel_response(self, job: ExtractJob) -> Response:
        if not services.may_cancel(self.request.user, job):
            raise PermissionDenied(
                "cancelling another user's job needs the jobs.change_extractjob permission"
            )
        outcome = services.job_cancel(job=job)
        job = outcome.job
        if job.state != JobState.CANCELLED:
            raise Conflict(f"job already finished (state: {job.state})")
        message = "job cancelled" if outcome.cancelled_now else "job was already cancelled"
        return Response(
            {
                "job_id": job.id,
                "state": job.state,
                "message": message,
                "properties_count": job.properties_count,
            }
        )

    def result_response(self, job: ExtractJob) -> Response:
        if job.is_active:
            raise Conflict(
                f"job is not finished (state: {job.state}); results are ready once it is done, "
                "cancelled or error"
            )
        return Response(result_payload(job))


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
