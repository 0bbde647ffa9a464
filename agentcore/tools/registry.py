"""Tool policies (defaults, the rules nobody can switch off) and the tool set a run may use."""
from __future__ import annotations

import inspect
import uuid
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from langchain_core.tools import BaseTool

from agentcore.graph import ToolRule
from agentcore.models import AgentApp, MCPServer, ToolPolicy
from agentcore.network import allow_list_for
from agentcore.tools import builtin
from opsagent.common.cache import cache_forget

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
    "http_check": BuiltinDefault(builtin.HTTP_CHECK_DESCRIPTION),
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


@dataclass(frozen=True)
class ToolSetup:
    """What a run's tool set is built from: the policy rows by name and the enabled MCP servers."""

    policies: dict[str, ToolPolicy]
    servers: tuple[MCPServer, ...]


# The setup is read by every agent turn and changes rarely. It is kept in this process only (MCP servers carry
# decrypted secrets, which must not be pickled into a shared cache), tagged with a version stamp that lives in the
# shared cache: any change in any process replaces the stamp, and every process reloads on its next turn.
TOOL_SETUP_VERSION_KEY = "agentcore:tool-setup-version"
_loaded: tuple[str, ToolSetup] | None = None


def tool_setup_load() -> ToolSetup:
    """The tool setup (sync: the run service reads it in the turn's own database hop)."""
    global _loaded
    from agentcore.services import tool_policy_sync

    version = cache.get_or_set(TOOL_SETUP_VERSION_KEY, lambda: uuid.uuid4().hex, timeout=None)
    loaded = _loaded
    if loaded is not None and loaded[0] == version:
        return loaded[1]
    # The stamp is read before the rows: a change committed after this read replaces the stamp, so the rows read
    # now are never kept under a stamp newer than themselves.
    setup = ToolSetup(policies={p.name: p for p in tool_policy_sync()},
                      servers=tuple(MCPServer.objects.filter(enabled=True)))
    _loaded = (version, setup)
    return setup


def tool_setup_changed() -> None:
    """Make every process read the tool setup again (now, and again once the current transaction commits)."""
    cache_forget(TOOL_SETUP_VERSION_KEY)


@receiver([post_save, post_delete], sender=ToolPolicy, dispatch_uid="agentcore.tool_setup.policy")
@receiver([post_save, post_delete], sender=MCPServer, dispatch_uid="agentcore.tool_setup.server")
def _setup_row_changed(sender, **kwargs) -> None:
    tool_setup_changed()


async def tools_for_run(
    *, app: AgentApp, session_id: str, subset: list[str] | None, setup: ToolSetup | None = None
) -> tuple[dict[str, BaseTool], dict[str, ToolRule]]:
    """The tools bound for one run and their approval rules: enabled by policy, allowed by the app (empty list =
    all) and, when given, in the turn's subset. `setup` is read now when the caller has not read it."""
    from agentcore.mcp import mcp_tools
    from agentcore.services import tool_policy_sync

    if setup is None:
        setup = await sync_to_async(tool_setup_load)()
    available = builtin.builtin_tools(session_id=session_id, allow=allow_list_for(app))
    available.update(await mcp_tools(servers=setup.servers, known=setup.policies.keys()))
    policies = setup.policies
    if not available.keys() <= policies.keys():  # MCP tools seen for the first time got their rows just now
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
