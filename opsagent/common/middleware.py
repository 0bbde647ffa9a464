"""Project middleware: the request log (method, path, status and duration of every request, warning when slow; never
bodies, query strings or headers, so no key or token can reach the log), the Content-Security-Policy header, and the
refusal of paths and query strings holding text no column can store."""
from collections.abc import AsyncIterator

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpResponse

from opsagent.common.client_input import text_problem
from opsagent.common.request_log import RequestRecord
from opsagent.common.surfaces import surface_for


class HybridMiddleware:
    """A middleware that runs on the event loop under ASGI (no thread hop per request) and plainly under WSGI."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)


class RequestLogMiddleware(HybridMiddleware):
    """Starts each request's record (opsagent.common.request_log) and writes its line when the response is ready; for
    a streamed response, when its stream ends, with what the run put in the record (time to first token, config)."""

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        record = self._begin(request)
        return self._logged(self.get_response(request), record)

    async def __acall__(self, request):
        record = self._begin(request)
        return self._logged(await self.get_response(request), record)

    @staticmethod
    def _logged(response, record: RequestRecord):
        # Under ASGI a stream is sent on the event loop after this returns (even when this ran in a thread).
        if response.streaming and response.is_async:
            record.status = response.status_code
            response.streaming_content = _written_when_done(response.streaming_content, record)
        else:
            record.write(response.status_code)
        return response

    @staticmethod
    def _begin(request) -> RequestRecord:
        return RequestRecord(surface=surface_for(request.path).name, method=request.method,
                             path=request.path).begin()


async def _written_when_done(content: AsyncIterator[bytes], record: RequestRecord) -> AsyncIterator[bytes]:
    try:
        async for part in content:
            yield part
    finally:
        record.write()


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
