from django.urls import path

from .views import ExtractJobViewSet, PromptListView

start = ExtractJobViewSet.as_view({"post": "create"})
detail = ExtractJobViewSet.as_view({"get": "retrieve"})
cancel = ExtractJobViewSet.as_view({"post": "cancel"})
result = ExtractJobViewSet.as_view({"get": "result"})

urlpatterns = [
    path("api/jobs/", start, name="jobs-list"),
    path("api/jobs/<str:job_id>/", detail, name="jobs-detail"),
    path("api/jobs/<str:job_id>/cancel/", cancel, name="jobs-cancel"),
    path("api/jobs/<str:job_id>/result/", result, name="jobs-result"),
    # The StringSight frontend calls these exactly as written.
    path("extract/jobs/start", ExtractJobViewSet.as_view({"post": "seed_start"}), name="extract-jobs-start"),
    path(
        "extract/jobs/status", ExtractJobViewSet.as_view({"get": "seed_status"}), name="extract-jobs-status"
    ),
    path(
        "extract/jobs/cancel", ExtractJobViewSet.as_view({"post": "seed_cancel"}), name="extract-jobs-cancel"
    ),
    path("extract/prompts", PromptListView.as_view(), name="extract-prompts"),
    path(
        "extract/jobs/result", ExtractJobViewSet.as_view({"get": "seed_result"}), name="extract-jobs-result"
    ),
]
