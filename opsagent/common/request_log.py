"""The request log line (method, path, status, duration; a warning when slow) and the record of the request being
served, which a run fills in (config, app, task id, time to first token) so that a streamed answer's line says what
a plain request's line says and more. Never bodies, query strings or headers: no key or message text reaches it."""
from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from django.conf import settings

logger = logging.getLogger("opsagent.requests")

_current: ContextVar[RequestRecord | None] = ContextVar("opsagent_request", default=None)


@dataclass
class RequestRecord:
    """One request (or one WebSocket turn), from its start to its log line. `surface` names where it came in (dify,
    rest, websocket, web): the metrics of the turns it runs carry it."""

    surface: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    config: str = ""
    app: str = ""
    task_id: str = ""
    ttft_ms: float | None = None
    outcome: str = ""  # a turn's end (normal, stopped, paused, error), or why it did not start (rate_limited, ...)
    written: bool = False

    def begin(self) -> RequestRecord:
        """Make this the current request of the running context (tasks started from it inherit it)."""
        _current.set(self)
        return self

    def write(self, status: int | None = None) -> None:
        """The log line, once: a warning when the request took over REQUEST_SLOW_SECONDS."""
        if self.written:
            return
        self.written = True
        if status is not None:
            self.status = status
        duration = time.perf_counter() - self.started
        level = logging.WARNING if duration > settings.REQUEST_SLOW_SECONDS else logging.INFO
        extra = {"method": self.method, "path": self.path, "status": self.status,
                 "duration_ms": round(duration * 1000, 1)}
        if self.outcome:
            extra["outcome"] = self.outcome
        if self.task_id:
            extra.update(surface=self.surface, config=self.config, app=self.app, task_id=self.task_id,
                         ttft_ms=self.ttft_ms)
        suffix = f" ttft={self.ttft_ms}ms" if self.ttft_ms is not None else ""
        logger.log(level, "%s %s %s %.1fms%s", self.method, self.path, self.status, duration * 1000, suffix,
                   extra=extra)


def request_current() -> RequestRecord | None:
    return _current.get()
