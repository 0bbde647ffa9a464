"""The tool set of one run: built-in and MCP tools, kept when their policy enables them, the app allows them and
the turn asked for them, each with its approval rule."""
from __future__ import annotations

from asgiref.sync import sync_to_async
from langchain_core.tools import BaseTool

from agentcore.graph import ToolRule
from agentcore.mcp import mcp_tools
from agentcore.models import AgentApp
from agentcore.network import NetworkAllowList, allow_list_for
from agentcore.tools.builtin import http_check_tool, run_free_tools
from agentcore.tools.plan import update_plan_tool
from agentcore.tools.policies import ToolSetup, rule_for, tool_policy_add_builtins, tool_setup_load


def builtin_tools(*, session_id: str, allow: NetworkAllowList) -> dict[str, BaseTool]:
    """The built-in tools of one run: `allow` is its app's network allow-list (loopback and private targets)."""
    tools = [*run_free_tools(), http_check_tool(allow=allow), update_plan_tool(session_id=session_id)]
    return {tool.name: tool for tool in tools}


async def tools_for_run(
    *, app: AgentApp, session_id: str, subset: list[str] | None, setup: ToolSetup | None = None
) -> tuple[dict[str, BaseTool], dict[str, ToolRule]]:
    """The tools bound for one run and their approval rules: enabled by policy, allowed by the app (empty list =
    all) and, when given, in the turn's subset. `setup` is read now when the caller has not read it."""
    if setup is None:
        setup = await sync_to_async(tool_setup_load)()
    available = builtin_tools(session_id=session_id, allow=allow_list_for(app))
    available.update(await mcp_tools(servers=setup.servers, known=setup.policies.keys()))
    policies = setup.policies
    if not available.keys() <= policies.keys():  # MCP tools seen for the first time got their rows just now
        policies = {p.name: p for p in await sync_to_async(tool_policy_add_builtins)()}
    allowed = set(app.enabled_tools or available)
    if subset is not None:
        allowed &= set(subset)
    tools: dict[str, BaseTool] = {}
    rules: dict[str, ToolRule] = {}
    for name, tool in available.items():
        policy = policies.get(name)
        if policy is None or not policy.enabled or name not in allowed:
            continue
        tools[name] = tool
        rules[name] = rule_for(policy)
    return tools, rules
