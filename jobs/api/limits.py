from django.conf import settings
from django.http import JsonResponse


class RequestSizeLimitMiddleware:
    """Refuse an oversized body from its Content-Length, before any of it is
    read (DRF's parsers read the stream directly, past Django's own limit)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        limit = settings.STRINGSIGHT_MAX_REQUEST_BYTES
        declared = request.META.get("CONTENT_LENGTH") or "0"
        try:
            size = int(declared)
        except ValueError:
            return JsonResponse(
                {"detail": f"Content-Length: {declared[:40]!r} is not a number", "code": "invalid"},
                status=400,
            )
        if size > limit:
            return JsonResponse(
                {
                    "detail": f"request body: {size} bytes is more than the limit of {limit} bytes "
                    "(STRINGSIGHT_MAX_REQUEST_BYTES)",
                    "code": "too_large",
                },
                status=413,
            )
        return self.get_response(request)
