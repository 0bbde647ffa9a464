"""Issue 15, item 13: concurrent writes through a real daphne never fail with "database is locked" (a 500).

On SQLite, a transaction that reads and then writes could not wait for the write lock: 32 concurrent set-default
requests gave 500s. Every transaction now takes the lock when it begins (`transaction_mode: IMMEDIATE`), so writers
wait their turn. The same tests run on PostgreSQL, where row locks do the waiting.
"""
from __future__ import annotations

import asyncio

import httpx
import pytest
from rest_framework.authtoken.models import Token

from agentcore.models import AgentApp
from difyapi.auth import api_key_create
from llmconfigs.models import LLMConfig
from tests.fakes.upstream import Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CONCURRENCY = 32


@pytest.fixture
def admin_token(django_user_model) -> str:
    admin = django_user_model.objects.create_superuser(username="root", password="pw-root-123")
    return Token.objects.create(user=admin).key


async def _all(requests) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*(request(client) for request in requests))


def test_concurrent_set_default_requests_all_succeed(daphne_server, make_llm_config, admin_token):
    configs = [make_llm_config(default=i == 0) for i in range(4)]
    headers = {"Authorization": f"Token {admin_token}"}

    def set_default(config):
        return lambda client: client.post(f"{daphne_server.base_url}/api/llm-configs/{config.pk}/set-default/",
                                          headers=headers)

    responses = asyncio.run(_all([set_default(configs[i % len(configs)]) for i in range(CONCURRENCY)]))
    assert sorted({r.status_code for r in responses}) == [200], [r.text for r in responses if r.status_code != 200]
    assert LLMConfig.objects.filter(is_default=True, is_embedding=False).count() == 1


def test_concurrent_chats_usage_updates_and_config_writes_all_succeed(daphne_server, default_llm_config,
                                                                      make_llm_config, admin_token, fake_upstream):
    other = make_llm_config()
    app = AgentApp.objects.create(name="busy", mode="chat")
    key = api_key_create(app=app)[1]
    chats = CONCURRENCY - 8
    fake_upstream.script(*(Reply(text=f"answer {i}") for i in range(chats)))

    def chat(i):
        body = {"inputs": {}, "query": f"question {i}", "user": f"user-{i % 4}", "response_mode": "blocking",
                "auto_generate_name": False}
        return lambda client: client.post(f"{daphne_server.base_url}/v1/chat-messages", json=body,
                                          headers={"Authorization": f"Bearer {key}"})

    def set_default(config):
        return lambda client: client.post(f"{daphne_server.base_url}/api/llm-configs/{config.pk}/set-default/",
                                          headers={"Authorization": f"Token {admin_token}"})

    # The chats answer with the app's config (pinned, so the default switching under them does not matter).
    AgentApp.objects.filter(pk=app.pk).update(llm_config=default_llm_config)
    requests = [chat(i) for i in range(chats)] + [set_default((other, default_llm_config)[i % 2]) for i in range(8)]
    responses = asyncio.run(_all(requests))
    assert [r.status_code for r in responses] == [200] * CONCURRENCY, [r.text for r in responses
                                                                       if r.status_code != 200]
    default_llm_config.refresh_from_db()
    # Every chat's usage was counted: no update lost, none failed.
    assert default_llm_config.usage_count == chats
