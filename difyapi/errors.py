"""Dify's error envelope: every error on /v1 is `{"code", "message", "status"}` with Dify's codes (SPEC.md §1)."""
from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpResponse

from difyapi.encoding import dify_json
from opsagent.common.dependencies import DependencyUnavailable, dependency_down, retry_after
from opsagent.common.errors import DUPLICATE_MESSAGE, ServiceError, unique_violation
from opsagent.common.surfaces import Refusal, Surface


class DifyError(ServiceError):
    """An error already in Dify's terms: one class, the code and status given per error (Dify has dozens of codes)."""

    def __init__(self, code: str, message: str, status: int = 400, *, headers: dict[str, str] | None = None):
        super().__init__(message, status=status)
        self.code = code
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "status": self.status}

    def body(self) -> bytes:
        return dify_json(self.payload())

    def response(self) -> HttpResponse:
        return self.refusal().response()

    def refusal(self) -> Refusal:
        return Refusal(self.status, self.body(), headers=tuple(self.headers.items()))


def unauthorized(message: str) -> DifyError:
    return DifyError("unauthorized", message, 401, headers={"WWW-Authenticate": 'Bearer realm="api"'})


def too_many_auth_failures(retry_after: int) -> DifyError:
    return DifyError(
        "too_many_requests",
        f"Too many failed authentication attempts from this address. Try again in {retry_after} seconds.",
        429,
        headers={"Retry-After": str(retry_after)},
    )


def over_limit(exc) -> DifyError:
    """A rate limit or budget reached (agentcore.limits.OverLimit). Dify has two 429 codes: `too_many_requests`
    for its per-app request limit, which clients retry shortly, and `rate_limit_error` for an exhausted quota; a
    rate per minute is the first, a budget per day or month the second."""
    code = "rate_limit_error" if exc.budget else "too_many_requests"
    return DifyError(code, exc.message, 429, headers={"Retry-After": str(exc.retry_after)})


def request_too_large(limit: int) -> DifyError:
    """A body over the endpoint's limit (Werkzeug's RequestEntityTooLarge, as Dify names it)."""
    return DifyError("request_entity_too_large", f"The request body is too large: at most {limit} bytes.", 413)


def invalid_param(message: str) -> DifyError:
    return DifyError("invalid_param", message, 400)


def bad_request(message: str) -> DifyError:
    return DifyError("bad_request", message, 400)


def not_found(message: str) -> DifyError:
    return DifyError("not_found", message, 404)


def forbidden(message: str) -> DifyError:
    return DifyError("forbidden", message, 403)


NOT_CHAT_APP = DifyError("not_chat_app", "Please check if your app mode matches the right API route.", 400)
APP_UNAVAILABLE = DifyError("app_unavailable", "App unavailable, please check your app configurations.", 400)
INVALID_JSON = DifyError("bad_request", "Invalid JSON payload received or JSON payload is empty.", 400)
UNSUPPORTED_MEDIA_TYPE = DifyError(
    "unsupported_media_type",
    "Did not attempt to load JSON data because the request Content-Type was not 'application/json'.",
    415,
)
METHOD_NOT_ALLOWED = DifyError(
    "method_not_allowed", "The method is not allowed for the requested URL.", 405
)
INTERNAL = DifyError(
    "internal_server_error",
    "The server encountered an internal error and was unable to complete your request. Either the server is "
    "overloaded or there is an error in the application.",
    500,
)


def dependency_error(failure: DependencyUnavailable) -> DifyError:
    """Our own dependency is down: 503 with the code Dify's server (Werkzeug) gives a 503, `service_unavailable`."""
    return DifyError("service_unavailable", failure.message, 503, headers={"Retry-After": str(retry_after())})


def unexpected_error(exc: BaseException) -> DifyError:
    """The envelope for an exception nothing else mapped: 503 when a dependency of ours is down, 409 `conflict`
    (Werkzeug's Conflict) when a unique constraint refused a duplicate a concurrent request wrote first, else 500."""
    failure = dependency_down(exc)
    if failure is not None:
        return dependency_error(failure)
    if unique_violation(exc):
        return DifyError("conflict", DUPLICATE_MESSAGE, 409)
    return INTERNAL


MB = 1024 * 1024
UPLOAD_PATHS = frozenset({"/v1/files/upload"})


def _largest_upload_mb() -> int:
    return max(settings.UPLOAD_FILE_SIZE_LIMIT_MB, settings.UPLOAD_IMAGE_FILE_SIZE_LIMIT_MB)


class DifySurface(Surface):
    """/v1's refusals made before any view runs (opsagent.common.surfaces), in Dify's envelope; registered by
    DifyApiConfig.ready()."""

    name = "dify"

    def body_limit(self, path: str) -> int:
        """Uploads may be as large as the largest accepted file plus room for the form around it."""
        if path in UPLOAD_PATHS:
            return _largest_upload_mb() * MB + settings.REQUEST_BODY_MAX_BYTES
        return settings.REQUEST_BODY_MAX_BYTES

    def too_large(self, path: str, limit: int) -> Refusal:
        if path in UPLOAD_PATHS:
            return DifyError("file_too_large",
                             f"File size exceeded. Files may be at most {_largest_upload_mb()} MB.", 413).refusal()
        return request_too_large(limit).refusal()

    def bad_text(self, field: str, message: str) -> Refusal:
        return invalid_param(f"{field} {message}").refusal()

    def unavailable(self, failure: DependencyUnavailable) -> Refusal:
        return dependency_error(failure).refusal()
