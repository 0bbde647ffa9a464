"""Project middleware: the request log (method, path, status and duration of every request, warning when slow; never
bodies, query strings or headers, so no key or token can reach the log), the Content-Security-Policy header, and the
refusal of paths and query strings holding text no column can store."""
import logging
import time

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpResponse

from opsagent.common.client_input import text_problem
from opsagent.common.surfaces import surface_for

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


class QueryTextMiddleware(HybridMiddleware):
    """Refuses a request whose path or query string holds text no column can store (a NUL character) before a view
    passes it to the database, in its surface's format (opsagent.common.surfaces)."""

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
    return surface_for(request.path_info).bad_text(field, message).response()


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
