"""Django's Redis cache with one connection pool per process.

Django keeps a cache backend instance per thread and, under ASGI, per request context, and every instance of its
RedisCache builds its own redis-py connection pool: each request then opened a new Redis connection (a few ms before
its first cache read, and a connection left for the garbage collector). redis-py's pools are thread-safe, so the
instances here share one pool per server URL, and one redis-py client over it: Django builds a client object for
every operation (redis-py's client constructor fills a table of some 200 response callbacks each time, a third of
the CPU of a cache read), and a client is as thread-safe as the pool it borrows connections from.

Every operation goes through the Redis circuit breaker (opsagent.common.dependencies): with Redis down, a request
fails at once with DependencyUnavailable (a 503) instead of a traceback, and without waiting for a connection attempt.

A request that reads several entries in one hop (a turn: its key, the config generation, the app's reply setting,
the tool setup stamp) reads them in one round trip inside `cache_read_ahead`.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from django.core.cache import cache
from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from django.db import transaction
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from opsagent.common.dependencies import DependencyUnavailable, redis_server

# (server URL, pool options) -> (the connection pool, a client over it), for the whole process.
_shared: dict[tuple[str, tuple], tuple[object, object]] = {}
_lock = threading.Lock()


class SharedPoolRedisCacheClient(RedisCacheClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shared_by_index: dict[int, tuple[object, object]] = {}  # the key is built once per instance

    def _shared_of(self, write):
        index = self._get_connection_pool_index(write)
        shared = self._shared_by_index.get(index)
        if shared is None:
            server = self._servers[index]
            key = (server, tuple(sorted((k, repr(v)) for k, v in self._pool_options.items())))
            shared = _shared.get(key)
            if shared is None:
                with _lock:
                    shared = _shared.get(key)
                    if shared is None:
                        pool = self._pool_class.from_url(server, **self._pool_options)
                        shared = _shared[key] = (pool, self._client(connection_pool=pool))
            self._shared_by_index[index] = shared
        return shared

    def _get_connection_pool(self, write):
        return self._shared_of(write)[0]

    def get_client(self, key=None, *, write=False):
        return self._shared_of(write)[1]


def _guarded(operation):
    @functools.wraps(operation)
    def call(self, *args, **kwargs):
        redis_server.check()
        try:
            result = operation(self, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            redis_server.down(exc)
            raise DependencyUnavailable(redis_server.name) from exc
        redis_server.up()
        return result

    return call


for _name in ("add", "get", "set", "touch", "delete", "get_many", "has_key", "incr", "set_many", "delete_many",
              "clear"):
    setattr(SharedPoolRedisCacheClient, _name, _guarded(getattr(RedisCacheClient, _name)))


class SharedPoolRedisCache(RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient


def cache_forget(key: str) -> None:
    """Delete a cached entry whose rows are changing: now, and again once the current transaction commits (a request
    between the change and its commit may have cached the old rows again)."""
    ahead = _ahead.get()
    if ahead is not None and ahead.found is not None:
        ahead.found.pop(key, None)
    cache.delete(key)
    transaction.on_commit(lambda: cache.delete(key))


# ----- reads ahead: the entries one hop will read, in the round trip of its first read -----

_ABSENT = object()


class _ReadAhead:
    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = list(dict.fromkeys(keys))
        self.found: dict[str, Any] | None = None  # once read: each key's value, _ABSENT for a miss


_ahead: ContextVar[_ReadAhead | None] = ContextVar("cache_read_ahead", default=None)


@contextlib.contextmanager
def cache_read_ahead(keys: Iterable[str]) -> Iterator[None]:
    """Inside, the first read through cache_get or cache_get_many also reads `keys`, and a later read of one of them
    takes what that read found instead of another round trip: as if it had been made a moment earlier, in the same
    hop. Each value read ahead is taken once (a read after a write of the key goes to the cache), and cache_forget
    drops it. Nested scopes are the outer one."""
    if _ahead.get() is not None:
        yield
        return
    token = _ahead.set(_ReadAhead(keys))
    try:
        yield
    finally:
        _ahead.reset(token)


def cache_get_many(keys: Iterable[str]) -> dict[str, Any]:
    """cache.get_many, taking the entries read ahead (see cache_read_ahead)."""
    keys = list(keys)
    ahead = _ahead.get()
    if ahead is None:
        return cache.get_many(keys)
    if ahead.found is None:
        wanted = list(dict.fromkeys(keys + ahead.keys))
        entries = cache.get_many(wanted)
        ahead.found = {key: entries.get(key, _ABSENT) for key in wanted if key not in keys}
        return {key: entries[key] for key in keys if key in entries}
    result: dict[str, Any] = {}
    rest = []
    for key in keys:
        value = ahead.found.pop(key, None)
        if value is None:
            rest.append(key)
        elif value is not _ABSENT:
            result[key] = value
    if rest:
        result.update(cache.get_many(rest))
    return result


def cache_get(key: str, default: Any = None) -> Any:
    """cache.get, taking the entry read ahead (see cache_read_ahead)."""
    ahead = _ahead.get()
    if ahead is None:
        return cache.get(key, default)
    return cache_get_many([key]).get(key, default)
