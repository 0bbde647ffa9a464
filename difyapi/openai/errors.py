"""OpenAI's error envelope, `{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes: every
refusal of /v1/chat/completions, the mapping of the apps' typed errors to it, and the surface that answers the
refusals made before the consumer runs (body limits, dead dependencies, bad query text)."""
from __future__ import annotations

from typing import Any

from agentcore.errors import ModelNotAllowed, TooManyActiveRuns
from agentcore.limits import OverLimit
from difyapi.encoding import dify_json
from difyapi.errors import DifyError
from llmconfigs.errors import ConfigInactive, ConfigNotFound, ConfigWrongKind, NoUsableConfig, ProviderCallError
from opsagent.common.dependencies import DependencyUnavailable, dependency_down, retry_after
from opsagent.common.errors import ServiceError
from opsagent.common.surfaces import Refusal, Surface

# OpenAI's `type` for each status it answers with.
TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
         413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error"}
# A provider's failure, by its category (llmconfigs.errors.ProviderCallError): what the client is told.
PROVIDER_STATUS = {"bad_request": 400, "rate_limit": 429, "timeout": 504, "unreachable": 502, "auth": 502,
                   "upstream_error": 502, "unavailable": 503, "internal": 500}
SERVER_TYPES = {500: "server_error", 503: "server_error", 504: "timeout"}
# Retry-After of a 429 from the provider side (every member of the pool refused): the pool's cooldown is the wait.
PROVIDER_RETRY_AFTER = "1"
INTERNAL_MESSAGE = "The server had an error while processing your request."


class OpenAIError(ServiceError):
    """A refusal in OpenAI's terms."""

    def __init__(self, message: str, *, status: int = 400, type: str | None = None, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message, status=status, field=param)
        self.type = type or TYPES.get(status, "server_error")
        self.code = code
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.field, "code": self.code}}

    def refusal(self) -> Refusal:
        return Refusal(self.status, dify_json(self.payload()), headers=tuple(self.headers.items()))


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, status=400, param=param, code=code)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(f"The model `{model}` does not exist or you do not have access to it.", status=404,
                       code="model_not_found", param="model")


INTERNAL = OpenAIError(INTERNAL_MESSAGE, status=500, type="server_error")


def dependency_error(failure: DependencyUnavailable) -> OpenAIError:
    return OpenAIError(failure.message, status=503, type="server_error", code="service_unavailable",
                       headers={"Retry-After": str(retry_after())})


def openai_error_from(exc: BaseException, *, model: str = "") -> OpenAIError | None:
    """The envelope of an error the apps raise (None when it is a fault of ours: the caller logs it, 500)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, DifyError):  # authentication and the shared /v1 checks
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(exc.status, exc.code)
        return OpenAIError(exc.message, status=exc.status, code=code, headers=exc.headers)
    if isinstance(exc, OverLimit):
        if exc.budget:
            error = OpenAIError(exc.message, status=429, type="insufficient_quota", code="insufficient_quota")
        else:
            error = OpenAIError(exc.message, status=429, code="rate_limit_exceeded")
        error.headers = {"Retry-After": str(exc.retry_after)}
        return error
    if isinstance(exc, TooManyActiveRuns):
        return OpenAIError(exc.message, status=429, code="rate_limit_exceeded", headers={"Retry-After": "1"})
    if isinstance(exc, ConfigNotFound | ModelNotAllowed | ConfigWrongKind | ConfigInactive):
        return model_not_found(model)
    if isinstance(exc, NoUsableConfig):
        return OpenAIError(exc.message, status=503, type="server_error", code="no_usable_model")
    if isinstance(exc, ProviderCallError):
        return provider_failure(exc)
    if isinstance(exc, ServiceError):  # the engine's other refusals: a field of the request is wrong
        return OpenAIError(exc.message, status=exc.status if exc.status < 500 else 400, param=exc.field,
                           code=exc.code)
    failure = dependency_down(exc)
    return dependency_error(failure) if failure is not None else None


def provider_failure(exc: ProviderCallError) -> OpenAIError:
    """Every member of the pool failed (or the one asked refused the request): its message is already scrubbed."""
    status = PROVIDER_STATUS.get(exc.category, 502)
    if exc.category == "bad_request" and exc.status_code in (404, 422):
        status = 400  # the provider's 404 is its own model or path, not the client's `model`
    headers = {"Retry-After": PROVIDER_RETRY_AFTER} if status == 429 else {}
    error_type = TYPES.get(status) if status < 500 else SERVER_TYPES.get(status, "upstream_error")
    return OpenAIError(f"The model provider failed: {exc.message}" if status >= 500 else exc.message,
                       status=status, type=error_type, code=exc.category, headers=headers)


class OpenAISurface(Surface):
    """/v1/chat/completions' refusals made before the consumer runs, in OpenAI's envelope; registered by
    DifyApiConfig.ready()."""

    def too_large(self, path: str, limit: int) -> Refusal:
        return OpenAIError(f"The request body is too large: at most {limit} bytes.", status=413,
                           code="request_too_large").refusal()

    def bad_text(self, field: str, message: str) -> Refusal:
        return invalid_request(f"{field} {message}", param=field).refusal()

    def unavailable(self, failure: DependencyUnavailable) -> Refusal:
        return dependency_error(failure).refusal()
