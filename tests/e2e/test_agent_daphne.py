"""End to end against a real daphne process: streaming agent chat over HTTP (including a client that goes away)
and a WebSocket turn, with the fake upstream as the model."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets
from rest_framework.authtoken.models import Token

from agentcore.models import AgentApp, Message, Session
from tests.fakes.upstream import Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def chat_setup(default_llm_config, plain_user):
    app = AgentApp.objects.create(name="OpsAgent", mode=AgentApp.Mode.CHAT, system_prompt="Answer briefly.")
    token = Token.objects.create(user=plain_user)
    return app, {"Authorization": f"Token {token.key}"}


async def _sse(response: httpx.Response):
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])


async def test_streaming_chat_over_http_arrives_chunk_by_chunk(daphne_server, chat_setup, fake_upstream):
    _, headers = chat_setup
    words = [f"part{i} " for i in range(6)]
    fake_upstream.script(Reply(chunks=words, delay=0.3))
    events, arrival = [], {}
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=daphne_server.base_url, headers=headers, timeout=30) as client:
        async with client.stream("POST", "/api/agent/chat/",
                                 json={"message": "go", "response_mode": "streaming"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for event in _sse(response):
                arrival.setdefault(event["type"], time.monotonic() - started)
                events.append(event)
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "".join(words)
    assert events[-1]["type"] == "end" and events[-1]["status"] == "normal"
    # The first delta came while the upstream was still sending (5 more chunks, 0.3 s apart), not at the end.
    assert arrival["end"] - arrival["delta"] > 1.0
    message = await Message.objects.aget(id=events[0]["message_id"])
    assert (message.status, message.answer) == ("normal", "".join(words))


async def test_client_going_away_stops_the_run_and_keeps_the_partial_answer(daphne_server, chat_setup,
                                                                            fake_upstream):
    _, headers = chat_setup
    fake_upstream.script(Reply(chunks=[f"w{i} " for i in range(100)], delay=0.1))
    async with httpx.AsyncClient(base_url=daphne_server.base_url, headers=headers, timeout=30) as client:
        async with client.stream("POST", "/api/agent/chat/",
                                 json={"message": "go", "response_mode": "streaming"}) as response:
            events = []
            async for event in _sse(response):
                events.append(event)
                if event["type"] == "delta":
                    break
    message_id = events[0]["message_id"]
    for _ in range(50):
        message = await Message.objects.aget(id=message_id)
        if message.status != "running":
            break
        await asyncio.sleep(0.1)
    assert message.status == "stopped"
    assert message.answer.startswith("w0") and len(message.answer) < len("".join(f"w{i} " for i in range(100)))


async def test_websocket_turn(daphne_server, chat_setup, plain_user, fake_upstream):
    app, headers = chat_setup
    session = await Session.objects.acreate(app=app, owner=plain_user)
    token = headers["Authorization"].split(" ", 1)[1]
    fake_upstream.script(Reply(text="Everything is green."))
    url = f"{daphne_server.ws_url}/ws/agent/sessions/{session.id}/?token={token}"
    async with websockets.connect(url, open_timeout=10) as socket:
        await socket.send(json.dumps({"type": "chat", "message": "status?"}))
        messages = []
        while True:
            message = json.loads(await asyncio.wait_for(socket.recv(), timeout=15))
            messages.append(message)
            if message["type"] == "end":
                break
    assert "".join(m["delta"] for m in messages if m["type"] == "delta") == "Everything is green."
    assert messages[-1]["status"] == "normal"
    assert await Message.objects.filter(session=session, status="normal").acount() == 1


async def test_websocket_without_credentials_is_closed_4401(daphne_server, chat_setup, plain_user):
    app, _ = chat_setup
    session = await Session.objects.acreate(app=app, owner=plain_user)
    async with websockets.connect(f"{daphne_server.ws_url}/ws/agent/sessions/{session.id}/") as socket:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), timeout=10)
    assert closed.value.rcvd.code == 4401
