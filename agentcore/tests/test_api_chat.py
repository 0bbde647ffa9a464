"""REST agent chat: blocking and streaming turns against the fake upstream, model selection, refusals, stop."""
from __future__ import annotations

import uuid

import pytest
from channels.db import database_sync_to_async
from django.test import AsyncClient
from django.utils import timezone
from rest_framework.authtoken.models import Token

from agentcore.models import Message, Session
from agentcore.tests.factories import sse_events
from tests.fakes.upstream import Reply


class TokenClient:
    """An ASGI client (the streaming path runs as under daphne) that sends a DRF token and JSON bodies."""

    def __init__(self, key: str):
        self.client = AsyncClient()
        self.headers = {"Authorization": f"Token {key}"}

    async def post(self, path: str, data: dict | None = None):
        return await self.client.post(path, data or {}, content_type="application/json", headers=self.headers)


@pytest.fixture
def token_client(plain_user):
    return TokenClient(Token.objects.create(user=plain_user).key)


@pytest.mark.django_db(transaction=True)
def test_blocking_chat_creates_a_session_and_answers(user_client, plain_user, agent_app, fake_upstream):
    fake_upstream.script(Reply(text="All systems nominal.", prompt_tokens=12, completion_tokens=4))
    response = user_client.post("/api/agent/chat/", {"message": "How are things?"}, format="json")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert set(body) >= {"session_id", "message_id", "task_id", "answer", "status", "pending_approvals", "usage"}
    assert (body["answer"], body["status"], body["pending_approvals"]) == ("All systems nominal.", "normal", [])
    assert body["usage"]["total_tokens"] == 16
    session = Session.objects.get(id=body["session_id"])
    assert session.owner == plain_user and session.app == agent_app
    message = Message.objects.get(id=body["message_id"])
    assert (message.answer, message.status, str(message.task_id)) == ("All systems nominal.", "normal", body["task_id"])
    assert fake_upstream.chat_requests[-1].messages[-1]["content"] == "How are things?"


@pytest.mark.django_db(transaction=True)
def test_session_model_and_parameters_reach_the_upstream_and_turn_overrides_win(
    user_client, plain_user, chat_app, make_llm_config, fake_upstream
):
    session_config = make_llm_config(name="session-model", model_name="session-model-x")
    turn_config = make_llm_config(name="turn-model", model_name="turn-model-y")
    session = Session.objects.create(app=chat_app, owner=plain_user, llm_config=session_config,
                                     model_parameters={"temperature": 0.3, "max_tokens": 77})

    response = user_client.post("/api/agent/chat/", {"message": "hi", "session_id": str(session.id)}, format="json")
    assert response.status_code == 200, response.json()
    sent = fake_upstream.chat_requests[-1].body
    # The openai provider sends max_tokens under its current name.
    assert (sent["model"], sent["temperature"], sent["max_completion_tokens"]) == ("session-model-x", 0.3, 77)

    response = user_client.post("/api/agent/chat/", {
        "message": "again", "session_id": str(session.id), "model_config_id": str(turn_config.id),
        "temperature": 0.9,
    }, format="json")
    assert response.status_code == 200, response.json()
    sent = fake_upstream.chat_requests[-1].body
    assert (sent["model"], sent["temperature"], sent["max_completion_tokens"]) == ("turn-model-y", 0.9, 77)
    assert fake_upstream.chat_requests[-1].api_key == turn_config.api_key
    # The second turn continued the same conversation.
    assert [m["content"] for m in fake_upstream.chat_requests[-1].messages if m["role"] == "user"] == ["hi", "again"]


@pytest.mark.django_db(transaction=True)
def test_unknown_model_config_is_a_field_error_and_writes_nothing(user_client, agent_app, fake_upstream):
    response = user_client.post("/api/agent/chat/", {"message": "hi", "model_config_id": str(uuid.uuid4())},
                                format="json")
    assert response.status_code == 400
    assert "model_config_id" in response.json()
    assert not Session.objects.exists() and not Message.objects.exists()
    assert fake_upstream.chat_requests == []


@pytest.mark.django_db(transaction=True)
def test_a_refusal_about_no_field_is_detail_and_code(user_client):
    """No config at all: not a field's fault, so the body is {detail, code} like every other non-field error on /api."""
    response = user_client.post("/api/agent/chat/", {"message": "hi"}, format="json")
    assert response.status_code == 400
    assert response.json()["code"] == "no_usable_config" and "No LLM is configured" in response.json()["detail"]
    assert set(response.json()) == {"detail", "code"}
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("body, field", [
    ({"message": "   "}, "message"),
    ({"message": "hi", "temperature": 9}, "temperature"),
    ({"message": "hi", "response_mode": "telepathy"}, "response_mode"),
    ({"message": "hi", "max_tokens": "many"}, "max_tokens"),
])
def test_bad_input_is_a_field_error(user_client, agent_app, body, field):
    response = user_client.post("/api/agent/chat/", body, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_unknown_or_foreign_session_is_404(user_client, agent_app, django_user_model, fake_upstream):
    other = django_user_model.objects.create_user(username="bob", password="pw-bob-12345")
    foreign = Session.objects.create(app=agent_app, owner=other)
    for session_id in (uuid.uuid4(), foreign.id):
        response = user_client.post("/api/agent/chat/", {"message": "hi", "session_id": str(session_id)},
                                    format="json")
        assert response.status_code == 404
    assert not Message.objects.exists()
    assert fake_upstream.chat_requests == []


@pytest.mark.django_db(transaction=True)
def test_too_many_active_runs_is_429(user_client, plain_user, agent_app, fake_upstream):
    agent_app.max_active_requests = 1
    agent_app.save()
    session = Session.objects.create(app=agent_app, owner=plain_user)
    Message.objects.create(session=session, query="busy", status="running", heartbeat_at=timezone.now())
    response = user_client.post("/api/agent/chat/", {"message": "hi"}, format="json")
    assert response.status_code == 429
    assert Message.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_anonymous_chat_is_refused(api_client, agent_app):
    response = api_client.post("/api/agent/chat/", {"message": "hi"}, format="json")
    assert response.status_code == 401  # not authenticated (403 would be "authenticated but not allowed")
    assert response.json() == {"detail": "Authentication credentials were not provided."}


@pytest.mark.django_db(transaction=True)
async def test_streaming_chat_sends_json_events_ending_with_end(token_client, chat_app, fake_upstream):
    fake_upstream.script(Reply(text="Disk usage is at forty percent."))
    response = await token_client.post("/api/agent/chat/", {"message": "disk?", "response_mode": "streaming"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    assert response["Cache-Control"] == "no-cache" and response["X-Accel-Buffering"] == "no"
    events = sse_events(b"".join([chunk async for chunk in response.streaming_content]))
    assert events[0]["type"] == "run_started"
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "Disk usage is at forty percent."
    assert [e["type"] for e in events][-2:] == ["usage", "end"]
    assert events[-1]["status"] == "normal"
    message = await Message.objects.aget(id=events[0]["message_id"])
    assert (message.status, message.answer) == ("normal", "Disk usage is at forty percent.")


@pytest.mark.django_db(transaction=True)
async def test_streaming_upstream_error_ends_with_error_then_end(token_client, chat_app, fake_upstream):
    fake_upstream.script(Reply(status=401, error_message="bad key {api_key}"))
    response = await token_client.post("/api/agent/chat/", {"message": "hi", "response_mode": "streaming"})
    assert response.status_code == 200
    body = b"".join([chunk async for chunk in response.streaming_content])
    events = sse_events(body)
    assert [e["type"] for e in events][-2:] == ["error", "end"]
    assert events[-2]["category"] == "auth"
    assert events[-1]["status"] == "error"
    assert b"sk-test-" not in body


@pytest.mark.django_db(transaction=True)
async def test_stop_by_task_id_mid_stream_saves_the_partial_answer(token_client, chat_app, fake_upstream):
    words = [f"word{i} " for i in range(40)]
    fake_upstream.script(Reply(chunks=words, delay=0.1))
    response = await token_client.post("/api/agent/chat/", {"message": "talk", "response_mode": "streaming"})
    stream = response.streaming_content
    events: list[dict] = []
    async for chunk in stream:
        events.extend(sse_events(chunk))
        if any(e["type"] == "delta" for e in events):
            break
    task_id = events[0]["task_id"]
    stop = await token_client.post(f"/api/runs/{task_id}/stop/")
    assert stop.status_code == 200 and stop.json()["stopped"] is True
    async for chunk in stream:
        events.extend(sse_events(chunk))
    assert events[-1]["type"] == "end" and events[-1]["status"] == "stopped"
    message = await Message.objects.aget(task_id=task_id)
    assert message.status == "stopped"
    assert message.answer.startswith("word0") and len(message.answer) < len("".join(words))


@pytest.mark.django_db(transaction=True)
async def test_stop_of_someone_elses_task_does_nothing(chat_app, fake_upstream, django_user_model, token_client):
    other = await database_sync_to_async(django_user_model.objects.create_user)(username="bob", password="pw-bob-12345")
    token = await Token.objects.acreate(user=other)
    other_client = TokenClient(token.key)
    fake_upstream.script(Reply(chunks=[f"w{i} " for i in range(20)], delay=0.05))
    response = await token_client.post("/api/agent/chat/", {"message": "talk", "response_mode": "streaming"})
    stream = response.streaming_content
    first = sse_events(await anext(stream))
    stop = await other_client.post(f"/api/runs/{first[0]['task_id']}/stop/")
    assert stop.status_code == 200 and stop.json()["stopped"] is False
    events = [e async for chunk in stream for e in sse_events(chunk)]
    assert events[-1]["status"] == "normal"
