from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from jobs.health import healthz

# Unknown paths and unhandled errors answer in the API's JSON error shape
# (with DEBUG, jobs.api.json_errors.JSONErrorsMiddleware replaces Django's pages).
handler404 = "jobs.api.json_errors.handler404"
handler500 = "jobs.api.json_errors.handler500"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("", include("jobs.api.urls")),
]
