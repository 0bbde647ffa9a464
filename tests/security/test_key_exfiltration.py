"""Issue 15, item 3: a stored key could be sent anywhere by pointing the config's base URL at another host and testing
the connection. The attack, over HTTP against a real daphne: move the config to a second upstream (another port on
127.0.0.1) without the key, then test it; the second upstream must receive nothing. With the key entered again the
move works, the test reaches the new host with the new key, and the change is audited with actor, IP and
User-Agent."""
from __future__ import annotations

import httpx
import pytest
from django.contrib.auth.models import Permission
from rest_framework.authtoken.models import Token

from llmconfigs.models import AuditLog, LLMConfig
from tests.fakes.upstream import FakeUpstream, Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

STORED_KEY = "sk-stored-key-that-must-stay-home-0042"
NEW_KEY = "sk-key-entered-for-the-new-host-0043"
AGENT = "key-exfiltration-regression/1.0"


@pytest.fixture
def second_upstream():
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def operator(plain_user):
    for codename in ("change_llmconfig", "view_auditlog"):
        plain_user.user_permissions.add(Permission.objects.get(content_type__app_label="llmconfigs",
                                                               codename=codename))
    return plain_user


@pytest.fixture
def client(daphne_server, operator):
    token = Token.objects.create(user=operator)
    with httpx.Client(base_url=daphne_server.base_url, timeout=60,
                      headers={"Authorization": f"Token {token.key}", "User-Agent": AGENT}) as client:
        yield client


def test_moving_the_base_url_without_the_key_is_refused_and_the_key_never_leaves(
        client, make_llm_config, fake_upstream, second_upstream):
    config = make_llm_config(api_key=STORED_KEY)
    assert second_upstream.base_url != fake_upstream.base_url

    refused = client.patch(f"/api/llm-configs/{config.pk}/", json={"base_url": second_upstream.base_url})
    assert refused.status_code == 400 and list(refused.json()) == ["api_key"]
    assert LLMConfig.objects.get(pk=config.pk).base_url == fake_upstream.base_url

    fake_upstream.script(Reply(text="pong"))
    assert client.post(f"/api/llm-configs/{config.pk}/test/").json()["ok"] is True
    # The provider change that moves the endpoint to the provider's default is refused the same way.
    assert client.patch(f"/api/llm-configs/{config.pk}/", json={"base_url": "", "provider": "deepseek"}
                        ).status_code == 400
    assert second_upstream.requests == []
    assert [request.api_key for request in fake_upstream.chat_requests] == [STORED_KEY]


def test_with_the_key_entered_again_the_move_works_and_is_audited(client, operator, make_llm_config,
                                                                  second_upstream):
    config = make_llm_config(api_key=STORED_KEY)
    moved = client.patch(f"/api/llm-configs/{config.pk}/",
                         json={"base_url": second_upstream.base_url, "api_key": NEW_KEY})
    assert moved.status_code == 200, moved.text
    assert STORED_KEY not in moved.text and NEW_KEY not in moved.text

    second_upstream.script(Reply(text="pong"))
    assert client.post(f"/api/llm-configs/{config.pk}/test/").json()["ok"] is True
    assert [request.api_key for request in second_upstream.chat_requests] == [NEW_KEY]

    audit = AuditLog.objects.get(action="update", target_id=str(config.pk))
    assert (audit.actor_id, audit.source, audit.ip_address, audit.user_agent) == (operator.pk, "api", "127.0.0.1",
                                                                                   AGENT)
    assert audit.changes["base_url"]["new"] == second_upstream.base_url
    assert audit.changes["api_key_origin"]["new"] == f"http://127.0.0.1:{second_upstream.port}"
    assert STORED_KEY not in str(audit.changes) and NEW_KEY not in str(audit.changes)
    listed = client.get("/api/audit-logs/", params={"target_id": str(config.pk), "action": "update"}).json()
    assert listed["results"][0]["user_agent"] == AGENT
