"""Issue 15 item 8 against a real daphne: oversized inputs, queries, file lists, feedback and names are refused with
an error naming the field (nothing stored), and uploads stop at the per end user and per app quotas, also when many
arrive at once."""
from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
import websockets
from django.conf import settings
from rest_framework.authtoken.models import Token

from agentcore.models import AgentApp, Message, Session
from difyapi.auth import api_key_create
from difyapi.models import UploadFile

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

USER = "limits-user"


def oversized_inputs() -> dict[str, tuple[dict, str]]:
    """Inputs that break one bound each (the settings' defaults), with words the refusal must contain."""
    deep: dict = {"leaf": 1}
    for _ in range(settings.INPUTS_MAX_DEPTH):
        deep = {"d": deep}
    return {
        "bytes": ({f"k{i}": "x" * 1000 for i in range(settings.INPUTS_MAX_BYTES // 1000 + 1)}, "bytes"),
        "keys": ({f"k{i}": i for i in range(settings.INPUTS_MAX_KEYS + 1)}, "keys"),
        "nested keys": ({"a": {f"k{i}": i for i in range(settings.INPUTS_MAX_KEYS)}}, "keys"),
        "key length": ({"k" * (settings.INPUTS_MAX_KEY_LENGTH + 1): 1}, "keys must be at most"),
        "value length": ({"text": "x" * (settings.INPUTS_MAX_VALUE_LENGTH + 1)}, "inputs.text must be at most"),
        "value length in a list": ({"list": ["x" * (settings.INPUTS_MAX_VALUE_LENGTH + 1)]}, "inputs.list[0]"),
        "depth": (deep, "nested at most"),
    }


@pytest.fixture
def dify_app(default_llm_config, fake_upstream):
    app = AgentApp.objects.create(name="limits", mode=AgentApp.Mode.CHAT, file_upload={"enabled": True})
    _, key = api_key_create(app=app)
    return app, key


def test_oversized_v1_chat_fields_are_refused_naming_the_field(daphne_server, dify_app, fake_upstream):
    app, key = dify_app
    session = Session.objects.create(app=app, end_user=USER, source=Session.Source.API)
    base = {"user": USER, "query": "hi", "inputs": {}, "response_mode": "blocking"}
    cases = [({**base, "inputs": inputs}, ["inputs", words]) for inputs, words in oversized_inputs().values()]
    # A continued conversation keeps every input it is sent: the same bounds apply.
    cases += [({**base, "conversation_id": str(session.pk), "inputs": inputs}, ["inputs", words])
              for inputs, words in oversized_inputs().values()]
    cases += [
        ({**base, "query": "q" * (settings.QUERY_MAX_LENGTH + 1)}, ["query", str(settings.QUERY_MAX_LENGTH)]),
        ({**base, "user": "u" * 256}, ["user", "255"]),
        ({**base, "files": [{"type": "image", "transfer_method": "remote_url", "url": f"https://x.test/{i}.png"}
                            for i in range(settings.WORKFLOW_FILE_UPLOAD_LIMIT + 1)]}, ["Number of files"]),
    ]
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=daphne_server.base_url, headers=headers, timeout=30) as client:
        for body, words in cases:
            response = client.post("/v1/chat-messages", json=body)
            assert response.status_code == 400, (words, response.text[:300])
            data = response.json()
            assert data["code"] == "invalid_param", data
            assert all(word in data["message"] for word in words), (words, data)
    assert Message.objects.count() == 0
    assert fake_upstream.chat_requests == []


def test_an_app_cannot_raise_its_file_limit_above_the_workflow_limit(daphne_server, default_llm_config):
    limit = settings.WORKFLOW_FILE_UPLOAD_LIMIT
    app = AgentApp.objects.create(name="many-files", mode=AgentApp.Mode.CHAT,
                                  file_upload={"enabled": True, "number_limits": 100_000})
    _, key = api_key_create(app=app)
    files = [{"type": "document", "transfer_method": "remote_url", "url": f"https://x.test/{i}.bin"}
             for i in range(limit + 1)]
    response = httpx.post(f"{daphne_server.base_url}/v1/chat-messages", headers={"Authorization": f"Bearer {key}"},
                          json={"user": USER, "query": "hi", "inputs": {}, "files": files}, timeout=30)
    assert response.json() == {"code": "invalid_param", "message": f"Number of files exceeds the limit of {limit}.",
                               "status": 400}


def test_oversized_feedback_and_conversation_name_are_refused(daphne_server, dify_app):
    app, key = dify_app
    session = Session.objects.create(app=app, end_user=USER, source=Session.Source.API, name="kept")
    message = Message.objects.create(session=session, query="q", answer="a", status=Message.Status.NORMAL)
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=daphne_server.base_url, headers=headers, timeout=30) as client:
        response = client.post(f"/v1/messages/{message.pk}/feedbacks", json={
            "user": USER, "rating": "like", "content": "c" * (settings.FEEDBACK_CONTENT_MAX_LENGTH + 1)})
        assert response.status_code == 400 and "content must be at most" in response.json()["message"]
        response = client.post(f"/v1/conversations/{session.pk}/name", json={"user": USER, "name": "n" * 256})
        assert response.status_code == 400 and "name must be at most 255" in response.json()["message"]
    session.refresh_from_db()
    assert session.name == "kept" and not message.feedbacks.exists()


def test_oversized_inputs_on_the_rest_api_and_the_websocket(daphne_server, default_llm_config, plain_user,
                                                           fake_upstream):
    token = Token.objects.create(user=plain_user).key
    headers = {"Authorization": f"Token {token}"}
    with httpx.Client(base_url=daphne_server.base_url, headers=headers, timeout=30) as client:
        for inputs, words in oversized_inputs().values():
            response = client.post("/api/agent/chat/", json={"message": "hi", "inputs": inputs})
            assert response.status_code == 400, response.text[:300]
            assert words in response.json()["inputs"][0], response.json()
            response = client.post("/api/sessions/", json={"name": "s", "inputs": inputs})
            assert response.status_code == 400, response.text[:300]
            assert words in response.json()["inputs"][0], response.json()
    assert not Session.objects.exists()

    session = Session.objects.create(app=AgentApp.objects.create(name="ws"), owner=plain_user)

    async def over_the_socket():
        url = f"{daphne_server.ws_url}/ws/agent/sessions/{session.id}/?token={token}"
        async with websockets.connect(url, open_timeout=10, max_size=None) as socket:
            for inputs, words in oversized_inputs().values():
                await socket.send(json.dumps({"type": "chat", "message": "hi", "inputs": inputs}))
                event = json.loads(await asyncio.wait_for(socket.recv(), timeout=15))
                assert event["type"] == "error" and words in event["fields"]["inputs"][0], event

    asyncio.run(over_the_socket())
    assert not Message.objects.exists()
    assert fake_upstream.chat_requests == []


def _upload(client: httpx.Client, user: str, size: int = 10) -> httpx.Response:
    return client.post("/v1/files/upload", data={"user": user},
                       files={"file": (f"{uuid.uuid4().hex}.txt", b"x" * size, "text/plain")})


def test_uploads_stop_at_the_end_user_and_the_app_quota(start_daphne, dify_app):
    app, key = dify_app
    server = start_daphne(UPLOAD_QUOTA_USER_FILES="2", UPLOAD_QUOTA_APP_FILES="3", UPLOAD_QUOTA_USER_MB="1")
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        assert [_upload(client, "alice").status_code for _ in range(2)] == [201, 201]
        refused = _upload(client, "alice")
        assert refused.status_code == 429
        assert refused.json()["code"] == "rate_limit_error" and "end user" in refused.json()["message"]
        assert _upload(client, "bob").status_code == 201
        refused = _upload(client, "carol")
        assert refused.status_code == 429 and "this app" in refused.json()["message"]
    assert UploadFile.objects.filter(app=app).count() == 3
    stored = list((settings.MEDIA_ROOT / "uploads" / str(app.pk)).iterdir())
    assert len(stored) == 3  # a refused upload leaves no bytes behind


def test_upload_bytes_quota(start_daphne, dify_app):
    app, key = dify_app
    server = start_daphne(UPLOAD_QUOTA_USER_MB="1")
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        assert _upload(client, "alice", size=600 * 1024).status_code == 201
        refused = _upload(client, "alice", size=600 * 1024)
        assert refused.status_code == 429 and "1 MB" in refused.json()["message"]
        assert _upload(client, "bob", size=600 * 1024).status_code == 201


def test_concurrent_uploads_cannot_overshoot_the_quota(start_daphne, dify_app):
    app, key = dify_app
    server = start_daphne(UPLOAD_QUOTA_USER_FILES="3")

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"},
                                     timeout=60) as client:
            async def one() -> int:
                response = await client.post("/v1/files/upload", data={"user": "alice"},
                                             files={"file": ("a.txt", b"hello", "text/plain")})
                return response.status_code

            return await asyncio.gather(*(one() for _ in range(12)))

    statuses = asyncio.run(burst())
    assert sorted(statuses) == [201] * 3 + [429] * 9, statuses
    assert UploadFile.objects.filter(app=app).count() == 3
