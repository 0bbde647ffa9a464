"""Tool policies, one home for all of them: the built-in tools' defaults, the rules nobody can switch off, keeping
the rows in step with the tools that exist (built-in and MCP), changing a policy, and the per-process tool setup
that runs read, with the signal receiver that tells every process when it changed."""
from __future__ import annotations

import inspect
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache
from django.db import transaction
from langchain_core.tools import BaseTool

from agentcore.errors import InvalidInput
from agentcore.graph import ToolRule, truncate
from agentcore.models import MCPServer, ToolPolicy
from agentcore.tools import builtin
from llmconfigs.models import AuditLog
from llmconfigs.services import audit_changes, audit_record
from opsagent.common.cache import cache_forget, cache_get

SHELL_TOOL = "run_shell"


# ----- defaults and rules -----

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


def _builtin_defaults_missing(present: Collection[str]) -> list[ToolPolicy]:
    """Unsaved rows, with their defaults, for the built-in tools that have none among `present`."""
    return [
        ToolPolicy(name=name, source=ToolPolicy.Source.BUILTIN, description=d.description, enabled=d.enabled,
                   requires_approval=d.requires_approval, approver=d.approver)
        for name, d in BUILTIN_DEFAULTS.items() if name not in present
    ]


def tool_policies_with_defaults() -> list[ToolPolicy]:
    """Every policy as it applies now, without writing: the rows, and the defaults of built-in tools that have no
    row yet (the row a turn or a policy change creates holds the same values)."""
    policies = list(ToolPolicy.objects.all())
    return policies + _builtin_defaults_missing({p.name for p in policies})


# ----- keeping the rows in step -----

def tool_policy_add_builtins() -> list[ToolPolicy]:
    """Every policy row, after creating the missing built-in ones with their defaults (idempotent; existing rows are
    left alone). Once the rows exist it is a single read, no write."""
    policies = list(ToolPolicy.objects.all())
    missing = _builtin_defaults_missing({p.name for p in policies})
    if not missing:
        return policies
    ToolPolicy.objects.bulk_create(missing, ignore_conflicts=True)
    tool_setup_changed()  # bulk_create sends no signals
    return list(ToolPolicy.objects.all())


def tool_policy_add_mcp(*, server: MCPServer, tools: list[BaseTool]) -> None:
    """Policy rows for newly seen tools of an MCP server, with the server's approval default (existing rows keep
    their settings)."""
    ToolPolicy.objects.bulk_create(
        [
            ToolPolicy(name=t.name, source=ToolPolicy.Source.MCP, mcp_server=server,
                       description=truncate(t.description or "", 2000),
                       requires_approval=server.requires_approval_default)
            for t in tools
        ],
        ignore_conflicts=True,
    )
    tool_setup_changed()  # bulk_create sends no signals


def tool_policy_update(*, name: str, actor=None, source: str = "", ip_address: str | None = None,
                       user_agent: str = "", **fields: Any) -> ToolPolicy:
    """Change a tool's policy (enabled, requires_approval, approver), with an audit row of what changed. run_shell
    can be enabled or disabled but never made approval-free or approvable by the requester."""
    allowed = {"enabled", "requires_approval", "approver", "description"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise InvalidInput(f"Unknown field(s): {', '.join(unknown)}.", field=unknown[0])
    for key in ("enabled", "requires_approval"):
        if key in fields and not isinstance(fields[key], bool):
            raise InvalidInput(f"{key} must be true or false.", field=key)
    if "approver" in fields and fields["approver"] not in ToolPolicy.Approver.values:
        raise InvalidInput(f"approver must be one of {', '.join(ToolPolicy.Approver.values)}.", field="approver")
    if name == SHELL_TOOL:
        if fields.get("requires_approval") is False:
            raise InvalidInput("run_shell always requires an approval.", field="requires_approval")
        if fields.get("approver", ToolPolicy.Approver.STAFF) != ToolPolicy.Approver.STAFF:
            raise InvalidInput("Only staff may approve run_shell.", field="approver")
    tool_policy_add_builtins()
    with transaction.atomic():
        policy = ToolPolicy.objects.select_for_update().filter(name=name).first()
        if policy is None:
            raise InvalidInput(f"Unknown tool {name!r}.", field="name")
        changes = audit_changes({key: getattr(policy, key) for key in fields}, fields)
        for key, value in fields.items():
            setattr(policy, key, value)
        policy.save()
        if changes:
            audit_record(actor=actor, action=AuditLog.Action.UPDATE, target=policy, changes=changes, source=source,
                         ip_address=ip_address, user_agent=user_agent)
    return policy


def tool_policy_delete(*, policy: ToolPolicy, actor=None, source: str = "", ip_address: str | None = None,
                       user_agent: str = "") -> None:
    """Delete a policy row, audited with what it said: the tool falls back to its defaults (a built-in's, or its MCP
    server's approval default when the server is next listed), which may be laxer than the row."""
    with transaction.atomic():
        audit_record(actor=actor, action=AuditLog.Action.DELETE, target=policy, source=source, ip_address=ip_address,
                     user_agent=user_agent,
                     changes={key: {"old": getattr(policy, key)} for key in ("enabled", "requires_approval",
                                                                            "approver")})
        policy.delete()


# ----- the tool setup runs read -----

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
    """The tool setup (sync: the run service reads it in the turn's own database hop). Reading it after a change
    also creates the built-in rows that are missing, so that a run's tools all have their policy."""
    global _loaded
    version = cache_get(TOOL_SETUP_VERSION_KEY) or cache.get_or_set(TOOL_SETUP_VERSION_KEY, lambda: uuid.uuid4().hex,
                                                                     timeout=None)
    loaded = _loaded
    if loaded is not None and loaded[0] == version:
        return loaded[1]
    # The stamp is read before the rows: a change committed after this read replaces the stamp, so the rows read
    # now are never kept under a stamp newer than themselves.
    setup = ToolSetup(policies={p.name: p for p in tool_policy_add_builtins()},
                      servers=tuple(MCPServer.objects.filter(enabled=True)))
    _loaded = (version, setup)
    return setup


def tool_setup_changed() -> None:
    """Make every process read the tool setup again (now, and again once the current transaction commits)."""
    cache_forget(TOOL_SETUP_VERSION_KEY)


def tool_setup_row_changed(sender, **kwargs) -> None:
    """Receiver of post_save and post_delete of ToolPolicy and MCPServer (connected in AgentCoreConfig.ready)."""
    tool_setup_changed()
