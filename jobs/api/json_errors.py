"""Errors outside the API's views answer in the API's one error shape too:
an unknown path, a method a plain Django view refuses, an unhandled
exception. Django's own pages (HTML, and with DEBUG its technical pages
with settings and tracebacks) would otherwise reach API clients, and the
StringSight frontend pastes an error's body into its panel as it is. The
admin keeps its HTML pages."""

import logging
import sys
import uuid

from django.core.exceptions import BadRequest, PermissionDenied, SuspiciousOperation
from django.http import Http404, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.middleware.common import CommonMiddleware
from django.views import defaults

from .errors import error_response

log = logging.getLogger("stringsight.errors")

HTML_PREFIXES = ("/admin/",)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Exceptions Django answers with a 4xx of its own (see response_for_exception).
CLIENT_ERRORS = (Http404, PermissionDenied, BadRequest, SuspiciousOperation, MultiPartParserError)
CODES = {
    400: "invalid",
    401: "not_authenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


def server_error(request, exc_info=None) -> JsonResponse:
    """A 500 that names a request id, logged with the exception under the
    same id, so a report can be matched to its traceback without the
    traceback (or settings) ever reaching the client."""
    request_id = uuid.uuid4().hex
    log.error(
        "internal error (request id %s) on %s %s",
        request_id,
        request.method,
        request.path,
        exc_info=exc_info,
    )
    return error_response(
        500, f"internal error (request id {request_id})", "server_error", request_id=request_id
    )


def handler404(request, exception=None):
    if request.path.startswith(HTML_PREFIXES):
        return defaults.page_not_found(request, exception)
    return error_response(404, f"not found: {request.path}", "not_found")


def handler500(request):
    if request.path.startswith(HTML_PREFIXES):
        return defaults.server_error(request)
    # Called while Django handles the exception, so it is still current.
    return server_error(request, exc_info=sys.exc_info())


class JSONErrorsMiddleware:
    """Placed inside CorsMiddleware, so its answers carry the CORS headers
    a listed origin needs to read them."""

    def __init__(self, get_response):
        self.get_response = get_response
        self.common = CommonMiddleware(get_response)

    def __call__(self, request):
        if (
            request.method not in SAFE_METHODS
            and not request.path.startswith(HTML_PREFIXES)
            and self.common.should_redirect_with_slash(request)
        ):
            # CommonMiddleware would redirect, and a client follows a 301
            # with a GET (a start became a list of jobs); with DEBUG it raises.
            return error_response(
                404, f"not found: {request.path} (the path ends with a slash: {request.path}/)", "not_found"
            )
        response = self.get_response(request)
        if response.status_code < 400 or request.path.startswith(HTML_PREFIXES):
            return response
        if response.get("Content-Type", "").startswith("application/json"):
            return response
        # Django's own page: with DEBUG, its technical 404 or 500 page.
        if response.status_code >= 500:
            # Django logged the traceback just before ("Internal Server Error: …").
            replacement = server_error(request)
        else:
            replacement = error_response(
                response.status_code,
                describe(request, response.status_code),
                CODES.get(response.status_code, "error"),
            )
        for header in ("Allow", "Retry-After", "WWW-Authenticate"):
            if header in response:
                replacement[header] = response[header]
        return replacement

    def process_exception(self, request, exception):
        """An exception a view let through: logged and answered here, so
        that DEBUG's technical page is never built."""
        if isinstance(exception, CLIENT_ERRORS) or request.path.startswith(HTML_PREFIXES):
            return None
        return server_error(request, exc_info=(type(exception), exception, exception.__traceback__))


def describe(request, status: int) -> str:
    if status == 404:
        return f"not found: {request.path}"
    if status == 405:
        return f"method {request.method} is not allowed on {request.path}"
    if status == 403:
        return f"permission denied: {request.path}"
    return f"the request could not be served (HTTP {status})"
