"""With REDIS_URL, the cache shares one Redis connection pool per process: under ASGI Django builds a cache backend
per request context, and each used to open its own connections."""
from __future__ import annotations

import asyncio
import contextvars

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import caches

from opsagent.common.cache import SharedPoolRedisCache


def _connected_clients() -> int:
    import redis

    return redis.Redis.from_url(settings.CACHES["default"]["LOCATION"]).info("clients")["connected_clients"]


@pytest.mark.skipif("redis" not in settings.CACHES["default"]["BACKEND"].lower(), reason="needs REDIS_URL")
async def test_requests_in_their_own_contexts_reuse_the_processs_redis_connections():
    assert isinstance(caches["default"], SharedPoolRedisCache)

    def read() -> SharedPoolRedisCache:
        backend = caches["default"]
        backend.get("cache-test")
        return backend

    def in_a_new_request():  # a fresh context, as daphne gives each request
        return asyncio.create_task(sync_to_async(read)(), context=contextvars.Context())

    await in_a_new_request()  # the pool has its connection now
    before = _connected_clients()
    backends = []  # kept, so that no instance is collected and its id reused
    for _ in range(20):
        backends.append(await in_a_new_request())
    assert len({id(b) for b in backends}) > 1  # Django did build several backend instances...
    assert _connected_clients() - before <= 1  # ...and they did not open a connection each


@pytest.mark.skipif("redis" not in settings.CACHES["default"]["BACKEND"].lower(), reason="needs REDIS_URL")
async def test_requests_in_their_own_contexts_share_one_redis_client():
    """Django builds a redis-py client for every cache operation (its constructor alone costs about 80 us): the
    backends of every request share one, as they share its pool."""

    def client_of_a_read():
        backend = caches["default"]
        backend.get("cache-test")
        return backend._cache.get_client(write=False), backend._cache.get_client(write=True)

    clients = [await asyncio.create_task(sync_to_async(client_of_a_read)(), context=contextvars.Context())
               for _ in range(5)]
    assert len({id(client) for pair in clients for client in pair}) == 1


@pytest.mark.django_db
def test_entries_read_ahead_come_with_the_first_read_and_are_taken_once():
    from django.core.cache import cache

    from opsagent.common.cache import cache_forget, cache_get, cache_get_many, cache_read_ahead

    cache.set_many({"ahead-a": 1, "ahead-b": 2, "ahead-key": "k"})
    try:
        with cache_read_ahead(["ahead-a", "ahead-b", "ahead-none"]):
            assert cache_get("ahead-key") == "k"  # brings the others along
            cache.set_many({"ahead-a": 10, "ahead-b": 20})  # another process writes meanwhile
            assert cache_get_many(["ahead-a", "ahead-none"]) == {"ahead-a": 1}  # what the first read found
            assert cache_get("ahead-a") == 10  # taken once: the next read asks the cache
            cache_forget("ahead-b")  # this request changes the entry's rows: what was read ahead is dropped
            assert cache_get("ahead-b") is None
        assert cache_get("ahead-a") == 10
        with cache_read_ahead(["ahead-a"]):
            cache_forget("ahead-b")  # before the scope's first read: nothing read ahead to drop yet
            assert cache_get("ahead-a") == 10
    finally:
        cache.delete_many(["ahead-a", "ahead-b", "ahead-key"])
