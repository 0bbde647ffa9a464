"""Tool policies (defaults, the rules nobody can switch off) and the tool set a run may use."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from langchain_core.tools import BaseTool

from agentcore.graph import ToolRule
from agentcore.models import AgentApp, ToolPolicy
from agentcore.tools import builtin

SHELL_TOOL = "run_shell"


@dataclass(frozen=True)
class BuiltinDefault:
    description: str
    enabled: bool = True
    requires_approval: bool = False
    approver: str = ToolPolicy.Approver.REQUESTER


def _doc(fn) -> str:
    return inspect.cleandoc(fn.__doc__ or "")


BUILTIN_DEFAULTS: dict[str, BuiltinDefault] = {
    "current_time": BuiltinDefault(_doc(builtin.current_time)),
    "http_check": BuiltinDefault(_doc(builtin.http_check)),
    "dns_lookup": BuiltinDefault(_doc(builtin.dns_lookup)),
    "system_status": BuiltinDefault(_doc(builtin.system_status)),
    # Disabled until an admin enables it; approval and approver are also enforced in rule_for(), whatever the row says.
    SHELL_TOOL: BuiltinDefault(_doc(builtin.run_shell), enabled=False, requires_approval=True,
                               approver=ToolPolicy.Approver.STAFF),
    "update_plan": BuiltinDefault("Replace the plan (ordered steps with a status) for this conversation."),
}


def rule_for(policy: ToolPolicy) -> ToolRule:
    if policy.name == SHELL_TOOL:
        return ToolRule(requires_approval=True, approver=ToolPolicy.Approver.STAFF)
    return ToolRule(requires_approval=policy.requires_approval, approver=policy.approver)


def known_tool_names() -> set[str]:
    return set(BUILTIN_DEFAULTS) | set(ToolPolicy.objects.values_list("name", flat=True))


async def tools_for_run(
    *, app: AgentApp, session_id: str, subset: list[str] | None
) -> tuple[dict[str, BaseTool], dict[str, ToolRule]]:
    """The tools bound for one run and their approval rules: enabled by policy, allowed by the app (empty list =
    all) and, when given, in the turn's subset."""
    from agentcore.mcp import mcp_tools
    from agentcore.services import tool_policy_sync

    available = builtin.builtin_tools(session_id=session_id)
    available.update(await mcp_tools())
    policies = {p.name: p for p in await sync_to_async(tool_policy_sync)()}
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
