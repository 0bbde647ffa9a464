"""Maps the engine's typed errors (agentcore.errors, llmconfigs.errors) to DRF errors, in one place."""
from __future__ import annotations

from rest_framework import status
from rest_framework.exceptions import APIException, NotFound, PermissionDenied, ValidationError

from agentcore.errors import AgentError
from llmconfigs.errors import LLMConfigError

# Engine field names -> the request fields a REST client sent.
_FIELD_NAMES = {"config_id": "model_config_id", "llm_config": "llm_config_id", "query": "message", "app": "app_id"}


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class TooManyRequests(APIException):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "too_many_requests"


def api_error(exc: AgentError | LLMConfigError) -> APIException:
    """The DRF exception a client should see for an engine error raised before a run started."""
    code = exc.code
    status_code = getattr(exc, "status", 400)
    if status_code == 404:
        return NotFound(exc.message, code=code)
    if status_code == 403:
        return PermissionDenied(exc.message, code=code)
    if status_code == 409:
        return Conflict(exc.message, code=code)
    if status_code == 429:
        return TooManyRequests(exc.message, code=code)
    return ValidationError({client_field(exc) or "non_field_errors": [exc.message]}, code=code)


def client_field(exc: AgentError | LLMConfigError) -> str | None:
    """The request field an engine error is about, by the name the client sent it under."""
    return _FIELD_NAMES.get(exc.field, exc.field) if exc.field else None


ENGINE_ERRORS = (AgentError, LLMConfigError)
