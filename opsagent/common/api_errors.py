"""DRF's exception handler for the whole /api surface: the apps' typed errors (and Django's model validation and
database refusals) become DRF responses here, in one place, instead of in each view."""
from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError
from rest_framework import exceptions, status
from rest_framework.views import exception_handler as drf_exception_handler

from opsagent.common.errors import DUPLICATE_MESSAGE, ServiceError, unique_violation

# Engine field names -> the names a REST client sends them under (the engine speaks Dify's vocabulary: `query`).
_REST_FIELD_NAMES = {"config_id": "model_config_id", "llm_config": "llm_config_id", "query": "message",
                     "app": "app_id"}


class _Refusal(exceptions.APIException):
    """A refusal with the service error's own status; the body is {"detail", "code"} as for every non-field error."""

    def __init__(self, detail: dict, status_code: int):
        super().__init__(detail)
        self.status_code = status_code


def client_field(exc: ServiceError) -> str | None:
    """The request field an error is about, by the name a REST or WebSocket client sent it under."""
    return _REST_FIELD_NAMES.get(exc.field, exc.field) if exc.field else None


def api_exception(exc: Exception) -> Exception:
    """The DRF exception a client sees for `exc`:
    - a 400 about one field: {field: [message]} (as DRF's own serializer errors);
    - any other refusal: its status with {"detail": message, "code": code} (as DRF's NotFound, plus the code);
    - Django's ValidationError: DRF's field errors;
    - an IntegrityError nothing caught, never a 500: a unique constraint refusing a duplicate (a concurrent write
      took the name first) is a 409 conflict, any other constraint a 400.
    Anything else is returned unchanged, for DRF's own handling."""
    if isinstance(exc, ServiceError):
        field = client_field(exc)
        if exc.status == status.HTTP_400_BAD_REQUEST and field:
            return exceptions.ValidationError({field: [exc.message]}, code=exc.code)
        refusal = _Refusal({"detail": exc.message, "code": exc.code}, exc.status)
        refusal.wait = getattr(exc, "retry_after", None)  # DRF's handler sends it as Retry-After
        return refusal
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        return exceptions.ValidationError(detail)
    if isinstance(exc, IntegrityError):
        if unique_violation(exc):
            return _Refusal({"detail": DUPLICATE_MESSAGE, "code": "conflict"}, status.HTTP_409_CONFLICT)
        return _Refusal({"detail": "The database refused the change; nothing was saved.", "code": "invalid"},
                        status.HTTP_400_BAD_REQUEST)
    return exc


def exception_handler(exc, context):
    """settings.REST_FRAMEWORK["EXCEPTION_HANDLER"]."""
    return drf_exception_handler(api_exception(exc), context)
