"""Typed errors of LLM configuration selection, validation and provider calls; the API layers map them to wire codes."""
from __future__ import annotations

from opsagent.common.errors import ServiceError


class LLMConfigError(ServiceError):
    """Base of the refusals of llmconfigs' services and selectors (400 unless the class says otherwise)."""

    code = "invalid_config"


class ConfigNotFound(LLMConfigError):
    """A config the request names (a field) does not exist: a 400 on that field, or a 404 when raised with
    `status=404` for the config a URL names."""

    code = "config_not_found"


class ConfigInactive(LLMConfigError):
    code = "config_inactive"


class ConfigWrongKind(LLMConfigError):
    code = "config_wrong_kind"


class NoUsableConfig(LLMConfigError):
    """No config was asked for and there is no active default: the deployment is not set up yet."""

    code = "no_usable_config"


class InvalidParameter(LLMConfigError):
    code = "invalid_parameter"


class ConfigProtected(LLMConfigError):
    """The operation would leave the system without a default (e.g. deleting or deactivating it)."""

    code = "config_protected"
    status = 409


class ProviderCallError(Exception):
    """A provider call failed. `category` is one of: auth, rate_limit, upstream_error, timeout, unreachable,
    bad_request. The message is already scrubbed of the API key."""

    def __init__(self, category: str, message: str, *, status_code: int | None = None):
        super().__init__(message)
        self.category = category
        self.message = message
        self.status_code = status_code


class ConfigConflict(LLMConfigError):
    """The database refused the write (a name taken or a second default committed concurrently): a conflict with
    another write, not bad input."""

    code = "config_conflict"
    status = 409


class KeyRotationRefused(LLMConfigError):
    """`rotate_field_key` was given an old key that does not decrypt the stored data; nothing was changed."""

    code = "key_rotation_refused"
