"""The agent's permissions by name and the rules built on them: what the staff flag used to decide, and the two
custom permissions (approving shell commands, managing stdio MCP servers). Superusers hold every permission."""
from __future__ import annotations

from agentcore.models import MCPServer, ToolPolicy
from agentcore.tools.policies import SHELL_TOOL

APPROVE_SHELL = "agentcore.approve_shell"
MANAGE_MCP_STDIO = "agentcore.manage_mcp_stdio"
VIEW_APPROVALS = "agentcore.view_approval"
DECIDE_APPROVALS = "agentcore.change_approval"
VIEW_SESSIONS = "agentcore.view_session"
CHANGE_SESSIONS = "agentcore.change_session"
DELETE_SESSIONS = "agentcore.delete_session"

# Tools that run a command line on the host: deciding their approvals needs APPROVE_SHELL, whatever their policy says.
COMMAND_TOOLS = frozenset({SHELL_TOOL})


def has_perms(user, *permissions: str) -> bool:
    """`user` (a Django user, or None for an API end user) holds every one of `permissions`."""
    return user is not None and user.is_authenticated and user.has_perms(permissions)


def approval_decision_permissions(*, tool: str, approver: str) -> tuple[str, ...]:
    """What deciding (approving or rejecting) an approval of `tool` takes beyond being its requester: APPROVE_SHELL
    for a command-running tool, DECIDE_APPROVALS for a tool whose policy names approvers, nothing otherwise."""
    if tool in COMMAND_TOOLS:
        return (APPROVE_SHELL,)
    if approver == ToolPolicy.Approver.STAFF:
        return (DECIDE_APPROVALS,)
    return ()


def may_see_every_approval(user) -> bool:
    return has_perms(user, VIEW_APPROVALS) or has_perms(user, DECIDE_APPROVALS)


def mcp_server_is_command(server: MCPServer | None) -> bool:
    """A stdio server is a command line the service runs as its own user."""
    return server is not None and server.transport == MCPServer.Transport.STDIO


def may_see_mcp_secrets(user) -> bool:
    """Stdio args (tokens hide there too) are shown only to those who may manage stdio servers."""
    return has_perms(user, MANAGE_MCP_STDIO)
