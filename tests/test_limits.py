"""The ASGI guards of opsagent.common.limits (what keeps the limits under any ASGI server) and the Dify consumers' key
check before a body in several parts is buffered."""
from __future__ import annotations

import json

import pytest
from asgiref.testing import ApplicationCommunicator

from opsagent.asgi import application
from opsagent.common.limits import CLOSE_MESSAGE_TOO_BIG, HttpBodyLimit, WebSocketMessageLimit, body_limit


def _http_scope(path: str, *headers: tuple[bytes, bytes]) -> dict:
    return {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": list(headers), "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}


class BodyReader:
    """An app that reads the whole body, then answers 200 with its length; records what it received."""

    def __init__(self):
        self.messages: list[dict] = []

    async def __call__(self, scope, receive, send):
        size = 0
        while True:
            message = await receive()
            self.messages.append(message)
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})


async def test_declared_length_over_the_limit_is_refused_before_the_app_runs(settings):
    settings.REQUEST_BODY_MAX_BYTES = 100
    inner = BodyReader()
    communicator = ApplicationCommunicator(HttpBodyLimit(inner), _http_scope("/api/x/", (b"content-length", b"101")))
    start = await communicator.receive_output(1)
    body = await communicator.receive_output(1)
    assert start["status"] == 413
    assert json.loads(body["body"])["code"] == "request_too_large"
    assert inner.messages == []


async def test_a_body_growing_past_the_limit_is_refused_and_the_app_sees_a_disconnect(settings):
    settings.REQUEST_BODY_MAX_BYTES = 100
    inner = BodyReader()
    communicator = ApplicationCommunicator(HttpBodyLimit(inner), _http_scope("/v1/chat-messages"))
    await communicator.send_input({"type": "http.request", "body": b"x" * 60, "more_body": True})
    await communicator.send_input({"type": "http.request", "body": b"x" * 60, "more_body": True})
    start = await communicator.receive_output(1)
    body = await communicator.receive_output(1)
    await communicator.wait(1)
    assert start["status"] == 413
    assert json.loads(body["body"]) == {"code": "request_entity_too_large", "status": 413,
                                        "message": "The request body is too large: at most 100 bytes."}
    assert inner.messages[-1] == {"type": "http.disconnect"}


async def test_a_body_within_the_limit_reaches_the_app(settings):
    settings.REQUEST_BODY_MAX_BYTES = 100
    communicator = ApplicationCommunicator(HttpBodyLimit(BodyReader()), _http_scope("/api/x/"))
    await communicator.send_input({"type": "http.request", "body": b"x" * 50, "more_body": True})
    await communicator.send_input({"type": "http.request", "body": b"x" * 50})
    assert (await communicator.receive_output(1))["status"] == 200
    assert (await communicator.receive_output(1))["body"] == b"100"


def test_uploads_may_be_as_large_as_the_largest_file_plus_the_form(settings):
    settings.REQUEST_BODY_MAX_BYTES = 1000
    settings.UPLOAD_FILE_SIZE_LIMIT_MB = 3
    settings.UPLOAD_IMAGE_FILE_SIZE_LIMIT_MB = 2
    assert body_limit("/v1/files/upload") == 3 * 1024 * 1024 + 1000
    assert body_limit("/v1/chat-messages") == body_limit("/api/agent/chat/") == body_limit("/admin/login/") == 1000


async def test_a_websocket_message_over_the_limit_closes_with_1009(settings):
    settings.WEBSOCKET_MESSAGE_MAX_BYTES = 10
    received = []

    async def echo(scope, receive, send):
        while True:
            message = await receive()
            received.append(message)
            if message["type"] == "websocket.disconnect":
                return
            if message["type"] == "websocket.receive":
                await send({"type": "websocket.send", "text": message["text"]})

    communicator = ApplicationCommunicator(WebSocketMessageLimit(echo), {"type": "websocket", "path": "/ws/"})
    await communicator.send_input({"type": "websocket.receive", "text": "é" * 5})  # 10 bytes: within
    assert (await communicator.receive_output(1))["text"] == "é" * 5
    await communicator.send_input({"type": "websocket.receive", "text": "é" * 6})
    assert await communicator.receive_output(1) == {"type": "websocket.close", "code": CLOSE_MESSAGE_TOO_BIG}
    await communicator.wait(1)
    assert received[-1] == {"type": "websocket.disconnect", "code": CLOSE_MESSAGE_TOO_BIG}


@pytest.mark.django_db(transaction=True)
async def test_chat_consumer_refuses_a_bad_key_before_the_rest_of_the_body_arrives():
    scope = _http_scope("/v1/chat-messages", (b"authorization", b"Bearer app-wrong-key-xxxxxxxxxxxxxxxx"),
                        (b"content-type", b"application/json"))
    communicator = ApplicationCommunicator(application, scope)
    # The first part of a body that goes on: the answer may not wait for the rest.
    await communicator.send_input({"type": "http.request", "body": b'{"query": "', "more_body": True})
    start = await communicator.receive_output(5)
    body = await communicator.receive_output(1)
    assert start["status"] == 401
    assert json.loads(body["body"])["message"] == "Access token is invalid"
    await communicator.wait(1)
