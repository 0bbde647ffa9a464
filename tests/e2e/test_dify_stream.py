"""The Dify streaming endpoint over real HTTP: daphne subprocesses, httpx streaming clients, and a stop that crosses
workers through Redis while both share PostgreSQL."""
from __future__ import annotations

import time

import httpx
import pytest
from django.db import connection

from agentcore.models import AgentApp, Message
from difyapi.auth import api_key_create
from tests.e2e.dify_servers import parse_sse
from tests.fakes.upstream import Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

REDIS_URL = "redis://127.0.0.1:6379/15"
SLOW = Reply(text=" ".join(f"word{i}" for i in range(60)), delay=0.15)


@pytest.fixture
def app_key(default_llm_config) -> str:
    app = AgentApp.objects.create(name="e2e-chat", mode="chat")
    _, key = api_key_create(app=app)
    return key


def chat_body(**fields) -> dict:
    return {"inputs": {}, "query": "hello over http", "user": "alice", "response_mode": "streaming",
            "auto_generate_name": False, **fields}


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def test_stream_over_real_http_is_strict_sse_with_pings(start_daphne, app_key, fake_upstream):
    server = start_daphne(DIFY_PING_INTERVAL="0.1")
    fake_upstream.script(Reply(text="one two three four", delay=0.2))
    reads = []
    with httpx.Client(timeout=20) as client:
        with client.stream("POST", f"{server.base_url}/v1/chat-messages", json=chat_body(),
                           headers=headers(app_key)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            assert "content-encoding" not in response.headers
            for chunk in response.iter_raw():
                reads.append(chunk)
    raw = b"".join(reads)
    parsed = parse_sse(raw)
    assert "ping" in parsed
    events = [e for e in parsed if isinstance(e, dict)]
    assert [e["event"] for e in events] == ["message"] * 4 + ["message_end"]
    assert "".join(e["answer"] for e in events[:-1]) == "one two three four"
    # The events arrived spread over the run, not in one buffered write at the end.
    assert len(reads) >= 4


def test_errors_before_the_stream_are_json_over_real_http(daphne_server, app_key):
    response = httpx.post(f"{daphne_server.base_url}/v1/chat-messages", json=chat_body(query=""),
                          headers=headers(app_key), timeout=10)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"code": "invalid_param", "message": "query is required", "status": 400}


def test_client_disconnect_over_real_http_saves_the_partial_answer(daphne_server, app_key, fake_upstream):
    fake_upstream.script(SLOW)
    with httpx.Client(timeout=20) as client:
        with client.stream("POST", f"{daphne_server.base_url}/v1/chat-messages", json=chat_body(),
                           headers=headers(app_key)) as response:
            first = next(e for e in _events(response))
    deadline = time.monotonic() + 5
    message = Message.objects.get(pk=first["message_id"])
    while message.status == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        message.refresh_from_db()
    assert message.status == "stopped"
    assert message.answer.startswith(first["answer"]) and len(message.answer) < len(SLOW.text)


def _events(response: httpx.Response):
    """Parse a live SSE response block by block (strictly: each block is a ping or one data line)."""
    buffer = b""
    for chunk in response.iter_raw():
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            for item in parse_sse(block + b"\n\n"):
                if isinstance(item, dict):
                    yield item


def test_stop_through_another_worker_ends_the_stream_within_a_second(start_daphne, app_key, fake_upstream):
    if connection.vendor != "postgresql":
        pytest.skip("two workers need a shared PostgreSQL database (SQLite is per process here); CI runs this on "
                    "PostgreSQL")
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    streaming = start_daphne(REDIS_URL=REDIS_URL)
    stopping = start_daphne(REDIS_URL=REDIS_URL)
    fake_upstream.script(SLOW)
    events = []
    with httpx.Client(timeout=20) as client:
        with client.stream("POST", f"{streaming.base_url}/v1/chat-messages", json=chat_body(),
                           headers=headers(app_key)) as response:
            stream = _events(response)
            events.append(next(stream))
            stop = client.post(f"{stopping.base_url}/v1/chat-messages/{events[0]['task_id']}/stop",
                               json={"user": "alice"}, headers=headers(app_key))
            stopped_at = time.monotonic()
            assert (stop.status_code, stop.json()) == (200, {"result": "success"})
            events.extend(stream)
            elapsed = time.monotonic() - stopped_at
    assert events[-1]["event"] == "message_end"
    assert elapsed < 1.0, elapsed
    message = Message.objects.get(pk=events[0]["message_id"])
    assert message.status == "stopped"
    streamed = "".join(e["answer"] for e in events if e["event"] == "message")
    assert message.answer == streamed and len(streamed) < len(SLOW.text)


def test_blocking_over_real_http(daphne_server, app_key, fake_upstream):
    fake_upstream.script(Reply(text="blocking works"))
    response = httpx.post(f"{daphne_server.base_url}/v1/chat-messages",
                          json=chat_body(response_mode="blocking"), headers=headers(app_key), timeout=20)
    assert response.status_code == 200
    data = response.json()
    assert data["answer"] == "blocking works" and data["event"] == "message"
    assert b'"answer":"blocking works"' in response.content  # compact JSON


def test_a_server_that_answered_exits_at_once_on_sigterm(daphne_server, app_key, fake_upstream):
    # The server keeps its checkpoint connections for its whole life (on SQLite an aiosqlite thread): none of them
    # may keep the process alive after daphne stops.
    fake_upstream.script(Reply(text="still here"))
    response = httpx.post(f"{daphne_server.base_url}/v1/chat-messages",
                          json=chat_body(response_mode="blocking"), headers=headers(app_key), timeout=20)
    assert response.json()["answer"] == "still here"
    daphne_server.process.terminate()
    assert daphne_server.process.wait(10) == 0


def test_completion_messages_over_real_http(daphne_server, default_llm_config, fake_upstream):
    """A completion app through daphne: streamed as Dify's completion events (no conversation_id), then blocking."""
    from difyapi.tests.openapi import assert_schema

    app = AgentApp.objects.create(name="e2e-completion", mode="completion", system_prompt="Runbook for {{host}}.",
                                  user_input_form=[{"text-input": {"label": "Host", "variable": "host",
                                                                   "required": True}}])
    _, key = api_key_create(app=app)
    body = {"inputs": {"host": "db1"}, "query": "restart postgres", "user": "alice", "response_mode": "streaming"}
    fake_upstream.script(Reply(text="drain then restart", delay=0.05), Reply(text="in one piece"))
    with httpx.Client(timeout=20) as client:
        with client.stream("POST", f"{daphne_server.base_url}/v1/completion-messages", json=body,
                           headers=headers(key)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            events = list(_events(response))
        blocking = client.post(f"{daphne_server.base_url}/v1/completion-messages",
                               json={**body, "response_mode": "blocking"}, headers=headers(key))
    assert [e["event"] for e in events] == ["message"] * 3 + ["message_end"]
    assert all("conversation_id" not in e for e in events)
    assert_schema(events[-1], "StreamEventMessageEnd")
    assert "".join(e["answer"] for e in events[:-1]) == "drain then restart"
    assert fake_upstream.chat_requests[0].messages[0] == {"role": "system", "content": "Runbook for db1."}
    data = assert_schema(blocking.json(), "CompletionResponse")
    assert (blocking.status_code, data["mode"], data["answer"]) == (200, "completion", "in one piece")
    assert "conversation_id" not in data
