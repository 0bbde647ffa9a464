"""The request log: method, path, status, duration of every request (and of every streamed answer, when it ends, with
its time to first token, config, app and task id); JSON when asked; never bodies, queries, headers or message text."""
import json
import logging
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient
from rest_framework.authtoken.models import Token

from agentcore.models import AgentApp, Session
from agentcore.routing import websocket_application
from agentcore.tests.factories import sse_events
from difyapi.tests.factories import make_app_with_key
from opsagent.asgi import application  # imported here: Django's setup in it resets logging, and caplog with it
from opsagent.common.logging import JSONFormatter
from tests.e2e.dify_servers import AsgiCall, dify_headers, dify_post, parse_sse
from tests.fakes.upstream import Reply

pytestmark = pytest.mark.django_db

SECRET = "tok-request-log-secret-123456"


def _request_records(caplog):
    return [r for r in caplog.records if r.name == "opsagent.requests"]


def test_each_request_is_logged_with_method_path_status_duration(client, caplog):
    caplog.set_level(logging.DEBUG, logger="opsagent.requests")
    client.get("/health/")
    (record,) = _request_records(caplog)
    assert record.levelno == logging.INFO
    assert (record.method, record.path, record.status) == ("GET", "/health/", 200)
    assert record.duration_ms >= 0
    assert record.getMessage().startswith("GET /health/ 200 ")


def test_json_format_has_the_request_fields(client, caplog):
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    client.get("/api/llm-configs/")
    (record,) = _request_records(caplog)
    line = json.loads(JSONFormatter().format(record))
    assert line["logger"] == "opsagent.requests" and line["level"] == "INFO"
    assert (line["method"], line["path"], line["status"]) == ("GET", "/api/llm-configs/", 401)
    assert isinstance(line["duration_ms"], float)
    assert line["time"].endswith("+00:00")


def test_bodies_query_strings_and_authorization_never_logged(client, caplog):
    caplog.set_level(logging.DEBUG, logger="opsagent.requests")
    client.post(
        f"/api/llm-configs/?api_key={SECRET}",
        data=json.dumps({"api_key": SECRET}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Token {SECRET}",
    )
    (record,) = _request_records(caplog)
    assert record.path == "/api/llm-configs/"
    formatted = JSONFormatter().format(record) + logging.Formatter("%(message)s").format(record)
    assert SECRET not in formatted
    assert SECRET not in caplog.text


def test_slow_requests_are_warnings(client, caplog, settings):
    settings.REQUEST_SLOW_SECONDS = 0.0
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    client.get("/health/")
    (record,) = _request_records(caplog)
    assert record.levelno == logging.WARNING


async def test_async_requests_are_logged_too(async_client, caplog):
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    response = await async_client.get("/api/llm-configs/providers/")
    assert response.status_code == 401
    (record,) = _request_records(caplog)
    assert (record.method, record.path, record.status) == ("GET", "/api/llm-configs/providers/", 401)


# ----- streamed answers: one line per request (per turn on the WebSocket), written when the answer ended -----

QUESTION = "what-is-the-secret-question-text"
ANSWER = "The secret answer text is here."


def _assert_turn_line(record, *, method: str, path: str, status: int, config: str, app: str) -> dict:
    assert (record.method, record.path, record.status) == (method, path, status)
    assert (record.config, record.app, record.outcome) == (config, app, "normal")
    uuid.UUID(record.task_id)
    assert 0 < record.ttft_ms <= record.duration_ms
    line = json.loads(JSONFormatter().format(record))
    assert {"method", "path", "status", "duration_ms", "ttft_ms", "config", "app", "task_id", "surface"} <= set(line)
    text = json.dumps(line) + record.getMessage()
    for secret in (QUESTION, ANSWER, "secretvalue"):
        assert secret not in text
    return line


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_dify_stream_is_logged_when_it_ends_with_ttft_config_app_and_task(default_llm_config, fake_upstream,
                                                                                caplog):
    _, key = await sync_to_async(make_app_with_key)(name="log-dify-app", mode="chat")
    fake_upstream.script(Reply(text=ANSWER, first_delay=0.05))
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    payload = {"inputs": {}, "query": QUESTION, "user": "alice", "response_mode": "streaming"}
    async with AsgiCall(application, path="/v1/chat-messages", headers=dify_headers(key),
                        body=json.dumps(payload).encode()) as call:
        raw = await call.read(30)
        (record,) = _request_records(caplog)  # written with the stream's last byte, before the client let go
    task_id = parse_sse(raw)[0]["task_id"]
    line = _assert_turn_line(record, method="POST", path="/v1/chat-messages", status=200, config="default-chat",
                             app="log-dify-app")
    assert (line["surface"], line["task_id"]) == ("dify", task_id)
    assert record.ttft_ms >= 50
    assert key not in caplog.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_dify_errors_and_blocking_answers_are_logged_too(default_llm_config, fake_upstream, caplog):
    _, key = await sync_to_async(make_app_with_key)(name="log-dify-blocking", mode="chat")
    fake_upstream.script(Reply(text=ANSWER))
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    payload = {"inputs": {}, "query": QUESTION, "user": "alice", "response_mode": "blocking"}
    assert (await dify_post(key, "/v1/chat-messages", payload))[0] == 200
    assert (await dify_post("app-not-a-key", "/v1/chat-messages", payload))[0] == 401
    blocking, refused = _request_records(caplog)
    assert (blocking.status, blocking.outcome, blocking.config) == (200, "normal", "default-chat")
    assert (refused.method, refused.path, refused.status) == ("POST", "/v1/chat-messages", 401)
    assert not hasattr(refused, "task_id")


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_slow_dify_stream_is_a_warning(default_llm_config, fake_upstream, caplog, settings):
    settings.REQUEST_SLOW_SECONDS = 0.0
    _, key = await sync_to_async(make_app_with_key)(name="log-dify-slow", mode="chat")
    fake_upstream.script(Reply(text=ANSWER))
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    payload = {"inputs": {}, "query": QUESTION, "user": "alice", "response_mode": "streaming"}
    assert (await dify_post(key, "/v1/chat-messages", payload))[0] == 200
    (record,) = _request_records(caplog)
    assert record.levelno == logging.WARNING


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_rest_stream_is_logged_when_it_ends(plain_user, default_llm_config, fake_upstream, caplog):
    app = await AgentApp.objects.acreate(name="log-rest-app", mode="chat")
    token = await Token.objects.acreate(user=plain_user)
    fake_upstream.script(Reply(text=ANSWER, first_delay=0.05))
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    response = await AsyncClient().post("/api/agent/chat/", {"message": QUESTION, "response_mode": "streaming",
                                                              "app_id": str(app.pk)},
                                        content_type="application/json",
                                        headers={"Authorization": f"Token {token.key}"})
    assert response.status_code == 200
    assert _request_records(caplog) == []  # the answer has not streamed yet
    body = b"".join([chunk async for chunk in response.streaming_content])
    (record,) = _request_records(caplog)
    line = _assert_turn_line(record, method="POST", path="/api/agent/chat/", status=200, config="default-chat",
                             app="log-rest-app")
    assert (line["surface"], line["task_id"]) == ("rest", sse_events(body)[0]["task_id"])
    assert record.ttft_ms >= 50


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_each_websocket_turn_is_logged(plain_user, default_llm_config, fake_upstream, caplog):
    app = await AgentApp.objects.acreate(name="log-ws-app", mode="chat")
    session = await Session.objects.acreate(app=app, owner=plain_user)
    token = await Token.objects.acreate(user=plain_user)
    fake_upstream.script(Reply(text=ANSWER, first_delay=0.05), Reply(text=ANSWER))
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    path = f"/ws/agent/sessions/{session.pk}/"
    communicator = WebsocketCommunicator(websocket_application, f"{path}?token={token.key}")
    assert (await communicator.connect(timeout=10))[0]
    task_ids = []
    for _ in range(2):
        await communicator.send_json_to({"type": "chat", "message": QUESTION})
        while (message := await communicator.receive_json_from(timeout=10))["type"] != "end":
            if message["type"] == "run_started":
                task_ids.append(message["task_id"])
    await communicator.disconnect()
    records = _request_records(caplog)
    assert [r.task_id for r in records] == task_ids
    line = _assert_turn_line(records[0], method="WEBSOCKET", path=path, status=101, config="default-chat",
                             app="log-ws-app")
    assert line["surface"] == "websocket"
    assert token.key not in caplog.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_a_websocket_turn_refused_before_it_starts_is_logged_with_why(plain_user, default_llm_config,
                                                                            fake_upstream, caplog):
    app = await AgentApp.objects.acreate(name="log-ws-limited", mode="chat", requests_per_minute=1)
    session = await Session.objects.acreate(app=app, owner=plain_user)
    token = await Token.objects.acreate(user=plain_user)
    fake_upstream.default = Reply(text=ANSWER)
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    communicator = WebsocketCommunicator(websocket_application, f"/ws/agent/sessions/{session.pk}/?token={token.key}")
    assert (await communicator.connect(timeout=10))[0]
    await communicator.send_json_to({"type": "chat", "message": QUESTION})
    while (await communicator.receive_json_from(timeout=10))["type"] != "end":
        pass
    await communicator.send_json_to({"type": "chat", "message": QUESTION})
    assert (await communicator.receive_json_from(timeout=10))["code"] == "rate_limited"
    await communicator.disconnect()
    answered, refused = _request_records(caplog)
    assert answered.outcome == "normal"
    assert (refused.method, refused.status, refused.outcome) == ("WEBSOCKET", 101, "rate_limited")
    assert not hasattr(refused, "task_id")


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_a_dify_path_holding_a_secret_is_logged_masked(caplog):
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    form_token = "form-token-secret-7a6b5c4d3e2f"
    async with AsgiCall(application, method="GET", path=f"/v1/form/human_input/{form_token}",
                        headers=dify_headers("app-not-a-key")) as call:
        await call.read(20)
    assert call.status == 401
    (record,) = _request_records(caplog)
    assert (record.method, record.path, record.status) == ("GET", "/v1/form/human_input/<form_token>", 401)
    assert form_token not in caplog.text
