"""POST /v1/chat-messages/{task_id}/stop and client disconnects: the stream ends with message_end at once and the
partial answer is saved."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from channels.routing import get_default_application

from agentcore.models import Message
from llmconfigs.models import ProviderCall
from tests.e2e.dify_servers import AsgiCall, data_events, dify_headers, dify_post
from tests.fakes.upstream import Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_worker_connections")]


SLOW = Reply(text=" ".join(f"word{i}" for i in range(40)), delay=0.2)


def body(**fields):
    return {"inputs": {}, "query": "talk slowly", "user": "alice", "response_mode": "streaming",
            "auto_generate_name": False, **fields}


async def first_event(call: AsgiCall) -> dict:
    assert await call.start() == 200
    return data_events(await call.chunk(10))[0]


async def test_stop_ends_the_stream_with_message_end_and_saves_the_partial_answer(chat_app, fake_upstream):
    application = get_default_application()

    _, key = chat_app
    fake_upstream.script(SLOW)
    async with AsgiCall(application, path="/v1/chat-messages", headers=dify_headers(key),
                        body=json.dumps(body()).encode()) as call:
        first = await first_event(call)
        status, _, raw = await dify_post(key, f"/v1/chat-messages/{first['task_id']}/stop", {"user": "alice"})
        assert (status, json.loads(raw)) == (200, {"result": "success"})
        stopped_at = time.monotonic()
        rest = await call.read(5)
        elapsed = time.monotonic() - stopped_at
    assert elapsed < 1.0
    events = data_events(rest)
    assert events[-1]["event"] == "message_end"
    assert events[-1]["metadata"]["usage"]["completion_tokens"] >= 0
    message = await Message.objects.aget(pk=first["message_id"])
    assert message.status == "stopped"
    streamed = first["answer"] + "".join(e["answer"] for e in events if e["event"] == "message")
    assert message.answer == streamed and 0 < len(message.answer) < len(SLOW.text)


async def test_a_stop_before_the_first_token_records_the_cut_off_call(chat_app, fake_upstream):
    application = get_default_application()

    _, key = chat_app
    fake_upstream.script(Reply(text="late", first_delay=5))
    async with AsgiCall(application, path="/v1/chat-messages", headers=dify_headers(key),
                        body=json.dumps(body()).encode()) as call:
        for _ in range(100):  # the provider is called: its stream is open, nothing came yet
            if fake_upstream.active_streams:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        message = await Message.objects.aget()
        status, _, raw = await dify_post(key, f"/v1/chat-messages/{message.task_id}/stop", {"user": "alice"})
        assert (status, json.loads(raw)) == (200, {"result": "success"})
        rest = await call.read(5)
    assert data_events(rest)[-1]["event"] == "message_end"
    assert (await Message.objects.aget()).status == "stopped"
    # The call was made and cut off: one usage row, as the OpenAI surface writes for a client that left.
    [row] = [row async for row in ProviderCall.objects.all()]
    assert (row.kind, row.status, row.error_category, row.ttft_ms) == ("chat", "error", "cancelled", None)
    assert row.latency_ms >= 150


async def test_stop_by_another_user_or_app_does_nothing_but_still_succeeds(chat_app, fake_upstream):
    application = get_default_application()

    _, key = chat_app
    fake_upstream.script(Reply(text="a b c d e f", delay=0.1))
    async with AsgiCall(application, path="/v1/chat-messages", headers=dify_headers(key),
                        body=json.dumps(body()).encode()) as call:
        first = await first_event(call)
        status, _, raw = await dify_post(key, f"/v1/chat-messages/{first['task_id']}/stop", {"user": "mallory"})
        assert (status, json.loads(raw)) == (200, {"result": "success"})
        rest = await call.read(10)
    assert data_events(rest)[-1]["event"] == "message_end"
    message = await Message.objects.aget(pk=first["message_id"])
    assert message.status == "normal" and message.answer == "a b c d e f"


@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), "not-a-task"])
async def test_stop_of_an_unknown_task_succeeds(chat_app, task_id):
    _, key = chat_app
    status, _, raw = await dify_post(key, f"/v1/chat-messages/{task_id}/stop", {"user": "alice"})
    assert (status, json.loads(raw)) == (200, {"result": "success"})


async def test_stop_needs_a_user_and_a_key(chat_app):
    _, key = chat_app
    status, _, raw = await dify_post(key, f"/v1/chat-messages/{uuid.uuid4()}/stop", {})
    assert (status, json.loads(raw)) == (400, {"code": "invalid_param", "message": "Arg user must be provided.",
                                               "status": 400})
    status, _, raw = await dify_post("app-unknown-key-unknown-key", f"/v1/chat-messages/{uuid.uuid4()}/stop",
                                     {"user": "alice"})
    assert status == 401 and json.loads(raw)["code"] == "unauthorized"


async def test_client_disconnect_stops_the_run_and_saves_the_partial_answer(chat_app, fake_upstream):
    application = get_default_application()

    _, key = chat_app
    fake_upstream.script(SLOW)
    call = AsgiCall(application, path="/v1/chat-messages", headers=dify_headers(key), body=json.dumps(body()).encode())
    async with call:
        first = await first_event(call)
        await call.disconnect(5)
    message = await Message.objects.aget(pk=first["message_id"])
    assert message.status == "stopped"
    assert message.answer.startswith(first["answer"]) and len(message.answer) < len(SLOW.text)
    # The upstream call was cancelled, not left running.
    for _ in range(20):
        if fake_upstream.cancelled_streams:
            break
        await asyncio.sleep(0.1)
    assert fake_upstream.cancelled_streams >= 1
    assert fake_upstream.active_streams == 0


async def test_blocking_request_disconnect_stops_the_run(chat_app, fake_upstream):
    application = get_default_application()

    _, key = chat_app
    fake_upstream.script(SLOW)
    payload = json.dumps(body(response_mode="blocking")).encode()
    async with AsgiCall(application, path="/v1/chat-messages", headers=dify_headers(key), body=payload) as call:
        await asyncio.sleep(0.8)
        await call.disconnect(5)
    message = await Message.objects.aget()
    assert message.status == "stopped"
    assert 0 < len(message.answer) < len(SLOW.text)
