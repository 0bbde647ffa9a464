"""Django's Redis cache with one connection pool per process.

Django keeps a cache backend instance per thread and, under ASGI, per request context, and every instance of its
RedisCache builds its own redis-py connection pool: each request then opened a new Redis connection (a few ms before
its first cache read, and a connection left for the garbage collector). redis-py's pools are thread-safe, so the
instances here share one pool per server URL, and one redis-py client over it: Django builds a client object for
every operation (redis-py's client constructor fills a table of some 200 response callbacks each time, a third of
the CPU of a cache read), and a client is as thread-safe as the pool it borrows connections from.

Every operation goes through the Redis circuit breaker (opsagent.common.dependencies): with Redis down, a request
fails at once with DependencyUnavailable (a 503) instead of a traceback, and without waiting for a connection attempt.
"""
from __future__ import annotations

import functools
import threading

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
    cache.delete(key)
    transaction.on_commit(lambda: cache.delete(key))
