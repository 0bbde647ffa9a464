"""The agent WebSocket: auth (session or token), chat streaming, approvals, stop, disconnect and bad messages."""
from __future__ import annotations

import asyncio
import uuid

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client
from rest_framework.authtoken.models import Token

from agentcore.models import Approval, Message, Session
from agentcore.routing import websocket_application
from llmconfigs.models import AuditLog
from tests.fakes.upstream import Reply, ToolCall

pytestmark = pytest.mark.django_db(transaction=True)
TIMEOUT = 10


@pytest.fixture
def session(plain_user, agent_app):
    return Session.objects.create(app=agent_app, owner=plain_user)


@pytest.fixture
def token(plain_user):
    return Token.objects.create(user=plain_user).key


async def _connect(session_id, *, token: str | None = None, headers=None) -> WebsocketCommunicator:
    path = f"/ws/agent/sessions/{session_id}/" + (f"?token={token}" if token else "")
    communicator = WebsocketCommunicator(websocket_application, path, headers=headers or [])
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    return communicator


async def _session_cookie(user) -> str:
    client = Client()
    # database_sync_to_async closes the thread's connection afterwards: left open, it can hold SQLite's lock.
    await database_sync_to_async(client.force_login)(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


async def _until_end(communicator: WebsocketCommunicator) -> list[dict]:
    messages = []
    while True:
        message = await communicator.receive_json_from(timeout=TIMEOUT)
        messages.append(message)
        assert message["type"] != "error", message
        if message["type"] == "end":
            return messages


async def _close_code(communicator: WebsocketCommunicator) -> int:
    output = await communicator.receive_output(timeout=TIMEOUT)
    assert output["type"] == "websocket.close"
    await communicator.disconnect(code=output["code"], timeout=TIMEOUT)
    return output["code"]


async def test_unauthenticated_and_bad_token_are_closed_4401(session):
    assert await _close_code(await _connect(session.id)) == 4401
    assert await _close_code(await _connect(session.id, token="not-a-token")) == 4401


async def test_another_users_session_is_closed_4404(session, django_user_model):
    other = await database_sync_to_async(django_user_model.objects.create_user)(username="bob", password="pw-bob-12345")
    other_token = await Token.objects.acreate(user=other)
    assert await _close_code(await _connect(session.id, token=other_token.key)) == 4404


async def test_chat_streams_deltas_and_ends(session, token, fake_upstream):
    fake_upstream.script(Reply(text="Load is low and memory is fine."))
    communicator = await _connect(session.id, token=token)
    await communicator.send_json_to({"type": "chat", "message": "status?", "temperature": 0.4})
    messages = await _until_end(communicator)
    assert messages[0]["type"] == "run_started"
    deltas = [m for m in messages if m["type"] == "delta"]
    assert "".join(m["delta"] for m in deltas) == "Load is low and memory is fine."
    assert messages[-1]["status"] == "normal" and "usage" in [m["type"] for m in messages]
    assert fake_upstream.chat_requests[-1].body["temperature"] == 0.4
    message = await Message.objects.aget(id=messages[0]["message_id"])
    assert (message.session_id, message.status, message.answer) == (session.id, "normal",
                                                                       "Load is low and memory is fine.")
    await communicator.disconnect()


async def test_django_session_cookie_authenticates(session, plain_user, fake_upstream):
    cookie = await _session_cookie(plain_user)
    communicator = await _connect(session.id, headers=[(b"cookie", cookie.encode()),
                                                       (b"origin", b"http://localhost:8000")])
    await communicator.send_json_to({"type": "chat", "message": "hi"})
    assert (await _until_end(communicator))[-1]["status"] == "normal"
    await communicator.disconnect()


async def test_session_cookie_from_a_foreign_page_is_not_enough(session, plain_user):
    cookie = await _session_cookie(plain_user)
    communicator = await _connect(session.id, headers=[(b"cookie", cookie.encode()),
                                                       (b"origin", b"https://evil.example")])
    assert await _close_code(communicator) == 4401


async def test_bad_messages_get_errors_and_the_socket_stays_usable(session, token, fake_upstream):
    communicator = await _connect(session.id, token=token)
    await communicator.send_to(text_data="{not json")
    assert (await communicator.receive_json_from(timeout=TIMEOUT))["code"] == "invalid_json"
    await communicator.send_to(text_data="[1, 2]")
    assert (await communicator.receive_json_from(timeout=TIMEOUT))["code"] == "invalid_json"
    await communicator.send_json_to({"type": "dance"})
    assert (await communicator.receive_json_from(timeout=TIMEOUT))["code"] == "unknown_type"
    await communicator.send_json_to({"type": "chat", "message": ""})
    error = await communicator.receive_json_from(timeout=TIMEOUT)
    assert error["type"] == "error" and "message" in error["fields"]
    await communicator.send_json_to({"type": "chat", "message": "hi", "model_config_id": str(uuid.uuid4())})
    error = await communicator.receive_json_from(timeout=TIMEOUT)
    assert error["type"] == "error" and "model_config_id" in error["fields"]
    await communicator.send_json_to({"type": "stop"})
    assert (await communicator.receive_json_from(timeout=TIMEOUT))["code"] == "not_running"
    await communicator.send_json_to({"type": "chat", "message": "still there?"})
    assert (await _until_end(communicator))[-1]["status"] == "normal"
    await communicator.disconnect()


@pytest.mark.usefixtures("http_check_needs_approval")
async def test_approval_over_the_socket(session, token, fake_upstream, counting_target):
    fake_upstream.script(Reply(tool_calls=[ToolCall("http_check", {"url": counting_target.url})]),
                         Reply(text="It is up."))
    communicator = await _connect(session.id, token=token, headers=[(b"user-agent", b"ws-approver/3")])
    await communicator.send_json_to({"type": "chat", "message": "is it up?"})
    messages = await _until_end(communicator)
    [required] = [m for m in messages if m["type"] == "approval_required"]
    assert required["tool"] == "http_check"
    assert messages[-1]["status"] == "paused"
    assert counting_target.hits == 0

    await communicator.send_json_to({"type": "approval", "id": required["approval_id"], "decision": "approve"})
    messages = await _until_end(communicator)
    assert any(m["type"] == "tool_result" and '"status": 200' in m["observation"] for m in messages)
    assert messages[-1]["status"] == "normal" and messages[-1]["answer"] == "It is up."
    assert counting_target.hits == 1
    assert (await Approval.objects.aget(id=required["approval_id"])).status == "approved"
    [row] = [row async for row in AuditLog.objects.filter(action="decide", target_id=required["approval_id"])]
    assert (row.source, row.user_agent, row.changes["status"]["new"]) == ("websocket", "ws-approver/3", "approved")
    assert row.actor_repr == session.owner.username

    await communicator.send_json_to({"type": "approval", "id": required["approval_id"], "decision": "reject"})
    error = await communicator.receive_json_from(timeout=TIMEOUT)
    assert error["code"] == "approval_already_decided"
    await communicator.disconnect()


@pytest.fixture
def slow_channel_layer(settings):
    # Group changes take a round trip with Redis; a run leaves its stop group after its last event is computed.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "tests.fakes.layers.SlowGroupsChannelLayer"}}


@pytest.mark.usefixtures("slow_channel_layer")
async def test_the_next_message_may_follow_the_end_at_once(session, token, fake_upstream):
    fake_upstream.script(Reply(text="First."), Reply(text="Second."))
    communicator = await _connect(session.id, token=token)
    await communicator.send_json_to({"type": "chat", "message": "one"})
    assert (await _until_end(communicator))[-1]["answer"] == "First."
    await communicator.send_json_to({"type": "chat", "message": "two"})
    messages = await _until_end(communicator)
    assert messages[-1]["status"] == "normal" and messages[-1]["answer"] == "Second."
    await communicator.disconnect()


async def test_stop_ends_the_run_with_the_partial_answer(session, token, fake_upstream):
    words = [f"word{i} " for i in range(50)]
    fake_upstream.script(Reply(chunks=words, delay=0.1))
    communicator = await _connect(session.id, token=token)
    await communicator.send_json_to({"type": "chat", "message": "talk"})
    first = await communicator.receive_json_from(timeout=TIMEOUT)
    while (await communicator.receive_json_from(timeout=TIMEOUT))["type"] != "delta":
        pass
    await communicator.send_json_to({"type": "chat", "message": "another"})
    assert (await communicator.receive_json_from(timeout=TIMEOUT))["code"] == "run_in_progress"
    await communicator.send_json_to({"type": "stop"})
    messages = await _until_end(communicator)
    assert messages[-1]["status"] == "stopped"
    message = await Message.objects.aget(id=first["message_id"])
    assert message.status == "stopped"
    assert message.answer.startswith("word0") and len(message.answer) < len("".join(words))
    await communicator.disconnect()


async def test_disconnect_stops_the_run_and_saves_the_partial_answer(session, token, fake_upstream):
    words = [f"word{i} " for i in range(50)]
    fake_upstream.script(Reply(chunks=words, delay=0.1))
    communicator = await _connect(session.id, token=token)
    await communicator.send_json_to({"type": "chat", "message": "talk"})
    first = await communicator.receive_json_from(timeout=TIMEOUT)
    while (await communicator.receive_json_from(timeout=TIMEOUT))["type"] != "delta":
        pass
    await communicator.disconnect(timeout=TIMEOUT)
    message = await Message.objects.aget(id=first["message_id"])
    assert message.status == "stopped"
    assert message.answer.startswith("word0") and len(message.answer) < len("".join(words))
    for _ in range(20):  # the upstream sees its stream cancelled shortly after
        if fake_upstream.cancelled_streams:
            break
        await asyncio.sleep(0.1)
    assert fake_upstream.cancelled_streams == 1


async def test_stop_right_after_chat_still_stops_the_run_cleanly(session, token, fake_upstream):
    fake_upstream.script(Reply(text="too late", first_delay=2.0))
    communicator = await _connect(session.id, token=token)
    await communicator.send_json_to({"type": "chat", "message": "talk"})
    await communicator.send_json_to({"type": "stop"})
    messages = await _until_end(communicator)
    assert messages[-1]["status"] == "stopped"
    message = await Message.objects.aget(session=session)
    assert message.status == "stopped" and message.answer == ""
    await communicator.disconnect()
