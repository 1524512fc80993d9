from django.urls import path

from .estimate import EstimateJobView, SeedEstimateJobView
from .frontend import (
    DetectAndValidateView,
    ExtractSingleView,
    HealthView,
    PromptCatalogueView,
    PromptTextView,
)
from .views import ExtractJobViewSet, PromptListView

jobs = ExtractJobViewSet.as_view({"get": "list_jobs", "post": "create"})
detail = ExtractJobViewSet.as_view({"get": "retrieve", "delete": "destroy"})
cancel = ExtractJobViewSet.as_view({"post": "cancel"})
result = ExtractJobViewSet.as_view({"get": "result"})
resume = ExtractJobViewSet.as_view({"post": "resume"})
rows = ExtractJobViewSet.as_view({"get": "rows"})
properties = ExtractJobViewSet.as_view({"get": "properties"})

# The StringSight frontend calls these exactly as written.
frontend_patterns = [
    path("health", HealthView.as_view(), name="health"),
    path("prompts", PromptCatalogueView.as_view(), name="prompts"),
    path("prompt-text", PromptTextView.as_view(), name="prompt-text"),
    path("extract/single", ExtractSingleView.as_view(), name="extract-single"),
    path("detect-and-validate", DetectAndValidateView.as_view(), name="detect-and-validate"),
    path("extract/jobs/start", ExtractJobViewSet.as_view({"post": "seed_start"}), name="extract-jobs-start"),
    path(
        "extract/jobs/status", ExtractJobViewSet.as_view({"get": "seed_status"}), name="extract-jobs-status"
    ),
    path(
        "extract/jobs/cancel", ExtractJobViewSet.as_view({"post": "seed_cancel"}), name="extract-jobs-cancel"
    ),
    path(
        "extract/jobs/result", ExtractJobViewSet.as_view({"get": "seed_result"}), name="extract-jobs-result"
    ),
]

# The same views under /api: the frontend's default base, behind a proxy that
# keeps the prefix. Left out of the OpenAPI schema (see schema.py).
FRONTEND_ALIAS_PREFIX = "api/"
frontend_aliases = [
    path(f"{FRONTEND_ALIAS_PREFIX}{pattern.pattern}", pattern.callback) for pattern in frontend_patterns
]

urlpatterns = [
    path("api/jobs/", jobs, name="jobs-list"),
    # Before the job paths, which would take "estimate" for a job id.
    path("api/jobs/estimate/", EstimateJobView.as_view(), name="jobs-estimate"),
    path("extract/jobs/estimate", SeedEstimateJobView.as_view(), name="extract-jobs-estimate"),
    path("api/jobs/<str:job_id>/", detail, name="jobs-detail"),
    path("api/jobs/<str:job_id>/cancel/", cancel, name="jobs-cancel"),
    path("api/jobs/<str:job_id>/result/", result, name="jobs-result"),
    path("api/jobs/<str:job_id>/resume/", resume, name="jobs-resume"),
    path("api/jobs/<str:job_id>/rows/", rows, name="jobs-rows"),
    path("api/jobs/<str:job_id>/properties/", properties, name="jobs-properties"),
    path("extract/prompts", PromptListView.as_view(), name="extract-prompts"),
    *frontend_patterns,
    *frontend_aliases,
]
