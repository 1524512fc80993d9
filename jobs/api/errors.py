"""One error shape for every API failure:

    {"detail": "rows[3]: missing column ...", "code": "invalid", "field": "rows[3]", "errors": {...}}

`detail` is a sentence that names the field; `errors` (validation only)
maps every failing field to its messages. The services' refusals
(jobs.services.errors) are mapped here, and only here, to their statuses.
"""

from django.http import JsonResponse
from rest_framework import status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.views import exception_handler as drf_exception_handler

from ..services.errors import InvalidInput, JobConflict, JobError, LimitReached, with_field


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"
    default_detail = "The job is not in a state that allows this."


class Limited(APIException):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "limit_reached"
    default_detail = "A limit is reached."


def as_api_exception(exc: JobError) -> APIException:
    if isinstance(exc, InvalidInput):
        return ValidationError({exc.field: [exc.message]})
    if isinstance(exc, JobConflict):
        return Conflict(exc.message)
    if isinstance(exc, LimitReached):
        return Limited(exc.message, code=exc.code)
    raise TypeError(f"no answer for {type(exc).__name__}") from exc


def error_response(status: int, detail: str, code: str, **extra) -> JsonResponse:
    """The shape, for answers built outside DRF's exception handler."""
    return JsonResponse({"detail": detail, "code": code, **extra}, status=status)


def exception_handler(exc, context):
    if isinstance(exc, JobError):
        exc = as_api_exception(exc)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, ValidationError):
        errors = flatten_errors(exc.detail)
        field, messages = next(iter(errors.items()), ("", ["invalid input"]))
        detail = messages[0] if field in ("", "non_field_errors") else with_field(field, messages[0])
        response.data = {"detail": detail, "code": "invalid", "field": field, "errors": errors}
    else:
        detail = exc.detail if isinstance(exc, APIException) else str(exc)
        response.data = {"detail": str(detail), "code": getattr(detail, "code", "error")}
    return response


def flatten_errors(detail, prefix: str = "") -> dict[str, list[str]]:
    """{"rows": {"3": ["..."]}} becomes {"rows[3]": ["..."]}."""
    if isinstance(detail, dict):
        flat: dict[str, list[str]] = {}
        for key, value in detail.items():
            name = (
                f"{prefix}[{key}]"
                if prefix and str(key).isdigit()
                else (f"{prefix}.{key}" if prefix else str(key))
            )
            flat.update(flatten_errors(value, name))
        return flat
    if isinstance(detail, list) and detail and all(not isinstance(item, (dict, list)) for item in detail):
        return {prefix: [str(item) for item in detail]}
    if isinstance(detail, list):
        flat = {}
        for index, item in enumerate(detail):
            if item:
                flat.update(flatten_errors(item, f"{prefix}[{index}]"))
        return flat
    return {prefix: [str(detail)]}
