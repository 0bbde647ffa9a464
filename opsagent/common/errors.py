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


# What a client is told when a unique constraint refused its write: another request wrote the same first.
DUPLICATE_MESSAGE = "It already exists (written at the same time by another request); nothing was saved."
# A unique constraint's refusal: PostgreSQL's SQLSTATE, SQLite's extended result codes (a unique index, a primary key).
_UNIQUE_SQLSTATE = "23505"
_SQLITE_UNIQUE = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"})


def unique_violation(exc: BaseException | None) -> bool:
    """`exc` (Django's IntegrityError, which wraps the driver's error) is a unique constraint refusing a duplicate,
    rather than a check, foreign-key or not-null constraint refusing bad data."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (getattr(exc, "sqlstate", None) == _UNIQUE_SQLSTATE
                or getattr(exc, "sqlite_errorname", None) in _SQLITE_UNIQUE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
