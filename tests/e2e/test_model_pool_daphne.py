"""A model pool's cooldown over real HTTP: two daphne workers on one PostgreSQL database and one Redis share it, so
a member that failed on one worker is not called by the other."""
from __future__ import annotations

import os

import httpx
import pytest
from django.db import connection

from agentcore.models import AgentApp
from difyapi.auth import api_key_create
from tests.fakes.upstream import FakeUpstream, Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# The Redis database the two workers share (flushed by the test): REDIS_URL when the run has one.
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/14"


@pytest.fixture
def broken_upstream():
    server = FakeUpstream().start()
    server.default = Reply(status=500, error_message="upstream exploded")
    yield server
    server.stop()


def _ask(client: httpx.Client, base_url: str, key: str) -> dict:
    response = client.post(f"{base_url}/v1/chat-messages", headers={"Authorization": f"Bearer {key}"},
                           json={"inputs": {}, "query": "hi", "user": "alice", "response_mode": "blocking",
                                 "auto_generate_name": False, "model": "pool-e2e"})
    assert response.status_code == 200, response.text
    return response.json()


def test_two_workers_share_a_members_cooldown(start_daphne, make_llm_config, fake_upstream, broken_upstream):
    if connection.vendor != "postgresql":
        pytest.skip("two workers need a shared PostgreSQL database (SQLite is per process here)")
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    make_llm_config(name="pool-broken", model_name="broken-model", route="pool-e2e", priority=1,
                    base_url=broken_upstream.base_url)
    make_llm_config(name="pool-healthy", model_name="healthy-model", route="pool-e2e")
    fake_upstream.default = Reply(text="Healthy answers.")
    app = AgentApp.objects.create(name="pool-e2e", mode="chat")
    _, key = api_key_create(app=app)
    settings = {"REDIS_URL": REDIS_URL, "LLM_COOLDOWN_FAILURES": "3", "LLM_COOLDOWN_SECONDS": "120"}
    first, second = start_daphne(**settings), start_daphne(**settings)
    with httpx.Client(timeout=30) as client:
        # The broken member is tried first (higher priority) until its third failure cools it down...
        for _ in range(3):
            assert _ask(client, first.base_url, key)["answer"] == "Healthy answers."
        assert len(broken_upstream.chat_requests) == 3
        # ...and the other worker, which never saw it fail, leaves it alone.
        for _ in range(5):
            assert _ask(client, second.base_url, key)["answer"] == "Healthy answers."
    assert len(broken_upstream.chat_requests) == 3
    assert len(fake_upstream.chat_requests) == 8
