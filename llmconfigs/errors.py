"""Typed errors of LLM configuration selection, validation and provider calls; the API layers map them to wire codes."""
from __future__ import annotations


class LLMConfigError(Exception):
    """Base: `code` is a stable machine name, `field` names the offending input when there is one."""

    code = "invalid_config"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class ConfigNotFound(LLMConfigError):
    code = "config_not_found"


class ConfigInactive(LLMConfigError):
    code = "config_inactive"


class ConfigAmbiguous(LLMConfigError):
    code = "config_ambiguous"


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


class ProviderCallError(Exception):
    """A provider call failed. `category` is one of: auth, rate_limit, upstream_error, timeout, unreachable,
    bad_request. The message is already scrubbed of the API key."""

    def __init__(self, category: str, message: str, *, status_code: int | None = None):
        super().__init__(message)
        self.category = category
        self.message = message
        self.status_code = status_code


class ConfigConflict(LLMConfigError):
    """The database refused the write (a name taken or a second default committed concurrently)."""

    code = "config_conflict"


class KeyRotationRefused(LLMConfigError):
    """`rotate_field_key` was given an old key that does not decrypt the stored data; nothing was changed."""

    code = "key_rotation_refused"
