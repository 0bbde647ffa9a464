"""The one error base of the apps: a refusal with a stable code, an HTTP status, the input field it is about and a
message safe to show. Each surface maps it to its wire format in one place (DRF: opsagent.common.api_errors; Dify:
difyapi.errors)."""
from __future__ import annotations


class ServiceError(Exception):
    """`code` is a stable machine name and `status` the HTTP status a client should see (both set per class, or per
    error when one class serves several cases); `field` names the offending input when there is one."""

    code = "invalid"
    status = 400

    def __init__(self, message: str, *, field: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if status is not None:
            self.status = status
