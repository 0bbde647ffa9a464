"""Every provider call is recorded once, with what happened: chat turns and tool-loop steps through the run service
(against the real HTTP fake upstream), pool failover attempts, conversation titles, connection tests; and the
usage report over them adds up."""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from agentcore.generation import session_generate_name
from agentcore.models import AgentApp, Session
from agentcore.runs import TurnRequest
from agentcore.tests.factories import run_all
from llmconfigs.models import LLMConfig, ProviderCall
from llmconfigs.services import llm_config_test_connection
from tests.fakes.upstream import Reply, ToolCall
from tests.fixtures import client_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def _close_worker_connections():
    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture
def priced(default_llm_config):
    LLMConfig.objects.filter(pk=default_llm_config.pk).update(input_price_per_million=Decimal("1.5"),
                                                              output_price_per_million=Decimal("2"))
    return LLMConfig.objects.get(pk=default_llm_config.pk)


@pytest.fixture
def chat_app(priced):
    return AgentApp.objects.create(name="Usage chat", mode=AgentApp.Mode.CHAT, system_prompt="Answer briefly.")


@pytest.fixture
def agent_app(priced):
    return AgentApp.objects.create(name="Usage agent", mode=AgentApp.Mode.AGENT_CHAT, system_prompt="Ops.")


def calls() -> list[ProviderCall]:
    return list(ProviderCall.objects.order_by("created_at", "id"))


async def test_three_answers_and_a_failure_make_a_success_rate_of_three_quarters(chat_app, plain_user, priced,
                                                                                   fake_upstream, grant):
    fake_upstream.script(*[Reply(text="Fine.", prompt_tokens=1000, completion_tokens=300)] * 3,
                         Reply(status=500, error_message="upstream exploded"))
    for _ in range(4):
        await run_all(TurnRequest(app=chat_app, query="How is the disk?", owner=plain_user))

    rows = await sync_to_async(calls)()
    assert [(r.kind, r.status, r.error_category) for r in rows] == [("chat", "ok", "")] * 3 + [
        ("chat", "error", "upstream_error")]
    assert all(r.config_id == priced.pk and r.config_name == priced.name and r.app_name == "Usage chat"
               and r.user_id == plain_user.pk for r in rows)
    assert all(r.ttft_ms is not None and r.latency_ms >= r.ttft_ms for r in rows[:3])
    assert (rows[3].ttft_ms, rows[3].prompt_tokens) == (None, 0)
    assert [r.cost for r in rows] == [Decimal("0.0021")] * 3 + [Decimal(0)]

    reader = await sync_to_async(grant)(plain_user, "llmconfigs.view_usage")
    now = datetime.now(UTC)
    response = await sync_to_async(client_for(reader).get)("/api/usage/", {
        "from": (now - timedelta(hours=1)).isoformat(), "to": (now + timedelta(hours=1)).isoformat(),
        "group_by": "config"})
    [total] = response.json()["totals"]
    assert (total["calls"], total["errors"], total["success_rate"]) == (4, 1, 0.75)
    assert total["error_categories"] == {"upstream_error": 1}
    assert (total["prompt_tokens"], total["completion_tokens"]) == (3000, 900)
    assert total["cost"] == {"USD": "0.0063000"}


async def test_an_agent_turn_records_its_first_call_and_each_tool_loop_step(agent_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(tool_calls=[ToolCall("current_time", {})], prompt_tokens=50, completion_tokens=7),
                         Reply(text="It is noon.", prompt_tokens=80, completion_tokens=4))
    events = await run_all(TurnRequest(app=agent_app, query="time?", owner=plain_user))
    assert events[-1].status == "normal"
    rows = await sync_to_async(calls)()
    assert [(r.kind, r.status, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("chat", "ok", 50, 7), ("tool_step", "ok", 80, 4)]


async def test_a_failover_records_the_failed_member_and_the_one_that_answered(chat_app, plain_user, fake_upstream,
                                                                            make_llm_config, priced):
    broken = await sync_to_async(make_llm_config)(name="broken", model_name="m-broken", route="pool-u", priority=5,
                                                  base_url="http://127.0.0.1:9/v1")
    healthy = await sync_to_async(make_llm_config)(name="healthy", model_name="m-healthy", route="pool-u")
    fake_upstream.script(Reply(text="From the pool.", prompt_tokens=3, completion_tokens=2))
    from agentcore.runs import TurnOverrides

    events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user,
                                       overrides=TurnOverrides(model="pool-u")))
    assert events[-1].status == "normal"
    rows = await sync_to_async(calls)()
    assert [(r.config_id, r.route, r.status, r.error_category) for r in rows] == [
        (broken.pk, "pool-u", "error", "unreachable"), (healthy.pk, "pool-u", "ok", "")]


def test_a_title_and_a_connection_test_are_recorded_as_such(chat_app, plain_user, priced, fake_upstream,
                                                            staff_user):
    session = Session.objects.create(app=chat_app, owner=plain_user)
    session.messages.create(query="Why is the disk full?", answer="Logs.")
    fake_upstream.script(Reply(text="Full disk", prompt_tokens=20, completion_tokens=2), Reply(text="pong"))
    assert session_generate_name(session=session) == "Full disk"
    assert llm_config_test_connection(config=priced, actor=staff_user).ok
    fake_upstream.script(Reply(status=401, error_message="bad key {api_key}"))
    assert not llm_config_test_connection(config=priced, actor=staff_user).ok
    rows = calls()
    assert [(r.kind, r.status, r.error_category, r.prompt_tokens) for r in rows] == [
        ("title", "ok", "", 20), ("connection_test", "ok", "", 1), ("connection_test", "error", "auth", 0)]
    assert rows[0].app_name == "Usage chat" and rows[0].user_id == plain_user.pk
    assert rows[1].user_id == staff_user.pk and rows[1].ttft_ms is not None


async def test_a_client_that_leaves_before_the_first_token_leaves_a_cancelled_call(chat_app, plain_user, priced,
                                                                                  fake_upstream):
    # REST and WebSocket turns: the client going away cancels the task that reads the run's events.
    fake_upstream.script(Reply(text="late", first_delay=5))
    reader = asyncio.create_task(run_all(TurnRequest(app=chat_app, query="How is the disk?", owner=plain_user)))
    for _ in range(100):  # the provider is called: its stream is open, nothing came yet
        if fake_upstream.active_streams:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    [row] = await sync_to_async(calls)()
    assert (row.kind, row.status, row.error_category, row.ttft_ms) == ("chat", "error", "cancelled", None)
    assert row.config_id == priced.pk and row.user_id == plain_user.pk and row.latency_ms >= 150
    assert row.cost == 0


async def test_recording_off_writes_nothing(chat_app, plain_user, fake_upstream, settings):
    settings.USAGE_RECORDING = False
    fake_upstream.script(Reply(text="Fine."))
    await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user))
    assert await ProviderCall.objects.acount() == 0
