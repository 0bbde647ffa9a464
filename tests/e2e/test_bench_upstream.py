"""The benchmarks' agent-tools mode over real HTTP (daphne, /v1/chat-messages): the fake upstream's tool-calling
script makes an agent run the tool and then answer, and the bench's reader notices when it did not."""
from __future__ import annotations

import json

import httpx
import pytest

from agentcore.models import AgentApp, Message, Thought
from bench.dify_overhead import FAKE_ANSWER, TOOL, TOOL_ARGUMENTS, ttft_dify
from difyapi.auth import api_key_create
from tests.fakes.upstream import ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def agent_key(default_llm_config) -> str:
    app = AgentApp.objects.create(name="e2e-agent-tools", mode=AgentApp.Mode.AGENT_CHAT)
    _, key = api_key_create(app=app)
    return key


async def test_the_tool_calling_upstream_makes_the_agent_run_the_tool_then_answer(daphne_server, agent_key,
                                                                                  fake_upstream):
    fake_upstream.tool_first = ToolCall(TOOL, TOOL_ARGUMENTS)
    async with httpx.AsyncClient(timeout=30) as client:
        await ttft_dify(client, daphne_server.base_url, agent_key, tool=TOOL)
        await ttft_dify(client, daphne_server.base_url, agent_key, tool=TOOL)  # each new turn calls it again

    messages = [m async for m in Message.objects.order_by("created_at")]
    assert [(m.status, m.answer) for m in messages] == [("normal", FAKE_ANSWER)] * 2
    thoughts = [t async for t in Thought.objects.filter(message=messages[0], tool=TOOL)]
    assert len(thoughts) == 1 and thoughts[0].status == "done"
    assert thoughts[0].tool_input == TOOL_ARGUMENTS
    assert json.loads(thoughts[0].observation)["timezone"] == "UTC"
    # Two model calls per turn: the first offers the tool and gets the call, the second carries its result.
    calls = fake_upstream.chat_requests
    assert len(calls) == 4
    assert TOOL in {tool["function"]["name"] for tool in calls[0].body["tools"]}
    assert [m["role"] for m in calls[1].messages][-2:] == ["assistant", "tool"]
    assert calls[1].messages[-1]["tool_call_id"] == calls[1].messages[-2]["tool_calls"][0]["id"]


async def test_the_bench_refuses_an_agent_turn_that_answered_without_the_tool(daphne_server, agent_key,
                                                                             fake_upstream):
    fake_upstream.tool_first = ToolCall(TOOL, TOOL_ARGUMENTS)
    await AgentApp.objects.filter(name="e2e-agent-tools").aupdate(enabled_tools=["dns_lookup"])  # not offered
    async with httpx.AsyncClient(timeout=30) as client:
        with pytest.raises(RuntimeError, match="before the tool"):
            await ttft_dify(client, daphne_server.base_url, agent_key, tool=TOOL)
    assert len(fake_upstream.chat_requests) == 1


def test_the_benchs_tool_calling_config_stays_out_of_the_default_pool():
    """The agent-tools app's config points at the tool-calling upstream: in the default config's pool (the same
    model name), it answered most of the plain agent-chat app's turns too, with tool calls (seen in dify_overhead.py:
    agent-chat at 10.5-12.6 ms of CPU instead of 6)."""
    from agentcore.selectors import app_pool_resolve
    from tests.e2e.dify_servers import provision_app

    plain = provision_app(name="bench-agent", mode="agent-chat", upstream_url="http://127.0.0.1:9/v1", key="app-a" * 4)
    tools = provision_app(name="bench-tools", mode="agent-chat", upstream_url="http://127.0.0.1:10/v1",
                          key="app-b" * 4, config_name="bench-tools")
    pool = app_pool_resolve(app=AgentApp.objects.get(pk=plain["app_id"]))
    assert [str(config.pk) for config in pool] == [plain["config_id"]]
    pool = app_pool_resolve(app=AgentApp.objects.get(pk=tools["app_id"]))
    assert [str(config.pk) for config in pool] == [tools["config_id"]]
