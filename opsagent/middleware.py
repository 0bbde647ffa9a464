"""Project middleware: the request log (method, path, status and duration of every request, warning when slow; never
bodies, query strings or headers, so no key or token can reach the log), the Content-Security-Policy header, and the
refusal of paths and query strings holding text no column can store."""
import logging
import time

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpResponse, JsonResponse

from difyapi.errors import invalid_param
from opsagent.client_input import text_problem

logger = logging.getLogger("opsagent.requests")


class HybridMiddleware:
    """A middleware that runs on the event loop under ASGI (no thread hop per request) and plainly under WSGI."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)


class RequestLogMiddleware(HybridMiddleware):

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        started = time.perf_counter()
        response = self.get_response(request)
        self._log(request, response, started)
        return response

    async def __acall__(self, request):
        started = time.perf_counter()
        response = await self.get_response(request)
        self._log(request, response, started)
        return response

    @staticmethod
    def _log(request, response, started: float) -> None:
        duration = time.perf_counter() - started
        level = logging.WARNING if duration > settings.REQUEST_SLOW_SECONDS else logging.INFO
        logger.log(
            level,
            "%s %s %s %.1fms",
            request.method,
            request.path,
            response.status_code,
            duration * 1000,
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "duration_ms": round(duration * 1000, 1),
            },
        )


class ContentSecurityPolicyMiddleware(HybridMiddleware):
    """Django 5.2 has no CSP of its own: this adds settings.CONTENT_SECURITY_POLICY to every response that does not
    set a stricter one itself (uploaded files do)."""

    def __init__(self, get_response):
        super().__init__(get_response)
        self.policy = settings.CONTENT_SECURITY_POLICY

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return self._protect(self.get_response(request))

    async def __acall__(self, request):
        return self._protect(await self.get_response(request))

    def _protect(self, response):
        if self.policy:
            response.headers.setdefault("Content-Security-Policy", self.policy)
        return response


def client_ip(request) -> str | None:
    """The client's address, for audit records and the limits on failed authentications: REMOTE_ADDR, or the
    address a trusted proxy (TRUSTED_PROXY_IPS) put in X-Forwarded-For. Never a forwarded address from anyone else:
    the header is the client's to choose, and an audit trail or a lockout must not rest on what a client claims."""
    return _client_address(request.META.get("REMOTE_ADDR"), request.META.get("HTTP_X_FORWARDED_FOR"))


def scope_client_ip(scope) -> str | None:
    """`client_ip` for an ASGI scope (Channels consumers)."""
    client = scope.get("client")
    forwarded = next((value.decode("latin-1") for name, value in scope.get("headers", [])
                      if name.lower() == b"x-forwarded-for"), None)
    return _client_address(client[0] if client else None, forwarded)


def _client_address(remote: str | None, forwarded: str | None) -> str | None:
    trusted = settings.TRUSTED_PROXY_IPS
    if not remote or remote not in trusted or not forwarded:
        return remote or None
    # Each proxy appends the address it saw: the rightmost one no trusted proxy added is the client.
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if hop not in trusted:
            return hop
    return hops[0] if hops else remote


# Enough to tell clients apart; a client-chosen header must not grow the audit table without bound.
USER_AGENT_LIMIT = 300


def user_agent(request) -> str:
    """The client's User-Agent header for audit records (client-supplied: a hint, not proof), cut to a bound."""
    return (request.META.get("HTTP_USER_AGENT") or "")[:USER_AGENT_LIMIT]


def audit_context(request, *, source: str) -> dict:
    """The keyword arguments every audited service takes about who acted, from where (admin, api, ...)."""
    return {"actor": request.user, "source": source, "ip_address": client_ip(request),
            "user_agent": user_agent(request)}


class QueryTextMiddleware(HybridMiddleware):
    """Refuses a request whose path or query string holds text no column can store (a NUL character) before a view
    passes it to the database, in its surface's format: Dify's envelope under /v1, DRF's field errors elsewhere."""

    def __call__(self, request):
        refusal = _query_text_refusal(request)
        if iscoroutinefunction(self):
            return self._acall(request, refusal)
        return refusal if refusal is not None else self.get_response(request)

    async def _acall(self, request, refusal):
        return refusal if refusal is not None else await self.get_response(request)


def _query_text_refusal(request) -> HttpResponse | None:
    problem = _query_text_problem(request)
    if problem is None:
        return None
    field, message = problem
    if request.path_info.startswith("/v1/"):
        return invalid_param(f"{field} {message}").response()
    return JsonResponse({field: [f"{message[0].upper()}{message[1:]}."]}, status=400)


def _query_text_problem(request) -> tuple[str, str] | None:
    problem = text_problem(request.path_info)
    if problem is not None:
        return "path", problem
    for key, values in request.GET.lists():
        problem = text_problem(key)
        if problem is not None:
            return "query string", problem
        for value in values:
            problem = text_problem(value)
            if problem is not None:
                return key, problem
    return None
