"""Each surface's format for the refusals made before any view runs, chosen by path prefix.

The guards in this package (body limits, the dependency circuit breaker's middleware, the query-text check) refuse
requests for every surface, and each surface answers in its own format: Dify's envelope under /v1, DRF's JSON under
/api, plain DRF-style JSON or text elsewhere. This package imports no app, so the apps register their surface here
(`register`, from their AppConfig.ready()) and the guards ask `surface_for(path)`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings
from django.http import HttpResponse

if TYPE_CHECKING:
    from opsagent.common.dependencies import DependencyUnavailable


@dataclass(frozen=True)
class Refusal:
    """A refusal in a surface's format, as a Django response or as raw status, headers and body (ASGI, daphne)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, payload: dict, status: int, *, headers: dict[str, str] | None = None) -> Refusal:
        return cls(status, json.dumps(payload).encode(), headers=tuple((headers or {}).items()))

    def response(self) -> HttpResponse:
        response = HttpResponse(self.body, status=self.status, content_type=self.content_type)
        for name, value in self.headers:
            response[name] = value
        return response

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The content type and the extra headers, without Content-Length (the sender adds it)."""
        return [(b"content-type", self.content_type.encode("latin-1")),
                *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in self.headers)]


class Surface:
    """The formats of paths no app registered (the admin, /health/): DRF-style JSON errors, a plain-text 413.
    Subclasses override what their surface answers differently. `name` labels its requests in the metrics."""

    name = "web"

    def body_limit(self, path: str) -> int:
        """Bytes a request body to `path` may have."""
        return settings.REQUEST_BODY_MAX_BYTES

    def too_large(self, path: str, limit: int) -> Refusal:
        """The 413 for a body over `limit`."""
        return Refusal(413, b"Request body too large.\n", "text/plain; charset=utf-8")

    def bad_text(self, field: str, message: str) -> Refusal:
        """The 400 for text no column can store in the path or query string (`field`: where; `message`: what)."""
        return Refusal.json({field: [f"{message[0].upper()}{message[1:]}."]}, 400)

    def unavailable(self, failure: DependencyUnavailable) -> Refusal:
        """The 503 for a dependency of ours that is down."""
        return Refusal.json({"detail": failure.message, "code": "service_unavailable"}, 503,
                            headers={"Retry-After": str(failure.retry_after)})


class RestSurface(Surface):
    """DRF's format (the REST API under /api): a 413 is JSON too."""

    name = "rest"

    def too_large(self, path: str, limit: int) -> Refusal:
        return Refusal.json({"detail": f"Request body too large: at most {limit} bytes.", "code": "request_too_large"},
                            413)


DEFAULT = Surface()
_surfaces: dict[str, Surface] = {}


def register(prefix: str, surface: Surface) -> None:
    """Answer for the paths under `prefix` (e.g. "/v1": "/v1" itself and "/v1/..." but not "/v10") with `surface`."""
    _surfaces[prefix.rstrip("/")] = surface


def surface_for(path: str) -> Surface:
    """The surface of the longest registered prefix `path` is under, else DEFAULT."""
    best = ""
    for prefix in _surfaces:
        if len(prefix) > len(best) and (path == prefix or path.startswith(prefix + "/")):
            best = prefix
    return _surfaces[best] if best else DEFAULT
