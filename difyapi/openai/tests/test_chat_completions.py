"""POST /v1/chat/completions in this process (the ASGI application, the fake upstream over real HTTP): a pool's
request passed through as sent, exact chunks, OpenAI's error envelope and statuses, failover, accounting, a client
that leaves, and the app's agent as the model."""
from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from asgiref.sync import sync_to_async
from channels.routing import get_default_application

from agentcore.models import Message, Session
from difyapi.tests.factories import make_app_with_key
from llmconfigs.models import LLMConfig
from tests.e2e.dify_servers import AsgiCall, dify_headers
from tests.fakes.upstream import Reply, ToolCall

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_worker_connections")]

PATH = "/v1/chat/completions"
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture
def pool(make_llm_config):
    """A pool of one ("gpt-pool") and an app key that may use any model."""
    config = make_llm_config(name="pool-member", model_name="upstream-model", route="gpt-pool",
                             input_price_per_million=1, output_price_per_million=2)
    _, key = make_app_with_key(name="openai-app", mode="chat")
    return config, key


async def post(key: str | None, payload, *, headers: dict | None = None, method: str = "POST"):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    async with AsgiCall(get_default_application(), method=method, path=PATH, headers=sent, body=body) as call:
        raw = await call.read(30)
    return call, raw


def lines(raw: bytes) -> list:
    """The stream's `data:` lines, strictly framed, JSON decoded ("[DONE]" as the string)."""
    text = raw.decode()
    assert text.endswith("\n\n")
    out = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def ask(model: str = "gpt-pool", **fields):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


async def test_blocking_passes_the_request_through_and_stores_no_conversation(pool, fake_upstream):
    config, key = pool
    fake_upstream.script(Reply(text="Disk is fine.", prompt_tokens=11, completion_tokens=4))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "disk?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "df", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "/ 40% used"},
    ]
    tools = [{"type": "function", "function": {"name": "df", "parameters": {"type": "object", "properties": {}}}}]
    call, raw = await post(key, {"model": "gpt-pool", "messages": messages, "tools": tools, "tool_choice": "auto",
                                 "response_format": {"type": "text"}, "stop": ["\n\n"], "seed": 7, "user": "bob",
                                 "temperature": 0.3, "max_completion_tokens": 50})
    assert call.status == 200, raw
    answer = json.loads(raw)
    assert answer["object"] == "chat.completion" and answer["model"] == "gpt-pool"
    assert answer["id"].startswith("chatcmpl-")
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Disk is fine."}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    sent = fake_upstream.chat_requests[-1].body
    assert sent["messages"] == messages and sent["tools"] == tools and sent["tool_choice"] == "auto"
    assert (sent["model"], sent["response_format"], sent["stop"], sent["seed"], sent["user"]) == (
        "upstream-model", {"type": "text"}, ["\n\n"], 7, "bob")
    assert (sent["temperature"], sent["max_completion_tokens"]) == (0.3, 50)  # OpenAI's name for an openai config
    assert "stream" not in sent
    assert not await Session.objects.aexists() and not await Message.objects.aexists()
    row = await LLMConfig.objects.aget(pk=config.pk)
    assert (row.usage_count, row.prompt_tokens_total, row.completion_tokens_total) == (1, 11, 4)
    assert row.cost_total > 0


async def test_stream_chunks_are_exact(pool, fake_upstream):
    _, key = pool
    fake_upstream.script(Reply(text="one two three", prompt_tokens=3, completion_tokens=3))
    call, raw = await post(key, ask(stream=True, stream_options={"include_usage": True}))
    assert call.status == 200
    assert call.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = lines(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {(c["id"], c["created"], c["object"], c["model"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], "chat.completion.chunk", "gpt-pool")}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *choice_chunks, usage = chunks
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                                         "total_tokens": 6}
    assert all("usage" not in c for c in choice_chunks)
    assert [c["choices"][0]["finish_reason"] for c in choice_chunks] == [None] * (len(choice_chunks) - 1) + ["stop"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in choice_chunks) == "one two three"


async def test_the_role_goes_out_in_one_write_with_the_first_token(pool, fake_upstream):
    _, key = pool
    fake_upstream.script(Reply(text="one two three"))
    body = json.dumps(ask(stream=True)).encode()
    async with AsgiCall(get_default_application(), path=PATH, headers=dify_headers(key), body=body) as call:
        assert await call.start() == 200
        first = lines(await call.chunk())
    assert [c["choices"][0]["delta"] for c in first] == [{"role": "assistant", "content": ""}, {"content": "one "}]


async def test_an_answer_without_a_token_sends_every_chunk(pool, fake_upstream):
    _, key = pool
    fake_upstream.script(Reply(chunks=[], prompt_tokens=2, completion_tokens=0))
    _, raw = await post(key, ask(stream=True, stream_options={"include_usage": True}))
    events = lines(raw)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    assert events[-2]["usage"]["prompt_tokens"] == 2


async def test_first_chunk_has_the_role_when_the_provider_sent_none(pool, fake_upstream):
    _, key = pool
    fake_upstream.script(Reply(text="no role here", role_chunk=False))
    _, raw = await post(key, ask(stream=True))
    chunks = lines(raw)[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "no "}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])


async def test_stream_without_include_usage_has_no_usage_chunk_but_is_accounted(pool, fake_upstream):
    config, key = pool
    fake_upstream.script(Reply(text="ok", prompt_tokens=5, completion_tokens=1))
    call, raw = await post(key, ask(stream=True))
    events = lines(raw)
    assert events[-1] == "[DONE]" and all(c["choices"] for c in events[:-1])
    assert fake_upstream.chat_requests[-1].body["stream_options"] == {"include_usage": True}
    row = await LLMConfig.objects.aget(pk=config.pk)
    assert (row.usage_count, row.prompt_tokens_total, row.completion_tokens_total) == (1, 5, 1)


async def test_tool_call_chunks_reach_the_client(pool, fake_upstream):
    _, key = pool
    fake_upstream.script(Reply(tool_calls=[ToolCall("df", {"path": "/"}, id="call_9")]))
    _, raw = await post(key, ask(stream=True, tools=[{"type": "function", "function": {"name": "df"}}]))
    chunks = lines(raw)[:-1]
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    assert calls == [[{"index": 0, "id": "call_9", "type": "function",
                       "function": {"name": "df", "arguments": '{"path": "/"}'}}]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_failure_mid_stream_ends_with_an_error_chunk_without_the_key(pool, fake_upstream):
    config, key = pool
    fake_upstream.script(Reply(text="a b c", stream_error="overloaded, key {api_key}"))
    call, raw = await post(key, ask(stream=True))
    assert call.status == 200
    events = lines(raw)
    assert "[DONE]" not in events
    error = events[-1]["error"]
    assert set(error) == ERROR_KEYS and error["type"] == "upstream_error"
    assert "overloaded" in error["message"] and config.api_key not in raw.decode()
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1]) == "a b c"


@pytest.fixture
def duo(make_llm_config):
    make_llm_config(name="first", model_name="m-first", route="duo", priority=2)
    make_llm_config(name="second", model_name="m-second", route="duo", priority=1)
    return make_app_with_key(name="duo-app", mode="chat")[1]


async def test_failover_before_the_first_token(duo, fake_upstream):
    key = duo
    for stream in (False, True):
        fake_upstream.reset()
        fake_upstream.script(Reply(status=500, error_message="down"), Reply(text="from the second"))
        call, raw = await post(key, ask("duo", stream=stream))
        assert call.status == 200, raw
        assert b"from" in raw and b"second" in raw
        assert [r.body["model"] for r in fake_upstream.chat_requests] == ["m-first", "m-second"]


@pytest.mark.parametrize(("payload", "status", "param", "code"), [
    (ask(n=2), 400, "n", None),
    (ask(logit_bias=None, frobnicate=True), 400, "frobnicate", None),
    (ask(temperature="hot"), 400, "temperature", None),
    (ask(temperature=2.5), 400, "temperature", "invalid_parameter"),
    (ask(max_tokens=5, max_completion_tokens=5), 400, "max_tokens", None),
    (ask(stream_options={"include_usage": True}), 400, "stream_options", None),
    ({"model": "gpt-pool", "messages": []}, 400, "messages", None),
    ({"model": "gpt-pool", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model", None),
    (ask("no-such-model"), 404, "model", "model_not_found"),
    (ask("m" * 300), 400, "model", None),
])
async def test_bad_requests_are_refused_in_openai_envelope(pool, fake_upstream, payload, status, param, code):
    _, key = pool
    call, raw = await post(key, payload)
    assert call.status == status, raw
    error = json.loads(raw)["error"]
    assert set(error) == ERROR_KEYS and error["param"] == param and error["message"]
    if code:
        assert error["code"] == code
    assert not fake_upstream.chat_requests


@pytest.fixture
def kimi(make_llm_config):
    make_llm_config(name="kimi", provider="moonshot", model_name="moonshot-v1-8k", route="kimi")
    return make_app_with_key(name="kimi-app", mode="chat")[1]


async def test_provider_range_is_the_members(kimi, fake_upstream):
    key = kimi
    call, raw = await post(key, ask("kimi", temperature=1.5))
    assert call.status == 400
    assert json.loads(raw)["error"]["param"] == "temperature" and "Moonshot" in json.loads(raw)["error"]["message"]


@pytest.fixture
def mixed(make_llm_config):
    make_llm_config(name="mixed-openai", model_name="m-openai", route="mixed", priority=2)
    make_llm_config(name="mixed-kimi", provider="moonshot", model_name="moonshot-v1-8k", route="mixed", priority=1)
    return make_app_with_key(name="mixed-app", mode="chat")[1]


async def test_a_last_member_refusing_the_parameters_leaves_the_last_calls_error(mixed, fake_upstream):
    fake_upstream.script(Reply(status=500, error_message="openai member down"))
    call, raw = await post(mixed, ask("mixed", temperature=1.5))  # Moonshot takes 0-1: refused without a call
    assert call.status == 502 and "openai member down" in json.loads(raw)["error"]["message"]
    assert [r.body["model"] for r in fake_upstream.chat_requests] == ["m-openai"]


async def test_authentication_and_allow_list(pool, fake_upstream):
    _, key = pool
    for header in (None, "Bearer app-wrong-key-000000000000000"):
        call, raw = await post(None, ask(), headers={"Authorization": header} if header else None)
        assert call.status == 401 and set(json.loads(raw)["error"]) == ERROR_KEYS
        assert json.loads(raw)["error"]["code"] == "invalid_api_key"
    _, narrow = await sync_to_async(make_app_with_key)(name="narrow", mode="chat", allowed_routes=["other"])
    call, raw = await post(narrow, ask())
    assert call.status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"
    call, raw = await post(key, ask(), method="GET")
    assert call.status == 405 and set(json.loads(raw)["error"]) == ERROR_KEYS


async def test_rate_limit_is_429_with_retry_after(pool, fake_upstream):
    _, key = pool
    from agentcore.models import AgentApp

    await AgentApp.objects.filter(name="openai-app").aupdate(requests_per_minute=1)
    assert (await post(key, ask()))[0].status == 200
    call, raw = await post(key, ask())
    assert call.status == 429 and int(call.headers["retry-after"]) > 0
    assert json.loads(raw)["error"]["type"] == "rate_limit_error"


async def test_provider_failures_map_to_openai_statuses(pool, fake_upstream):
    config, key = pool
    cases = ((Reply(status=400, error_message="bad tool schema"), 400),
             (Reply(status=500, error_message="boom {api_key}"), 502),
             (Reply(status=429, error_message="slow down"), 429))
    for (reply, status), stream in itertools.product(cases, (True, False)):
        fake_upstream.script(reply)
        call, raw = await post(key, ask(stream=stream))
        assert call.status == status, raw
        assert set(json.loads(raw)["error"]) == ERROR_KEYS and config.api_key not in raw.decode()
        if status == 429:
            assert call.headers["retry-after"]


async def test_body_over_the_limit_is_413_in_openai_envelope(pool, settings):
    _, key = pool
    settings.REQUEST_BODY_MAX_BYTES = 1000
    call, raw = await post(key, ask(messages=[{"role": "user", "content": "x" * 2000}]))
    assert call.status == 413 and set(json.loads(raw)["error"]) == ERROR_KEYS


async def test_client_disconnect_cancels_the_provider_call(pool, fake_upstream):
    _, key = pool
    fake_upstream.script(Reply(text=" ".join(["word"] * 50), delay=0.2))
    body = json.dumps(ask(stream=True)).encode()
    async with AsgiCall(get_default_application(), path=PATH, headers=dify_headers(key), body=body) as call:
        assert await call.start() == 200
        await call.chunk()
        await call.disconnect()
    for _ in range(50):
        if fake_upstream.cancelled_streams:
            break
        await asyncio.sleep(0.1)
    assert fake_upstream.cancelled_streams == 1 and fake_upstream.active_streams == 0


@pytest.fixture
def agent(default_llm_config):
    return make_app_with_key(name="ops-agent", mode="agent-chat", enabled_tools=["current_time"])


async def test_agent_model_streams_tool_steps_as_reasoning(agent, fake_upstream):
    _, key = agent
    fake_upstream.script(Reply(tool_calls=[ToolCall("current_time", {})]), Reply(text="It is late."))
    messages = [{"role": "user", "content": "earlier question"}, {"role": "assistant", "content": "earlier answer"},
                {"role": "user", "content": "what time is it?"}]
    call, raw = await post(key, {"model": "opsagent", "messages": messages, "stream": True,
                                 "stream_options": {"include_usage": True}})
    assert call.status == 200, raw
    events = lines(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({(c["id"], c["created"]) for c in chunks}) == 1 and chunks[0]["choices"][0]["delta"]["role"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert "Calling current_time" in reasoning and "current_time returned" in reasoning
    assert "".join(d.get("content") or "" for d in deltas) == "It is late."
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["total_tokens"] > 0
    seen = [m["content"] for m in fake_upstream.chat_requests[0].messages if m["role"] in ("user", "assistant")]
    assert seen == ["earlier question", "earlier answer", "what time is it?"]


async def test_agent_model_blocking_and_other_apps_are_not_reachable(agent, fake_upstream):
    app, key = agent
    fake_upstream.script(Reply(text="Hello agent."))
    call, raw = await post(key, ask(f"app:{app.name}"))
    assert call.status == 200, raw
    answer = json.loads(raw)
    assert answer["choices"][0]["message"]["content"] == "Hello agent." and answer["model"] == f"app:{app.name}"
    call, raw = await post(key, ask("app:someone-else"))
    assert call.status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"


async def test_a_request_refused_before_any_provider_call_does_not_use_the_rate_limit(pool, fake_upstream):
    _, key = pool
    from agentcore.models import AgentApp

    await AgentApp.objects.filter(name="openai-app").aupdate(requests_per_minute=1)
    call, raw = await post(key, ask(temperature=2.5))  # outside the provider's range: no member is called
    assert call.status == 400 and json.loads(raw)["error"]["param"] == "temperature", raw
    assert not fake_upstream.chat_requests
    assert (await post(key, ask()))[0].status == 200
    assert (await post(key, ask()))[0].status == 429  # the one request let through counted


async def test_a_pools_streamed_request_reads_the_shared_cache_in_one_round_trip(pool, fake_upstream, monkeypatch):
    """The key, its app and the config generation (the pool's lookup) come in one round trip once this process has
    seen the key."""
    from django.conf import settings

    from difyapi.tests.factories import shared_cache_trips

    _, key = pool
    fake_upstream.script(Reply(text="first"), Reply(text="second"))
    call, raw = await post(key, ask(stream=True))
    assert lines(raw)[-1] == "[DONE]"
    trips = shared_cache_trips(monkeypatch)
    call, raw = await post(key, ask(stream=True))
    monkeypatch.undo()
    assert call.status == 200 and lines(raw)[-1] == "[DONE]"
    assert [trip for trip in trips if trip != "redis"] == ["get_many"]
    if "redis" in settings.CACHES["default"]["BACKEND"].lower():
        assert trips.count("redis") == 2  # those reads, and the request's token counters when it ends
