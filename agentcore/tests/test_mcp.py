"""MCP tools through the example ops server (FastMCP over stdio): listing, policies and a call from a turn."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from channels.db import database_sync_to_async

from agentcore import examples
from agentcore.events import ApprovalRequired, ThoughtUpdate
from agentcore.mcp import amcp_server_test, mcp_server_test
from agentcore.models import MCPServer, ToolPolicy
from agentcore.runs import ApprovalDecision, TurnRequest
from agentcore.tests.factories import run_all
from tests.fakes.upstream import Reply, ToolCall

pytestmark = pytest.mark.django_db(transaction=True)
EXAMPLE = str(Path(examples.__file__).with_name("ops_mcp_server.py"))


@pytest.fixture
def ops_server(transactional_db):
    return MCPServer.objects.create(name="ops", transport="stdio", command=sys.executable, args=[EXAMPLE],
                                    requires_approval_default=False)


async def test_server_test_lists_its_tools_and_creates_policies(ops_server):
    result = await amcp_server_test(server=ops_server)
    assert result["ok"] is True
    assert {t["name"] for t in result["tools"]} == {"ops__hostname", "ops__uptime", "ops__port_check"}
    policy = await ToolPolicy.objects.aget(name="ops__port_check")
    assert (policy.source, policy.mcp_server_id, policy.requires_approval) == ("mcp", ops_server.pk, False)


def test_server_test_reports_a_broken_server(transactional_db):
    server = MCPServer.objects.create(name="broken", transport="stdio", command="/nonexistent/mcp-server")
    result = mcp_server_test(server=server)
    # The reason, not just any failure: the command could not be started.
    assert result == {"ok": False, "error": "FileNotFoundError: [Errno 2] No such file or directory: "
                                            "'/nonexistent/mcp-server'"}


async def test_agent_calls_an_mcp_tool_end_to_end(agent_app, plain_user, fake_upstream, ops_server):
    import socket

    fake_upstream.script(
        Reply(tool_calls=[ToolCall("ops__port_check", {"host": "127.0.0.1", "port": fake_upstream.port})]),
        Reply(text="The port is open."),
    )
    events = await run_all(TurnRequest(app=agent_app, query="is the upstream port open?", owner=plain_user))
    assert events[-1].status == "normal" and events[-1].answer == "The port is open."
    offered = {t["function"]["name"] for t in fake_upstream.chat_requests[0].body["tools"]}
    assert {"ops__hostname", "ops__uptime", "ops__port_check"} <= offered
    result = next(e for e in events if isinstance(e, ThoughtUpdate) and e.phase == "tool_result")
    assert result.status == "done" and json.loads(result.observation)["open"] is True
    assert socket.gethostname()


async def test_allowed_tools_and_approval_default_apply(agent_app, plain_user, fake_upstream, ops_server):
    ops_server.allowed_tools = ["hostname"]
    ops_server.requires_approval_default = True
    await ops_server.asave()
    fake_upstream.script(Reply(tool_calls=[ToolCall("ops__hostname", {})]))
    paused = await run_all(TurnRequest(app=agent_app, query="which host?", owner=plain_user))
    offered = {t["function"]["name"] for t in fake_upstream.chat_requests[0].body["tools"]}
    assert "ops__hostname" in offered and "ops__uptime" not in offered
    required = [e for e in paused if isinstance(e, ApprovalRequired)]
    assert paused[-1].status == "paused" and required[0].tool == "ops__hostname"
    fake_upstream.script(Reply(text="Done."))
    events = await run_all(TurnRequest(app=agent_app, owner=plain_user, approval=ApprovalDecision(
        approval_id=required[0].approval_id, decision="approve")))
    import socket

    tool_message = fake_upstream.chat_requests[-1].messages[-1]
    assert events[-1].status == "normal" and socket.gethostname() in tool_message["content"]
    assert await database_sync_to_async(ToolPolicy.objects.filter(source="mcp").count)() == 1
