"""Our own dependencies (the database, Redis) being down: recognising it, a circuit breaker per dependency, and the
503 that every surface answers with instead of a traceback.

A request that meets a dead dependency marks it down; for DEPENDENCY_RETRY_SECONDS after that, every request that
needs it fails at once (no connect timeout, no pool wait) and one request at a time tries it again when the period
is over. The surfaces render the 503 in their own format (the middleware below asks opsagent.common.surfaces; the
WebSocket consumers and Dify's streaming views render their own); they all ask `dependency_down` what an exception
means.
"""
from __future__ import annotations

import logging
import threading
import time

import psycopg
import redis
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.utils.deprecation import MiddlewareMixin

from opsagent.common.surfaces import surface_for

logger = logging.getLogger(__name__)

UNAVAILABLE_MESSAGE = "The service is temporarily unavailable ({dependency} unreachable); please retry shortly."
# SQLSTATEs of a connection that the server ended or refused (class 08; admin/crash shutdown, starting up).
_CONNECTION_STATES = ("57P01", "57P02", "57P03")


class DependencyUnavailable(Exception):
    """A dependency of ours (`database`, `redis`) cannot be reached: the client gets a 503."""

    def __init__(self, dependency: str):
        super().__init__(UNAVAILABLE_MESSAGE.format(dependency=dependency))
        self.dependency = dependency
        self.message = str(self)

    @property
    def retry_after(self) -> int:
        """Seconds a client should wait before retrying (the Retry-After header)."""
        return retry_after()


class Dependency:
    """A circuit breaker: down since a failure, for DEPENDENCY_RETRY_SECONDS, then one caller at a time tries again."""

    def __init__(self, name: str):
        self.name = name
        self._retry_at = 0.0  # monotonic; 0 while the dependency is up
        self._lock = threading.Lock()
        # How many times it came back: connection pools made before the last return hold dead connections.
        self.recoveries = 0

    @property
    def is_down(self) -> bool:
        return self._retry_at != 0.0

    def check(self) -> bool:
        """Raise DependencyUnavailable while the dependency is known down. True for the one caller that should try
        it again now (the others keep failing at once meanwhile); False when it is up."""
        if not self._retry_at:
            return False
        with self._lock:
            now = time.monotonic()
            if not self._retry_at:
                return False
            if now < self._retry_at:
                raise DependencyUnavailable(self.name)
            self._retry_at = now + settings.DEPENDENCY_RETRY_SECONDS
            return True

    def down(self, cause: BaseException | None = None) -> None:
        with self._lock:
            if not self._retry_at:
                logger.warning("%s is unreachable (%r): failing requests that need it for %ss between retries",
                               self.name, cause, settings.DEPENDENCY_RETRY_SECONDS)
            self._retry_at = time.monotonic() + settings.DEPENDENCY_RETRY_SECONDS

    def up(self) -> None:
        if self._retry_at:
            with self._lock:
                if self._retry_at:
                    logger.warning("%s is reachable again", self.name)
                    self.recoveries += 1
                self._retry_at = 0.0


database = Dependency("database")
redis_server = Dependency("redis")


def _is_connection_failure(exc: BaseException) -> bool:
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        return state is None or state.startswith("08") or state in _CONNECTION_STATES
    return isinstance(exc, psycopg.InterfaceError)


def dependency_down(exc: BaseException | None) -> DependencyUnavailable | None:
    """The dependency failure that `exc` is or was caused by (the dependency is then marked down), else None.
    Django wraps psycopg's errors and Redis errors can come wrapped by callers, hence the walk along the causes."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DependencyUnavailable):
            return exc
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            redis_server.down(exc)
            return DependencyUnavailable(redis_server.name)
        if _is_connection_failure(exc):
            database.down(exc)
            return DependencyUnavailable(database.name)
        exc = exc.__cause__ or exc.__context__
    return None


class DependencyFailureMiddleware(MiddlewareMixin):
    """Django and DRF views: a dead dependency is a 503 in the surface's format (opsagent.common.surfaces: DRF's
    `{"detail", "code"}` on /api, Dify's envelope on /v1), not a 500 with a traceback in the log."""

    def process_exception(self, request, exception):
        failure = dependency_down(exception)
        if failure is None:
            return None
        logger.warning("%s %s: %s", request.method, request.path, failure.message)
        return surface_for(request.path).unavailable(failure).response()


def retry_after() -> int:
    return max(1, round(settings.DEPENDENCY_RETRY_SECONDS))


# ----- probes (the health check, the metrics) -----

def _probe(check) -> str:
    """"ok", or "unavailable" when the check fails because the dependency is down (known down: at once)."""
    try:
        return "ok" if check() else "unavailable"
    except Exception as exc:  # a server down, or a SQLite file that cannot be opened: unusable all the same
        dependency_down(exc)  # a server found down fails the requests that need it at once from now on
        return "unavailable"


def _database_answers() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone() == (1,)


def _cache_answers() -> bool:
    cache.set("health:probe", 1, 5)
    return cache.get("health:probe") == 1


def dependency_states() -> dict[str, str]:
    """{"database": "ok" | "unavailable", "cache": ...}: each asked now (synchronous: off the event loop)."""
    return {"database": _probe(_database_answers), "cache": _probe(_cache_answers)}
