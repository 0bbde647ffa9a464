"""POST /v1/chat-messages in blocking mode and request validation: shapes, Dify's errors, model choice, scoping."""
from __future__ import annotations

import json
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.routing import get_default_application
from django.db import DatabaseError

from agentcore.models import Message, Session
from difyapi.tests.factories import make_app_with_key
from tests.e2e.dify_servers import dify_post
from tests.fakes.upstream import Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_worker_connections")]


BLOCKING_KEYS = {"event", "task_id", "id", "message_id", "conversation_id", "mode", "answer", "metadata", "created_at"}
USAGE_KEYS = {
    "prompt_tokens", "prompt_unit_price", "prompt_price_unit", "prompt_price", "completion_tokens",
    "completion_unit_price", "completion_price_unit", "completion_price", "total_tokens", "total_price", "currency",
    "latency", "time_to_first_token", "time_to_generate",
}
ERROR_KEYS = {"code", "message", "status"}


async def post(key: str, payload, path: str = "/v1/chat-messages"):
    status, headers, raw = await dify_post(key, path, payload)
    return status, json.loads(raw)


def sent_parameters(sent: dict) -> tuple:
    """(temperature, max_tokens, top_p) as the upstream got them (OpenAI's name for max_tokens differs)."""
    return sent.get("temperature"), sent.get("max_completion_tokens", sent.get("max_tokens")), sent.get("top_p")


def body(**fields):
    return {"inputs": {}, "query": "hello there", "user": "alice", "auto_generate_name": False, **fields}


async def test_blocking_answer_has_difys_shape_and_is_saved(chat_app, fake_upstream):
    app, key = chat_app
    fake_upstream.script(Reply(text="Hi Alice, how can I help?", prompt_tokens=12, completion_tokens=7))
    status, data = await post(key, body(response_mode="blocking"))
    assert status == 200, data
    assert set(data) == BLOCKING_KEYS
    assert data["event"] == "message" and data["mode"] == "chat"
    assert data["id"] == data["message_id"]
    assert data["answer"] == "Hi Alice, how can I help?"
    assert isinstance(data["created_at"], int)
    assert set(data["metadata"]) == {"usage", "retriever_resources", "annotation_reply"}
    assert data["metadata"]["retriever_resources"] == [] and data["metadata"]["annotation_reply"] is None
    usage = data["metadata"]["usage"]
    assert set(usage) == USAGE_KEYS
    assert usage["prompt_tokens"] == 12 and usage["completion_tokens"] == 7 and usage["total_tokens"] == 19
    for key_name in ("prompt_unit_price", "prompt_price", "completion_price", "total_price", "prompt_price_unit"):
        assert isinstance(usage[key_name], str), key_name
    assert isinstance(usage["latency"], float)
    message = await Message.objects.select_related("session").aget(pk=data["message_id"])
    assert message.status == "normal" and message.answer == "Hi Alice, how can I help?"
    assert str(message.task_id) == data["task_id"]
    assert str(message.session_id) == data["conversation_id"]
    assert message.session.end_user == "alice" and message.session.source == "api"
    assert fake_upstream.chat_requests[-1].messages[-1]["content"] == "hello there"


async def test_missing_or_null_response_mode_means_blocking(chat_app, fake_upstream):
    _, key = chat_app
    for payload in (body(), body(response_mode=None)):
        status, data = await post(key, payload)
        assert status == 200 and data["event"] == "message"


async def test_agent_chat_refuses_blocking_mode(default_llm_config, fake_upstream):
    _, key = await sync_to_async(make_app_with_key)(name="agent", mode="agent-chat")
    status, data = await post(key, body())
    assert (status, data) == (400, {"code": "invalid_param", "message": "Agent Chat App does not support blocking mode",
                                    "status": 400})
    assert fake_upstream.chat_requests == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"user": None}, "Arg user must be provided."),
        ({"user": ""}, "Arg user must be provided."),
        ({"query": None}, "query is required"),
        ({"query": ""}, "query is required"),
        ({"query": "\x00"}, "query is required"),
        ({"query": 42}, "query must be a string"),
        ({"inputs": None}, "inputs is required"),
        ({"inputs": []}, "inputs must be an object"),
        ({"response_mode": "fast"}, "response_mode"),
        ({"conversation_id": "not-a-uuid"}, "conversation_id must be a valid UUID"),
        ({"files": "x"}, "files must be a list"),
        ({"files": [{"type": "image", "transfer_method": "carrier_pigeon"}]}, "files[0].transfer_method"),
        ({"files": [{"type": "image", "transfer_method": "remote_url", "url": "ftp://x"}]}, "files[0].url"),
        ({"files": [{"type": "image", "transfer_method": "local_file", "upload_file_id": "nope"}]},
         "files[0].upload_file_id"),
        ({"files": [{"type": "image", "transfer_method": "local_file", "upload_file_id": str(uuid.uuid4())}]},
         "Invalid upload file id."),
        ({"model_config_id": "zzz"}, "model_config_id"),
        ({"model_config_id": str(uuid.uuid4())}, "model_config_id"),
        ({"model": "no-such-model"}, "model"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 7}, "temperature"),
        ({"top_p": 3}, "top_p"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        # Integers too large for a float (JSON allows them): refused, not a 500.
        ({"temperature": 10**400}, "temperature"),
        ({"max_tokens": 10**400}, "max_tokens"),
        ({"inputs": {"temperature": "hot"}}, "temperature"),
        ({"auto_generate_name": "maybe"}, "auto_generate_name"),
        ({"approval": "yes"}, "approval"),
        ({"approval": {"id": str(uuid.uuid4()), "decision": "perhaps"}}, "approval.decision"),
    ],
)
async def test_invalid_fields_get_invalid_param_naming_them(chat_app, fake_upstream, fields, message):
    _, key = chat_app
    status, data = await post(key, body(**fields))
    assert status == 400, data
    assert set(data) == ERROR_KEYS
    assert data["code"] == "invalid_param" and data["status"] == 400
    assert message in data["message"]
    assert fake_upstream.chat_requests == []
    assert await Message.objects.acount() == 0


async def test_a_numeric_user_is_cast_to_a_string_and_unknown_keys_are_ignored(chat_app, fake_upstream):
    _, key = chat_app
    status, data = await post(key, body(user=12345, pinned=True, retriever_from="dev", files=None))
    assert status == 200, data
    assert (await Session.objects.aget(pk=data["conversation_id"])).end_user == "12345"


async def test_nul_characters_are_stripped_from_the_query(chat_app, fake_upstream):
    _, key = chat_app
    status, _ = await post(key, body(query="ping\x00 me"))
    assert status == 200
    assert fake_upstream.chat_requests[-1].messages[-1]["content"] == "ping me"


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "code"),
    [
        (b"", "application/json", 400, "bad_request"),
        (b"{not json", "application/json", 400, "bad_request"),
        (b"[1, 2]", "application/json", 400, "bad_request"),
        (b'{"user": "a"}', "text/plain", 415, "unsupported_media_type"),
    ],
)
async def test_bodies_that_are_not_json_objects(chat_app, raw, content_type, status, code):
    application = get_default_application()
    from tests.e2e.dify_servers import AsgiCall

    _, key = chat_app
    headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
    async with AsgiCall(application, path="/v1/chat-messages", headers=headers, body=raw) as call:
        data = json.loads(await call.read())
    assert (call.status, data["code"], data["status"]) == (status, code, status)


async def test_authentication_errors(chat_app):
    status, data = await post("app-this-key-does-not-exist-at-all", body())
    assert (status, data) == (401, {"code": "unauthorized", "message": "Access token is invalid", "status": 401})
    application = get_default_application()
    from tests.e2e.dify_servers import AsgiCall

    async with AsgiCall(application, path="/v1/chat-messages", headers={"Content-Type": "application/json"},
                        body=json.dumps(body()).encode()) as call:
        data = json.loads(await call.read())
    assert call.status == 401 and data["code"] == "unauthorized"
    assert call.headers["www-authenticate"] == 'Bearer realm="api"'


async def test_other_methods_are_not_allowed(chat_app):
    application = get_default_application()
    from tests.e2e.dify_servers import AsgiCall

    _, key = chat_app
    async with AsgiCall(application, method="GET", path="/v1/chat-messages",
                        headers={"Authorization": f"Bearer {key}"}) as call:
        data = json.loads(await call.read())
    assert call.status == 405 and data["code"] == "method_not_allowed"


async def test_conversations_are_scoped_to_app_and_user(chat_app, fake_upstream):
    app, key = chat_app
    _, other_key = await sync_to_async(make_app_with_key)(name="other-app")
    status, first = await post(key, body())
    assert status == 200
    conversation_id = first["conversation_id"]

    status, again = await post(key, body(conversation_id=conversation_id, query="and again"))
    assert status == 200 and again["conversation_id"] == conversation_id

    not_exists = {"code": "not_found", "message": "Conversation Not Exists.", "status": 404}
    assert await post(key, body(conversation_id=conversation_id, user="bob")) == (404, not_exists)
    assert await post(other_key, body(conversation_id=conversation_id)) == (404, not_exists)
    assert await post(key, body(conversation_id=str(uuid.uuid4()))) == (404, not_exists)
    await Session.objects.filter(pk=conversation_id).aupdate(is_deleted=True)
    assert await post(key, body(conversation_id=conversation_id)) == (404, not_exists)
    assert await Message.objects.acount() == 2


async def test_blank_conversation_id_starts_a_new_conversation(chat_app, fake_upstream):
    _, key = chat_app
    status_a, a = await post(key, body(conversation_id=""))
    status_b, b = await post(key, body(conversation_id=None))
    assert status_a == status_b == 200
    assert a["conversation_id"] != b["conversation_id"]


async def test_model_choice_extensions_reach_the_upstream(chat_app, make_llm_config, fake_upstream):
    _, key = chat_app
    other = await sync_to_async(make_llm_config)(name="precise", model_name="fake-precise")
    status, data = await post(key, body(model="precise", temperature=0.25, max_tokens=64, top_p=0.5))
    assert status == 200, data
    sent = fake_upstream.chat_requests[-1].body
    assert sent["model"] == "fake-precise"
    assert sent_parameters(sent) == (0.25, 64, 0.5)
    message = await Message.objects.aget(pk=data["message_id"])
    assert message.llm_config_id == other.pk

    status, data = await post(key, body(model_config_id=str(other.pk)))
    assert status == 200
    assert fake_upstream.chat_requests[-1].body["model"] == "fake-precise"


async def test_model_choice_inside_inputs_and_top_level_wins(chat_app, make_llm_config, fake_upstream):
    _, key = chat_app
    await sync_to_async(make_llm_config)(name="inputs-choice", model_name="fake-inputs")
    inputs = {"model": "inputs-choice", "temperature": "0.3", "max_tokens": "32", "top_p": 0.9}
    status, data = await post(key, body(inputs=inputs))
    assert status == 200, data
    sent = fake_upstream.chat_requests[-1].body
    assert sent["model"] == "fake-inputs"
    assert sent_parameters(sent) == (0.3, 32, 0.9)

    status, data = await post(key, body(inputs=inputs, temperature=0.7, max_tokens=16))
    assert status == 200, data
    sent = fake_upstream.chat_requests[-1].body
    assert sent_parameters(sent) == (0.7, 16, 0.9)
    assert "model" not in (await Message.objects.aget(pk=data["message_id"])).inputs


async def test_an_inactive_config_is_refused_naming_it(chat_app, make_llm_config, fake_upstream):
    _, key = chat_app
    inactive = await sync_to_async(make_llm_config)(name="retired", model_name="fake-retired", is_active=False)
    status, data = await post(key, body(model_config_id=str(inactive.pk)))
    assert status == 400 and data["code"] == "invalid_param"
    assert data["message"] == "LLM config 'retired' (model_config_id) is inactive."
    assert fake_upstream.chat_requests == []


async def test_a_model_name_longer_than_any_config_can_have_is_refused_without_a_lookup(chat_app, fake_upstream):
    # Every input has a bound: a 100 kB `model` is neither looked up (nor cached) nor echoed back.
    _, key = chat_app
    status, data = await post(key, body(model="m" * 100_000))
    assert status == 400 and data["code"] == "invalid_param"
    assert data["message"] == "model must be at most 200 characters"
    assert fake_upstream.chat_requests == []


async def test_no_configured_model_is_provider_not_initialize(db, fake_upstream):
    _, key = await sync_to_async(make_app_with_key)(name="unconfigured")
    status, data = await post(key, body())
    assert status == 400 and data["code"] == "provider_not_initialize" and set(data) == ERROR_KEYS


async def test_inputs_are_validated_against_the_user_input_form(default_llm_config, fake_upstream):
    form = [
        {"text-input": {"label": "City", "variable": "city", "required": True, "max_length": 5}},
        {"select": {"label": "Tone", "variable": "tone", "required": False, "options": ["calm", "brief"],
                    "default": "calm"}},
        {"number": {"label": "Days", "variable": "days", "required": False}},
    ]
    _, key = await sync_to_async(make_app_with_key)(name="form-app", user_input_form=form)
    cases = [
        ({}, "city is required in input form"),
        ({"city": 3}, "(type 'text-input') city in input form must be a string"),
        ({"city": "Amsterdam"}, "city in input form must be less than 5 characters"),
        ({"city": "Oslo", "tone": "loud"}, "tone in input form must be one of the following: ['calm', 'brief']"),
        ({"city": "Oslo", "days": "many"}, "days in input form must be a valid number"),
    ]
    for inputs, message in cases:
        status, data = await post(key, body(inputs=inputs))
        assert (status, data["code"], data["message"]) == (400, "invalid_param", message)
    status, data = await post(key, body(inputs={"city": "Oslo", "extra": "dropped"}))
    assert status == 200, data
    session = await Session.objects.aget(pk=data["conversation_id"])
    assert session.inputs == {"city": "Oslo", "tone": "calm", "days": ""}
    # Continuing the conversation ignores the inputs sent (Dify uses the stored ones).
    status, data = await post(key, body(inputs={}, conversation_id=data["conversation_id"]))
    assert status == 200, data


@pytest.mark.parametrize(
    ("reply", "code", "status"),
    [
        (Reply(status=401, error_message="Incorrect API key provided: {api_key}"), "completion_request_error", 400),
        (Reply(status=429, error_message="Rate limit reached"), "completion_request_error", 400),
        (Reply(status=500, error_message="upstream exploded"), "completion_request_error", 400),
    ],
)
async def test_blocking_upstream_failures_are_difys_errors(chat_app, default_llm_config, fake_upstream, reply, code,
                                                          status):
    _, key = chat_app
    fake_upstream.script(reply)
    got_status, data = await post(key, body())
    assert (got_status, data["code"], data["status"]) == (status, code, status)
    assert set(data) == ERROR_KEYS
    assert default_llm_config.api_key not in data["message"]
    message = await Message.objects.aget()
    assert message.status == "error"


async def test_concurrency_limit_answers_too_many_requests(default_llm_config, fake_upstream):
    application = get_default_application()
    from tests.e2e.dify_servers import AsgiCall, dify_headers

    app, key = await sync_to_async(make_app_with_key)(name="Limited", max_active_requests=1)
    fake_upstream.script(Reply(text="slow answer " * 5, delay=0.2))
    payload = json.dumps(body(response_mode="streaming")).encode()
    async with AsgiCall(application, path="/v1/chat-messages", headers=dify_headers(key), body=payload) as running:
        assert await running.start() == 200
        await running.chunk()
        status, data = await post(key, body())
        assert status == 429
        assert data == {
            "code": "too_many_requests",
            "message": "Too many requests. Please try again later. The current maximum concurrent requests allowed "
                       "for Limited is 1.",
            "status": 429,
        }
        # Dify checks the limit before it looks the conversation up.
        status, data = await post(key, body(conversation_id=str(uuid.uuid4())))
        assert (status, data["code"]) == (429, "too_many_requests")
        await running.read()
    status, _ = await post(key, body())
    assert status == 200


async def test_a_turn_whose_files_cannot_be_recorded_leaves_no_rows(chat_app, fake_upstream, monkeypatch):
    from difyapi.models import MessageFile

    app, key = chat_app

    def failing_bulk_create(*args, **kwargs):
        raise DatabaseError("disk full")

    monkeypatch.setattr(MessageFile.objects, "bulk_create", failing_bulk_create)
    files = [{"type": "document", "transfer_method": "remote_url", "url": "https://files.example/notes.txt"}]
    status, data = await post(key, body(response_mode="blocking", files=files))
    assert status == 500 and data["code"] == "internal_server_error"
    assert not await Message.objects.aexists()
    assert not await Session.objects.aexists()
    assert fake_upstream.chat_requests == []
