from django.conf import settings
from rest_framework.permissions import BasePermission


class JobAPIPermission(BasePermission):
    """Signed-in users, or anyone when STRINGSIGHT_ALLOW_ANONYMOUS is on (a
    single-user local setup whose frontend sends no credentials)."""

    message = "Authentication credentials were not provided."

    def has_permission(self, request, view):
        return bool(request.user and request.user.is_authenticated) or settings.STRINGSIGHT_ALLOW_ANONYMOUS
