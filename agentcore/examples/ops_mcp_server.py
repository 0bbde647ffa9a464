"""An example MCP ops tool server (FastMCP over stdio): host name, uptime and TCP port checks, all read-only.

Register it as an MCP server with transport stdio, command = the Python interpreter, args = [this file's path].
"""
from __future__ import annotations

import socket
import time

from mcp.server.fastmcp import FastMCP

PORT_CHECK_MAX_TIMEOUT = 10.0

server = FastMCP("opsagent-example-ops")


@server.tool()
def hostname() -> str:
    """The host name of the machine this server runs on."""
    return socket.gethostname()


@server.tool()
def uptime() -> dict:
    """How long the machine has been up, in seconds and as days/hours/minutes."""
    with open("/proc/uptime") as source:
        seconds = float(source.read().split()[0])
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return {"seconds": round(seconds, 1), "human": f"{days}d {hours}h {rest // 60}m"}


@server.tool()
def port_check(host: str, port: int, timeout: float = 3.0) -> dict:
    """Whether a TCP port accepts connections, and how long the connection took."""
    if not 0 < port < 65536:
        return {"host": host, "port": port, "open": False, "error": "port must be 1-65535"}
    timeout = min(max(timeout, 0.1), PORT_CHECK_MAX_TIMEOUT)
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        return {"host": host, "port": port, "open": False, "error": str(exc) or type(exc).__name__}
    return {"host": host, "port": port, "open": True, "connect_ms": round((time.monotonic() - started) * 1000, 1)}


if __name__ == "__main__":
    server.run("stdio")
