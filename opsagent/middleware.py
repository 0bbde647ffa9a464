"""Project middleware. Request logging: method, path, status and duration of every request (warning when slow), never
bodies, query strings or headers, so no key or token can reach the log. And the refusal of paths and query strings
holding text no column can store."""
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


def client_ip(request) -> str | None:
    """The client's address for audit records. REMOTE_ADDR only: X-Forwarded-For is client-controlled unless a trusted
    proxy rewrites it, and an audit trail must not record what the client chose to claim."""
    return request.META.get("REMOTE_ADDR") or None


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
