"""What a /v1/chat/completions request leaves in the usage records: one ProviderCall row per provider call (each
member tried, failed or not), written once when the request ends (a client that leaves and an error included), with
the app and the key it came from; the agent model's turn records its calls as any turn does."""
from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import pytest
from channels.routing import get_default_application

from difyapi.models import ApiKey
from difyapi.openai.tests.test_chat_completions import PATH, ask, post
from difyapi.tests.factories import make_app_with_key
from llmconfigs.models import LLMConfig, ProviderCall
from tests.e2e.dify_servers import AsgiCall, dify_headers
from tests.fakes.upstream import Reply, ToolCall

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_worker_connections")]

FIELDS = ("config_name", "route", "kind", "status", "error_category", "prompt_tokens", "completion_tokens")


@pytest.fixture
def solo(make_llm_config):
    """A pool of one ("solo", priced) and an app key."""
    make_llm_config(name="solo-member", model_name="m-solo", route="solo", input_price_per_million=1,
                    output_price_per_million=2)
    app, key = make_app_with_key(name="acct-app", mode="chat")
    return app, key


@pytest.fixture
def duo(make_llm_config):
    make_llm_config(name="duo-first", model_name="m-first", route="duo", priority=2)
    make_llm_config(name="duo-second", model_name="m-second", route="duo", priority=1)
    return make_app_with_key(name="duo-acct-app", mode="chat")


async def rows(count: int) -> list[ProviderCall]:
    """The provider calls recorded, in the order they were made, once there are `count` (the request's accounting
    may end just after its last byte); and never more."""
    for _ in range(100):
        found = [row async for row in ProviderCall.objects.order_by("created_at", "id")]
        if len(found) >= count:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    found = [row async for row in ProviderCall.objects.order_by("created_at", "id")]
    assert len(found) == count, [(r.config_name, r.error_category) for r in found]
    return found


def shape(row: ProviderCall) -> tuple:
    return tuple(getattr(row, name) for name in FIELDS)


async def origin_of(app) -> tuple[str, str, str]:
    key = await ApiKey.objects.aget(app=app)
    return str(app.pk), app.name, str(key.pk)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_pool_call_is_one_row_with_its_origin_tokens_and_cost(solo, fake_upstream, stream):
    app, key = solo
    fake_upstream.script(Reply(text="all good here", prompt_tokens=11, completion_tokens=4, delay=0.02))
    call, raw = await post(key, ask("solo", stream=stream))
    assert call.status == 200, raw
    [row] = await rows(1)
    assert shape(row) == ("solo-member", "solo", "completion", "ok", "", 11, 4)
    assert (row.app_id, row.app_name, row.key_id) == await origin_of(app)
    assert row.model_name == "m-solo" and row.user_id is None
    assert row.cost == Decimal("0.0000190") and row.currency == "USD"  # 11 x 1/M + 4 x 2/M
    assert row.latency_ms > 0
    if stream:  # the first token came before the last of three chunks 20 ms apart
        assert row.ttft_ms is not None and 0 < row.ttft_ms < row.latency_ms
        assert row.latency_ms - row.ttft_ms >= 30
    else:
        assert row.ttft_ms is None
    config = await LLMConfig.objects.aget(name="solo-member")
    assert (config.usage_count, config.prompt_tokens_total, config.completion_tokens_total) == (1, 11, 4)


@pytest.mark.parametrize("stream", [False, True])
async def test_failover_records_the_failed_member_and_the_one_that_answered(duo, fake_upstream, stream):
    app, key = duo
    fake_upstream.script(Reply(status=500, error_message="down"),
                         Reply(text="from the second", prompt_tokens=7, completion_tokens=3))
    call, raw = await post(key, ask("duo", stream=stream))
    assert call.status == 200, raw
    failed, served = await rows(2)
    assert shape(failed) == ("duo-first", "duo", "completion", "error", "upstream_error", 0, 0)
    assert shape(served) == ("duo-second", "duo", "completion", "ok", "", 7, 3)
    assert failed.ttft_ms is None and failed.latency_ms > 0
    assert {(r.app_id, r.app_name, r.key_id) for r in (failed, served)} == {await origin_of(app)}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_every_member_failed_is_recorded(duo, fake_upstream, stream):
    _, key = duo
    fake_upstream.script(Reply(status=500, error_message="down"), Reply(status=429, error_message="slow down"))
    call, raw = await post(key, ask("duo", stream=stream))
    assert call.status == 429, raw
    first, second = await rows(2)
    assert (first.config_name, first.error_category) == ("duo-first", "upstream_error")
    assert (second.config_name, second.status, second.error_category) == ("duo-second", "error", "rate_limit")
    assert await LLMConfig.objects.filter(prompt_tokens_total__gt=0).acount() == 0  # nothing answered


async def test_a_failure_mid_stream_is_an_error_row_after_its_first_token(solo, fake_upstream):
    _, key = solo
    fake_upstream.script(Reply(text="a b c", stream_error="overloaded"))
    call, raw = await post(key, ask("solo", stream=True))
    assert call.status == 200 and b'"error"' in raw
    [row] = await rows(1)
    assert (row.status, row.error_category) == ("error", "upstream_error")
    assert row.ttft_ms is not None


async def test_a_request_refused_before_any_call_records_nothing(solo, fake_upstream):
    _, key = solo
    call, raw = await post(key, ask("solo", temperature=2.5))
    assert call.status == 400, raw
    await rows(0)


async def test_a_client_that_leaves_mid_stream_leaves_one_row(solo, fake_upstream):
    _, key = solo
    fake_upstream.script(Reply(text=" ".join(["word"] * 50), delay=0.1, prompt_tokens=5, completion_tokens=50))
    body = json.dumps(ask("solo", stream=True)).encode()
    async with AsgiCall(get_default_application(), path=PATH, headers=dify_headers(key), body=body) as call:
        assert await call.start() == 200
        await call.chunk()
        await call.disconnect()
    [row] = await rows(1)
    # The call answered (its first token came): it is no provider error, and it lasted until the client left.
    assert (row.status, row.error_category, row.kind) == ("ok", "", "completion")
    assert row.ttft_ms is not None and row.latency_ms >= row.ttft_ms
    assert row.completion_tokens == 0  # the provider's usage comes with its last chunk, never sent


async def test_a_client_that_leaves_before_the_first_token_leaves_a_cancelled_row(solo, fake_upstream):
    _, key = solo
    fake_upstream.script(Reply(text="late", first_delay=5))
    body = json.dumps(ask("solo", stream=True)).encode()
    async with AsgiCall(get_default_application(), path=PATH, headers=dify_headers(key), body=body) as call:
        await asyncio.sleep(0.3)
        await call.disconnect()
    [row] = await rows(1)
    assert (row.status, row.error_category, row.ttft_ms) == ("error", "cancelled", None)
    assert row.latency_ms >= 200


@pytest.fixture
def agent(default_llm_config):
    return make_app_with_key(name="acct-agent", mode="agent-chat", enabled_tools=["current_time"])


async def test_the_agent_model_records_its_turn_calls(agent, fake_upstream, default_llm_config):
    app, key = agent
    fake_upstream.script(Reply(tool_calls=[ToolCall("current_time", {})], prompt_tokens=5, completion_tokens=2),
                         Reply(text="It is late.", prompt_tokens=9, completion_tokens=3))
    call, raw = await post(key, ask("opsagent", stream=True))
    assert call.status == 200, raw
    step, answer = await rows(2)
    assert [(r.kind, r.status, r.prompt_tokens, r.completion_tokens) for r in (step, answer)] == [
        ("chat", "ok", 5, 2), ("tool_step", "ok", 9, 3)]
    assert {(r.app_id, r.app_name, r.key_id) for r in (step, answer)} == {await origin_of(app)}
    assert {r.config_id for r in (step, answer)} == {default_llm_config.pk}
