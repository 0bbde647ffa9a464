"""Tools from configured MCP servers (langchain-mcp-adapters), named `<server>__<tool>`, with their policy rows."""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Collection, Sequence
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from langchain_core.tools import BaseTool
from langchain_mcp_adapters.client import MultiServerMCPClient

from agentcore.graph import truncate
from agentcore.models import MCPServer
from agentcore.tools.policies import tool_policy_add_mcp

logger = logging.getLogger(__name__)

LIST_TIMEOUT_SECONDS = 20.0
# Listing a stdio server starts a process; a short-lived per-process cache keeps that off most turns. The key holds
# updated_at, so an edited server is listed again at once.
LIST_CACHE_SECONDS = 60.0
_listing_cache: dict[tuple[str, str], tuple[float, list[BaseTool]]] = {}


def tool_prefix(server: MCPServer) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", server.name) + "__"


def _connection(server: MCPServer) -> dict[str, Any]:
    if server.transport == MCPServer.Transport.STDIO:
        return {"transport": "stdio", "command": server.command, "args": [str(a) for a in server.args or []],
                "env": dict(server.env or {}) or None}
    return {"transport": "streamable_http", "url": server.url, "headers": dict(server.headers or {}) or None}


async def _list_tools(server: MCPServer) -> list[BaseTool]:
    """The server's tools, renamed with the server prefix and filtered by allowed_tools."""
    key = (str(server.pk), server.updated_at.isoformat() if server.updated_at else "")
    hit = _listing_cache.get(key)
    if hit and hit[0] > time.monotonic():
        return hit[1]
    client = MultiServerMCPClient({server.name: _connection(server)})
    listed = await asyncio.wait_for(client.get_tools(server_name=server.name), timeout=LIST_TIMEOUT_SECONDS)
    allowed = set(server.allowed_tools or [])
    prefix = tool_prefix(server)
    # The adapter's tool calls the MCP tool by its original name (kept in its closure), so renaming is safe.
    tools = [t.model_copy(update={"name": prefix + t.name}) for t in listed if not allowed or t.name in allowed]
    _listing_cache[key] = (time.monotonic() + LIST_CACHE_SECONDS, tools)
    return tools


async def mcp_tools(*, servers: Sequence[MCPServer], known: Collection[str] = ()) -> dict[str, BaseTool]:
    """Tools of the enabled `servers`; a server that cannot be reached is logged and skipped, not fatal to the run.
    Tools whose names are not in `known` (the existing policy rows) get their policy rows."""
    if not servers:
        return {}
    results = await asyncio.gather(*(_list_tools(s) for s in servers), return_exceptions=True)
    tools: dict[str, BaseTool] = {}
    for server, result in zip(servers, results, strict=True):
        if isinstance(result, BaseException):
            logger.warning("MCP server %s unavailable: %s", server.name, type(result).__name__)
            continue
        if any(t.name not in known for t in result):
            await sync_to_async(tool_policy_add_mcp)(server=server, tools=result)
        tools.update((t.name, t) for t in result)
    return tools


async def amcp_server_test(*, server: MCPServer) -> dict[str, Any]:
    """Connect to the server and list its tools: {"ok": True, "tools": [{name, description}]} or
    {"ok": False, "error": ...}."""
    _listing_cache.clear()
    try:
        tools = await _list_tools(server)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong is the test's answer
        return {"ok": False, "error": _error_text(exc)}
    await sync_to_async(tool_policy_add_mcp)(server=server, tools=tools)
    return {"ok": True, "tools": [{"name": t.name, "description": t.description or ""} for t in tools]}


def mcp_server_test(*, server: MCPServer) -> dict[str, Any]:
    """Synchronous form for views and admin actions."""
    return async_to_sync(amcp_server_test)(server=server)


def _error_text(exc: BaseException) -> str:
    # TaskGroup failures wrap the real cause; show the innermost one.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, TimeoutError):
        return f"The server did not answer within {LIST_TIMEOUT_SECONDS:.0f} s."
    return truncate(f"{type(exc).__name__}: {exc}", 500)
