"""Rate limits over real HTTP: two daphne workers on one PostgreSQL database and one Redis count one app's requests
together, so N concurrent requests against a limit of K let exactly K through whichever worker they reach."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from django.db import connection

from agentcore.models import AgentApp
from difyapi.auth import api_key_create
from tests.fakes.upstream import Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/14"
REQUESTS, LIMIT = 24, 7


def _ask(base_url: str, key: str) -> int:
    with httpx.Client(timeout=60) as client:
        return client.post(f"{base_url}/v1/chat-messages", headers={"Authorization": f"Bearer {key}"},
                           json={"inputs": {}, "query": "hi", "user": "alice", "response_mode": "blocking",
                                 "auto_generate_name": False}).status_code


def test_two_workers_sharing_redis_let_exactly_the_limit_through(start_daphne, default_llm_config, fake_upstream):
    if connection.vendor != "postgresql":
        pytest.skip("two workers need a shared PostgreSQL database (SQLite is per process here)")
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    fake_upstream.default = Reply(text="ok")
    app = AgentApp.objects.create(name="limits-e2e", mode="chat", requests_per_minute=LIMIT)
    _, key = api_key_create(app=app)
    _, warm_key = api_key_create(app=AgentApp.objects.create(name="limits-e2e-warm", mode="chat"))
    workers = [start_daphne(REDIS_URL=REDIS_URL), start_daphne(REDIS_URL=REDIS_URL)]
    # One answer on each worker first (with an app without limits), so that the burst finds the checkpoint tables
    # set up: two workers setting them up at once race (a unique violation, a 500) whatever the limits.
    for worker in workers:
        assert _ask(worker.base_url, warm_key) == 200
    fake_upstream.reset()
    fake_upstream.default = Reply(text="ok")
    if time.time() % 60 > 45:  # all requests in one UTC minute: a new minute starts a new count
        time.sleep(61 - time.time() % 60)

    with ThreadPoolExecutor(max_workers=REQUESTS) as pool:
        statuses = list(pool.map(lambda i: _ask(workers[i % 2].base_url, key), range(REQUESTS)))
    assert sorted(statuses) == [200] * LIMIT + [429] * (REQUESTS - LIMIT)
    assert len(fake_upstream.chat_requests) == LIMIT
