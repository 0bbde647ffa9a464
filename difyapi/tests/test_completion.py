"""Completion apps (a text generator: the app's prompt with its inputs, plus the query; no conversation, no tools):
POST /v1/completion-messages blocking and streaming and its stop, bodies exactly as Dify's completion converter and
OpenAPI document have them, the routes' mode errors, and what /v1/info and /v1/parameters report."""
from __future__ import annotations

import json
import time

import pytest
from asgiref.sync import sync_to_async
from channels.routing import get_default_application

from agentcore.models import AgentApp, Message, Session
from difyapi.tests.factories import DifyClient, make_app_with_key, make_session
from difyapi.tests.openapi import assert_schema
from tests.e2e.dify_servers import AsgiCall, data_events, dify_headers, dify_post
from tests.fakes.upstream import Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_worker_connections")]

PATH = "/v1/completion-messages"
# Dify's CompletionAppGenerateResponseConverter: the blocking body and each stream event, key for key.
BLOCKING_KEYS = {"event", "task_id", "id", "message_id", "mode", "answer", "metadata", "created_at"}
HEAD = ["event", "message_id", "created_at"]
MESSAGE_KEYS = {*HEAD, "task_id", "id", "answer", "from_variable_selector"}
END_KEYS = {*HEAD, "task_id", "id", "metadata", "files"}
ERROR_KEYS = {*HEAD, "status", "code", "message"}
FORM = [{"text-input": {"label": "Host", "variable": "host", "required": True, "max_length": 50}},
        {"select": {"label": "Tone", "variable": "tone", "required": False, "default": "terse",
                    "options": ["terse", "chatty"]}}]
PROMPT = "You write runbooks for {{host}}, in a {{tone}} tone."


@pytest.fixture
def completion_app(default_llm_config):
    return make_app_with_key(name="runbooks", mode="completion", system_prompt=PROMPT, user_input_form=FORM,
                             enabled_tools=["current_time"], file_upload={"enabled": True})


def body(**fields):
    return {"inputs": {"host": "db1"}, "query": "Restart postgres safely.", "user": "alice", **fields}


async def post(key: str, payload, path: str = PATH) -> tuple[int, dict]:
    status, _, raw = await dify_post(key, path, payload)
    return status, json.loads(raw)


async def stream(key: str, payload: dict) -> tuple[AsgiCall, bytes]:
    async with AsgiCall(get_default_application(), path=PATH, headers=dify_headers(key),
                        body=json.dumps(payload).encode()) as call:
        raw = await call.read(30)
    return call, raw


async def test_blocking_answer_is_difys_completion_body(completion_app, fake_upstream):
    app, key = completion_app
    fake_upstream.script(Reply(text="1. Drain connections.", prompt_tokens=20, completion_tokens=6))
    status, data = await post(key, body(response_mode="blocking"))
    assert status == 200, data
    assert_schema(data, "CompletionResponse")
    assert set(data) == BLOCKING_KEYS  # no conversation_id: a completion has none
    assert (data["event"], data["mode"], data["answer"]) == ("message", "completion", "1. Drain connections.")
    assert data["id"] == data["message_id"] and isinstance(data["created_at"], int)
    usage = data["metadata"]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (20, 6, 26)
    message = await Message.objects.select_related("session").aget(pk=data["message_id"])
    assert (message.status, message.answer, str(message.task_id)) == ("normal", "1. Drain connections.",
                                                                     data["task_id"])
    assert (message.prompt_tokens, message.completion_tokens) == (20, 6)
    assert message.inputs == {"host": "db1", "tone": "terse"}  # the form's default filled in, as Dify does
    assert message.session.end_user == "alice" and message.session.source == "api"


async def test_a_completion_message_takes_feedback(completion_app, fake_upstream):
    _, key = completion_app
    fake_upstream.script(Reply(text="ok"))
    _, data = await post(key, body())
    client = DifyClient(key)
    response = await sync_to_async(client.post)(f"/v1/messages/{data['message_id']}/feedbacks",
                                                {"rating": "like", "user": "alice"})
    assert (response.status_code, response.json()) == (200, {"result": "success"})
    other = await sync_to_async(client.post)(f"/v1/messages/{data['message_id']}/feedbacks",
                                             {"rating": "like", "user": "bob"})
    assert (other.status_code, other.json()["code"]) == (404, "not_found")


async def test_the_model_gets_the_prompt_with_the_inputs_and_the_query_and_no_tools(completion_app, fake_upstream):
    _, key = completion_app
    fake_upstream.script(Reply(text="ok"))
    status, _ = await post(key, body(inputs={"host": "db7", "tone": "chatty"}))
    assert status == 200
    sent = fake_upstream.chat_requests[-1]
    assert sent.messages == [
        {"role": "system", "content": "You write runbooks for db7, in a chatty tone."},
        {"role": "user", "content": "Restart postgres safely."},
    ]
    assert "tools" not in sent.body


async def test_without_a_query_the_filled_prompt_is_what_the_model_answers(completion_app, fake_upstream):
    app, key = completion_app
    fake_upstream.script(Reply(text="ok"))
    payload = body()
    del payload["query"]  # optional in Dify's completion body
    status, data = await post(key, payload)
    assert status == 200, data
    assert fake_upstream.chat_requests[-1].messages == [
        {"role": "user", "content": "You write runbooks for db1, in a terse tone."}]
    app.system_prompt = ""
    await app.asave()
    status, data = await post(key, body(query=""))
    assert (status, data["code"]) == (400, "invalid_param")
    status, data = await post(key, body(query=None))
    assert (status, data) == (400, {"code": "invalid_param", "message": "query must be a string", "status": 400})


async def test_each_completion_is_on_its_own_no_conversation_no_history(completion_app, fake_upstream):
    app, key = completion_app
    fake_upstream.script(Reply(text="first"), Reply(text="second"))
    first = (await post(key, body(conversation_id="not even checked")))[1]
    second = (await post(key, body(query="And mysql?")))[1]
    assert first["answer"] == "first" and second["answer"] == "second"
    assert [m["content"] for m in fake_upstream.chat_requests[-1].messages][1:] == ["And mysql?"]
    sessions = {m.session_id async for m in Message.objects.filter(pk__in=[first["id"], second["id"]])}
    assert len(sessions) == 2


async def test_streaming_events_are_difys_completion_events(completion_app, fake_upstream):
    _, key = completion_app
    fake_upstream.script(Reply(text="Drain, then restart.", prompt_tokens=9, completion_tokens=4))
    call, raw = await stream(key, body(response_mode="streaming"))
    assert call.status == 200 and call.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = data_events(raw)
    assert [e["event"] for e in events] == ["message"] * (len(events) - 1) + ["message_end"]
    first = events[0]
    for event in events[:-1]:
        assert_schema(event, "StreamEventMessage")
        assert set(event) == MESSAGE_KEYS and list(event)[:3] == HEAD
        assert event["id"] == event["message_id"] == first["message_id"] and event["task_id"] == first["task_id"]
        assert event["created_at"] == first["created_at"]
    assert "".join(e["answer"] for e in events[:-1]) == "Drain, then restart."
    end = assert_schema(events[-1], "StreamEventMessageEnd")
    assert set(end) == END_KEYS and end["files"] is None
    assert (end["metadata"]["usage"]["prompt_tokens"], end["metadata"]["usage"]["completion_tokens"]) == (9, 4)
    message = await Message.objects.aget(pk=end["message_id"])
    assert message.status == "normal" and message.answer == "Drain, then restart."


async def test_a_failure_after_the_stream_started_is_one_error_event(completion_app, default_llm_config,
                                                                     fake_upstream):
    """The provider's error, scrubbed of the key even when the provider echoes it; blocking: Dify's JSON error."""
    _, key = completion_app
    fake_upstream.script(Reply(status=500, error_message="upstream exploded for {api_key}"),
                         Reply(status=500, error_message="upstream exploded for {api_key}"))
    _, raw = await stream(key, body(response_mode="streaming"))
    [error] = data_events(raw)
    assert_schema(error, "CompletionStreamEventError")
    assert set(error) == ERROR_KEYS and (error["status"], error["code"]) == (400, "completion_request_error")
    status, data = await post(key, body(response_mode="blocking"))
    assert (status, data["code"]) == (400, "completion_request_error")
    assert "upstream exploded" in error["message"] and "upstream exploded" in data["message"]
    assert default_llm_config.api_key not in raw.decode() and default_llm_config.api_key not in json.dumps(data)


async def test_stop_ends_the_stream_and_keeps_the_partial_answer(completion_app, fake_upstream):
    _, key = completion_app
    fake_upstream.script(Reply(text=" ".join(f"step{i}" for i in range(40)), delay=0.2))
    async with AsgiCall(get_default_application(), path=PATH, headers=dify_headers(key),
                        body=json.dumps(body(response_mode="streaming")).encode()) as call:
        assert await call.start() == 200
        first = data_events(await call.chunk(10))[0]
        status, data = await post(key, {"user": "alice"}, f"{PATH}/{first['task_id']}/stop")
        assert (status, data) == (200, {"result": "success"})
        stopped_at = time.monotonic()
        rest = data_events(await call.read(5))
    assert time.monotonic() - stopped_at < 1.0
    assert rest[-1]["event"] == "message_end"
    message = await Message.objects.aget(pk=first["message_id"])
    assert message.status == "stopped" and 0 < len(message.answer) < 200


async def test_inputs_limits_and_files_follow_the_chat_rules(completion_app, fake_upstream):
    app, key = completion_app
    status, data = await post(key, body(inputs={}))
    assert (status, data) == (400, {"code": "invalid_param", "message": "host is required in input form",
                                    "status": 400})
    status, data = await post(key, body(files=[{"type": "image", "transfer_method": "remote_url", "url": "ftp://x"}]))
    assert (status, data["code"]) == (400, "invalid_param") and "files[0].url" in data["message"]
    app.max_active_requests = 1
    await app.asave()
    fake_upstream.script(Reply(text="slow " * 5, delay=0.2), Reply(text="after"))
    async with AsgiCall(get_default_application(), path=PATH, headers=dify_headers(key),
                        body=json.dumps(body(response_mode="streaming")).encode()) as running:
        assert await running.start() == 200
        await running.chunk()
        status, data = await post(key, body())
        assert (status, data["code"]) == (429, "too_many_requests")
        await running.read()
    assert (await post(key, body()))[0] == 200


async def test_model_choice_picks_the_config_that_answers(completion_app, make_llm_config, fake_upstream):
    _, key = completion_app
    await sync_to_async(make_llm_config)(name="writer", model_name="fake-writer")
    fake_upstream.script(Reply(text="ok"))
    status, data = await post(key, body(model="writer", temperature=0.3))
    assert status == 200, data
    sent = fake_upstream.chat_requests[-1].body
    assert (sent["model"], sent["temperature"]) == ("fake-writer", 0.3)
    status, data = await post(key, body(model="no-such-model"))
    assert (status, data["code"]) == (400, "invalid_param")


async def test_routes_answer_difys_mode_errors(completion_app, chat_app, fake_upstream):
    _, completion_key = completion_app
    chat, chat_key = chat_app
    app_unavailable = {"code": "app_unavailable", "message": "App unavailable, please check your app configurations.",
                       "status": 400}
    not_chat_app = {"code": "not_chat_app", "message": "Please check if your app mode matches the right API route.",
                    "status": 400}
    assert await post(chat_key, body()) == (400, app_unavailable)
    assert await post(chat_key, {"user": "alice"}, f"{PATH}/x/stop") == (400, app_unavailable)
    assert await post(completion_key, body(), "/v1/chat-messages") == (400, not_chat_app)
    assert await post(completion_key, {"user": "alice"}, "/v1/chat-messages/x/stop") == (400, not_chat_app)
    # `user` is checked first, as Dify's token decorator reads it before the controller looks at the mode.
    user_required = {"code": "invalid_param", "message": "Arg user must be provided.", "status": 400}
    assert await post(chat_key, {"inputs": {}}) == (400, user_required)
    assert await post(completion_key, {"inputs": {}}, "/v1/chat-messages") == (400, user_required)
    assert fake_upstream.chat_requests == []


def test_conversation_routes_are_not_for_completion_apps(default_llm_config):
    app, key = make_app_with_key(mode="completion")
    session = make_session(app)
    client = DifyClient(key)
    for response in (
        client.get("/v1/conversations", {"user": "alice"}),
        client.get(f"/v1/conversations/{session.id}", {"user": "alice"}),
        client.delete(f"/v1/conversations/{session.id}", {"user": "alice"}),
        client.post(f"/v1/conversations/{session.id}/name", {"name": "x", "user": "alice"}),
        client.get(f"/v1/conversations/{session.id}/variables", {"user": "alice"}),
        client.put(f"/v1/conversations/{session.id}/variables/{session.id}", {"value": 1, "user": "alice"}),
        client.get("/v1/messages", {"user": "alice", "conversation_id": str(session.id)}),
    ):
        assert response.status_code == 400 and response.json()["code"] == "not_chat_app", response.content
    assert not Session.objects.get(pk=session.pk).is_deleted


def test_info_and_parameters_report_the_mode(default_llm_config):
    _, key = make_app_with_key(mode="completion", user_input_form=FORM)
    client = DifyClient(key)
    info = assert_schema(client.get("/v1/info").json(), "AppInfoResponse")
    assert info["mode"] == "completion"
    parameters = assert_schema(client.get("/v1/parameters").json(), "AppParametersResponse")
    assert parameters["user_input_form"] == FORM


def test_the_mode_is_stored_and_the_database_refuses_others(default_llm_config):
    from tests.fixtures import refused_by_database

    app, _ = make_app_with_key(mode="completion")
    assert AgentApp.objects.get(pk=app.pk).mode == "completion"
    assert refused_by_database(lambda: AgentApp.objects.filter(pk=app.pk).update(mode="workflow"))


async def test_completion_apps_have_no_sessions_on_the_rest_surface(completion_app, staff_client):
    app, _ = completion_app
    response = await sync_to_async(staff_client.post)("/api/sessions/", {"app_id": str(app.pk)}, format="json")
    assert response.status_code == 400, response.content
