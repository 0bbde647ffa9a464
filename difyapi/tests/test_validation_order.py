"""Dify's order of checks for chat-messages and completion-messages (SPEC.md §2, Dify's ChatApi / CompletionApi and
its app generators): a request wrong in two ways gets the error Dify gives it. The order: `user`, the app's mode,
the body's schema (in the payload model's field order), the limits (rate limits and budgets, then the concurrency
limit), blocking mode (agent-chat), an empty query, the conversation, the files, the inputs (a new conversation's)."""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from agentcore.models import Message
from difyapi.tests.factories import make_app_with_key, make_message, make_session
from tests.e2e.dify_servers import dify_post
from tests.fakes.upstream import Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_worker_connections")]

FORM = [{"text-input": {"label": "Host", "variable": "host", "required": True}}]
BAD_FILE = [{"type": "document", "transfer_method": "remote_url", "url": "ftp://files.internal/notes.txt"}]
TOO_MANY = (429, "too_many_requests")
BLOCKING = (400, "invalid_param", "Agent Chat App does not support blocking mode")
NOT_FOUND = (404, "not_found", "Conversation Not Exists.")
QUERY_REQUIRED = (400, "invalid_param", "query is required")
INPUT_REQUIRED = (400, "invalid_param", "host is required in input form")


def body(**fields):
    payload = {"inputs": {"host": "db1"}, "query": "disk?", "user": "alice", "auto_generate_name": False, **fields}
    return {k: v for k, v in payload.items() if v is not ...}


async def error(key: str, payload, path: str = "/v1/chat-messages") -> tuple:
    status, _, raw = await dify_post(key, path, payload)
    data = json.loads(raw)
    assert set(data) == {"code", "message", "status"}, data
    return (status, data["code"]) if status == 429 else (status, data["code"], data["message"])


def _app(mode: str, *, full: bool = False, **fields):
    """An app with a required input and uploads on; `full`: at its concurrency limit (one live running answer)."""
    app, key = make_app_with_key(mode=mode, user_input_form=FORM, file_upload={"enabled": True},
                                 max_active_requests=1 if full else 0, **fields)
    if full:
        make_message(make_session(app, user="someone"), status=Message.Status.RUNNING, heartbeat_at=timezone.now())
    return app, key


async def make(mode: str = "chat", **kwargs):
    return await sync_to_async(_app)(mode, **kwargs)


async def test_the_schema_comes_before_the_concurrency_limit(default_llm_config):
    _, key = await make("agent-chat", full=True)
    assert await error(key, body(inputs=..., response_mode="streaming")) == (400, "invalid_param",
                                                                               "inputs is required")
    assert await error(key, body(query=5, response_mode="streaming")) == (400, "invalid_param",
                                                                          "query must be a string")
    assert (await error(key, body(conversation_id="nope", response_mode="streaming")))[:2] == (400, "invalid_param")
    assert (await error(key, body(files="x", response_mode="streaming")))[:2] == (400, "invalid_param")


async def test_schema_errors_name_the_first_wrong_field_of_difys_payload_model(default_llm_config):
    _, key = await make()
    assert await error(key, body(inputs=..., query=...)) == (400, "invalid_param", "inputs is required")
    assert await error(key, body(query=7, files="x")) == (400, "invalid_param", "query must be a string")
    assert await error(key, body(files=["x"], response_mode="fast")) == (400, "invalid_param",
                                                                         "files[0] must be an object")


async def test_the_concurrency_limit_comes_before_blocking_mode_the_conversation_files_and_inputs(
        default_llm_config, fake_upstream):
    _, agent_key = await make("agent-chat", full=True)
    assert await error(agent_key, body()) == TOO_MANY  # blocking, on an agent-chat app
    _, key = await make(full=True)
    assert await error(key, body(conversation_id=str(uuid.uuid4()))) == TOO_MANY
    assert await error(key, body(inputs={})) == TOO_MANY
    assert await error(key, body(files=BAD_FILE)) == TOO_MANY
    assert await error(key, body(query="")) == TOO_MANY
    _, completion_key = await make("completion", full=True)
    assert await error(completion_key, body(inputs={}, files=BAD_FILE), "/v1/completion-messages") == TOO_MANY
    assert fake_upstream.chat_requests == []


async def test_rate_limits_come_before_blocking_mode_too(default_llm_config, fake_upstream):
    _, key = await make("agent-chat", requests_per_minute=1)
    fake_upstream.script(Reply(text="ok"))
    status, _, _ = await dify_post(key, "/v1/chat-messages", body(response_mode="streaming"))
    assert status == 200
    assert await error(key, body(conversation_id=str(uuid.uuid4()))) == TOO_MANY
    assert await error(key, body(inputs=...)) == (400, "invalid_param", "inputs is required")  # schema first


async def test_a_request_is_counted_once_against_the_rate_limit(default_llm_config, fake_upstream):
    """Counted where the limits are checked, not again when the turn's rows are written."""
    import time

    _, key = await make(requests_per_minute=1)
    # A rate is counted per UTC minute: both requests must fall in the same one (a run that began in a minute's last
    # seconds once saw the second request in a fresh minute, and let through).
    if time.time() % 60 > 50:
        await asyncio.sleep(60.5 - time.time() % 60)
    fake_upstream.script(Reply(text="one"))
    status, _, raw = await dify_post(key, "/v1/chat-messages", body())
    assert status == 200, raw
    assert await error(key, body()) == TOO_MANY


async def test_blocking_mode_comes_before_the_query_and_the_conversation(default_llm_config):
    _, key = await make("agent-chat")
    assert await error(key, body(query="")) == BLOCKING
    assert await error(key, body(conversation_id=str(uuid.uuid4()), inputs={}, files=BAD_FILE)) == BLOCKING


async def test_an_empty_query_comes_before_the_conversation(default_llm_config):
    _, key = await make()
    assert await error(key, body(query="", conversation_id=str(uuid.uuid4()))) == QUERY_REQUIRED


async def test_the_conversation_comes_before_files_and_inputs(default_llm_config):
    app, key = await make()
    assert await error(key, body(conversation_id=str(uuid.uuid4()), files=BAD_FILE)) == NOT_FOUND
    others = await sync_to_async(make_session)(app, user="bob")
    assert await error(key, body(conversation_id=str(others.id), inputs={}, files=BAD_FILE)) == NOT_FOUND


async def test_files_come_before_the_inputs(default_llm_config):
    _, key = await make()
    status, code, message = await error(key, body(inputs={}, files=BAD_FILE))
    assert (status, code) == (400, "invalid_param") and "files[0].url" in message
    _, completion_key = await make("completion")
    status, code, message = await error(completion_key, body(inputs={}, files=BAD_FILE), "/v1/completion-messages")
    assert (status, code) == (400, "invalid_param") and "files[0].url" in message
    assert await error(completion_key, body(inputs={}), "/v1/completion-messages") == INPUT_REQUIRED


async def test_the_app_mode_comes_before_the_schema_and_user_before_the_mode(default_llm_config):
    _, completion_key = await make("completion")
    assert (await error(completion_key, body(inputs="x")))[:2] == (400, "not_chat_app")
    assert await error(completion_key, body(user=..., inputs="x")) == (400, "invalid_param",
                                                                      "Arg user must be provided.")
    _, chat_key = await make(full=True)
    assert (await error(chat_key, body(inputs="x"), "/v1/completion-messages"))[:2] == (400, "app_unavailable")


async def test_the_model_comes_after_the_files_and_before_the_inputs(db):
    """Dify turns the app's model config into a model (provider_not_initialize without credentials) after the files
    and before the inputs; OpsAgent's model choice (no usable config, an unknown `model`) has the same place."""
    _, key = await make()  # no LLM config at all
    assert (await error(key, body(inputs={})))[:2] == (400, "provider_not_initialize")
    status, code, message = await error(key, body(inputs={}, files=BAD_FILE))
    assert (status, code) == (400, "invalid_param") and "files[0].url" in message


async def test_an_unknown_model_choice_comes_before_the_inputs(default_llm_config):
    _, key = await make()
    status, code, message = await error(key, body(inputs={}, model="no-such-model"))
    assert (status, code) == (400, "invalid_param") and "model" in message and "input form" not in message
