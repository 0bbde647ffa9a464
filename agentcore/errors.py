"""Typed errors raised before a run starts (the interfaces map them to their wire formats)."""
from __future__ import annotations

from opsagent.common.errors import ServiceError


class AgentError(ServiceError):
    code = "agent_error"


class InvalidInput(AgentError):
    code = "invalid_input"


class SessionNotFound(AgentError):
    code = "session_not_found"
    status = 404


class ApprovalNotFound(AgentError):
    code = "approval_not_found"
    status = 404


class ApprovalAlreadyDecided(AgentError):
    code = "approval_already_decided"
    status = 409


class ApprovalForbidden(AgentError):
    code = "approval_forbidden"
    status = 403


class PermissionRefused(AgentError):
    """The caller lacks a Django permission the operation needs (named in the message)."""

    code = "permission_denied"
    status = 403


class ModelNotAllowed(InvalidInput):
    """The model asked for (by `field`) is not on the app's allow-list."""

    code = "model_not_allowed"


class TooManyActiveRuns(AgentError):
    code = "too_many_active_runs"
    status = 429


class AppUnavailable(AgentError):
    code = "app_unavailable"
    status = 400
