"""The official `openai` SDK against a real daphne: chat completions blocking and streamed, a tools round trip,
models.list(), the SDK's error types, failover in a pool, the agent as a model, and a client that leaves mid-stream
(the provider sees its connection closed)."""
from __future__ import annotations

import time

import openai
import pytest

from agentcore.models import AgentApp
from difyapi.auth import api_key_create
from tests.fakes.upstream import Reply, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

TOOLS = [{"type": "function", "function": {"name": "disk_usage", "description": "Disk usage of a path",
                                           "parameters": {"type": "object",
                                                          "properties": {"path": {"type": "string"}}}}}]


def _key(**app_fields) -> str:
    app = AgentApp.objects.create(**{"mode": "chat", **app_fields})
    return api_key_create(app=app)[1]


def _client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=30)


def test_sdk_pool_model(start_daphne, make_llm_config, fake_upstream):
    make_llm_config(name="primary", model_name="m-primary", route="ops-pool", priority=2)
    make_llm_config(name="backup", model_name="m-backup", route="ops-pool", priority=1)
    key = _key(name="sdk-app")
    limited = _key(name="sdk-limited", requests_per_minute=1)
    server = start_daphne()
    client = _client(server, key)

    fake_upstream.script(Reply(text="All disks fine.", prompt_tokens=7, completion_tokens=3))
    answer = client.chat.completions.create(model="ops-pool", messages=[{"role": "user", "content": "disks?"}])
    assert answer.choices[0].message.content == "All disks fine." and answer.model == "ops-pool"
    assert answer.usage.total_tokens == 10

    fake_upstream.script(Reply(text="streamed words here"))
    chunks = list(client.chat.completions.create(model="ops-pool", messages=[{"role": "user", "content": "x"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({(c.id, c.created) for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.total_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "streamed words here"

    # Tools round trip: the model asks for a tool, the client runs it and sends the result back.
    fake_upstream.reset()
    fake_upstream.script(Reply(tool_calls=[ToolCall("disk_usage", {"path": "/"}, id="call_7")]),
                         Reply(text="/ is 40% full."))
    messages = [{"role": "user", "content": "how full is /?"}]
    first = client.chat.completions.create(model="ops-pool", messages=messages, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    assert (first.choices[0].finish_reason, call.id, call.function.name) == ("tool_calls", "call_7", "disk_usage")
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "40%"}]
    second = client.chat.completions.create(model="ops-pool", messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == "/ is 40% full."
    sent = fake_upstream.chat_requests[-1].body
    assert sent["tools"] == TOOLS and sent["messages"][-1] == {"role": "tool", "tool_call_id": "call_7",
                                                               "content": "40%"}
    assert sent["messages"][1]["tool_calls"][0]["id"] == "call_7"

    # Failover: the primary fails before its first token, the backup answers.
    fake_upstream.reset()
    fake_upstream.script(Reply(status=503, error_message="primary down"), Reply(text="backup here"))
    answer = client.chat.completions.create(model="ops-pool", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "backup here"
    assert [r.body["model"] for r in fake_upstream.chat_requests] == ["m-primary", "m-backup"]

    listed = client.models.list()
    assert {m.id for m in listed.data} == {str(c.pk) for c in _configs()}
    assert all(m.object == "model" and m.owned_by == "openai" and m.created > 0 for m in listed.data)

    with pytest.raises(openai.AuthenticationError):
        _client(server, "app-not-a-real-key-0000000000").chat.completions.create(
            model="ops-pool", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="ops-pool", messages=[{"role": "user", "content": "x"}], n=2)
    assert bad.value.param == "n"
    limited_client = _client(server, limited)
    limited_client.chat.completions.create(model="ops-pool", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as limited_error:
        limited_client.chat.completions.create(model="ops-pool", messages=[{"role": "user", "content": "x"}])
    assert int(limited_error.value.response.headers["retry-after"]) > 0


def _configs():
    from llmconfigs.models import LLMConfig

    return LLMConfig.objects.filter(is_active=True, is_embedding=False)


def test_sdk_agent_model(start_daphne, default_llm_config, fake_upstream):
    key = _key(name="sdk-agent", mode="agent-chat", enabled_tools=["current_time"])
    server = start_daphne()
    client = _client(server, key)
    fake_upstream.script(Reply(tool_calls=[ToolCall("current_time", {})]), Reply(text="It is noon."))
    chunks = list(client.chat.completions.create(model="opsagent", stream=True, messages=[
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "what time is it?"}]))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "It is noon."
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert "Calling current_time" in reasoning
    assert chunks[-1].choices[0].finish_reason == "stop"
    fake_upstream.script(Reply(text="Blocking agent."))
    answer = client.chat.completions.create(model="app:sdk-agent", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Blocking agent."


def test_sdk_client_leaving_mid_stream_cancels_the_provider_call(start_daphne, make_llm_config, fake_upstream):
    make_llm_config(name="slow", model_name="m-slow", route="slow")
    key = _key(name="sdk-leaver")
    server = start_daphne()
    fake_upstream.script(Reply(text=" ".join(["tick"] * 100), delay=0.2))
    stream = _client(server, key).chat.completions.create(model="slow", stream=True,
                                                          messages=[{"role": "user", "content": "count"}])
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while not fake_upstream.cancelled_streams and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fake_upstream.cancelled_streams == 1 and fake_upstream.active_streams == 0
