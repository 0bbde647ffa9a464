"""Built-in ops tools: real, bounded (timeouts, output caps) and safe by default."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
from langchain_core.tools import BaseTool, StructuredTool

from agentcore.graph import truncate
from agentcore.network import NetworkAllowList, NetworkRefused, checked_client, resolve, target_check

HTTP_MAX_TIMEOUT = 30.0
HTTP_MAX_BYTES = 5 * 1024 * 1024
SHELL_MAX_TIMEOUT = 120
SHELL_OUTPUT_LIMIT = 8000


def json_text(data: dict[str, Any]) -> str:
    """A tool's result as JSON text for the model."""
    return json.dumps(data, ensure_ascii=False, default=str)


async def current_time(timezone: str = "UTC") -> str:
    """The current date and time in an IANA timezone (default UTC)."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return f"Error: unknown timezone {timezone!r}."
    now = datetime.now(zone)
    return json_text({"timezone": timezone, "iso": now.isoformat(timespec="seconds"), "unix": int(now.timestamp())})


HTTP_CHECK_DESCRIPTION = (
    "GET an http(s) URL and report its status code, latency and size. Redirects are reported, not followed."
)


async def http_check_url(url: str, *, timeout: float = 10.0, allow: NetworkAllowList) -> str:
    """The `http_check` tool's work for a run whose app's network allow-list is `allow`."""
    try:
        target = await target_check(url, allow=allow)
    except NetworkRefused as exc:
        return f"Error: {exc}."
    timeout = min(max(float(timeout), 0.5), HTTP_MAX_TIMEOUT)
    started = time.monotonic()
    size = 0
    try:
        async with checked_client(timeout=timeout) as client:
            async with target.stream_get(client, user_agent="OpsAgent-http-check") as response:
                first_byte = time.monotonic() - started
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size >= HTTP_MAX_BYTES:
                        break
    except httpx.TimeoutException:
        return json_text({"url": url, "ok": False, "error": f"timed out after {timeout:g} s"})
    except httpx.HTTPError as exc:
        return json_text({"url": url, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    result = {
        "url": url,
        "ok": response.status_code < 400,
        "status": response.status_code,
        "latency_ms": round(first_byte * 1000, 1),
        "total_ms": round((time.monotonic() - started) * 1000, 1),
        "bytes": size,
        "truncated": size >= HTTP_MAX_BYTES,
        "addresses": target.addresses,
    }
    if "location" in response.headers:
        result["location"] = response.headers["location"]
    return json_text(result)


def http_check_tool(*, allow: NetworkAllowList) -> BaseTool:
    async def http_check(url: str, timeout: float = 10.0) -> str:
        return await http_check_url(url, timeout=timeout, allow=allow)

    return per_run_tool(http_check, description=HTTP_CHECK_DESCRIPTION)


async def dns_lookup(host: str) -> str:
    """Resolve a host name to its IPv4 and IPv6 addresses."""
    try:
        addresses = await asyncio.wait_for(resolve(host, 0), timeout=10)
    except (OSError, TimeoutError) as exc:
        return json_text({"host": host, "ok": False, "error": str(exc) or "lookup timed out"})
    return json_text({
        "host": host,
        "ok": True,
        "ipv4": [a for a in addresses if ":" not in a],
        "ipv6": [a for a in addresses if ":" in a],
    })


def _memory() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


async def system_status() -> str:
    """Load average, memory and root disk usage of the host OpsAgent runs on."""
    disk = shutil.disk_usage("/")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    memory = _memory()
    return json_text({
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "load_average": {"1m": round(load[0], 2), "5m": round(load[1], 2), "15m": round(load[2], 2)},
        "memory": {
            "total_bytes": memory.get("MemTotal"),
            "available_bytes": memory.get("MemAvailable"),
            "swap_total_bytes": memory.get("SwapTotal"),
            "swap_free_bytes": memory.get("SwapFree"),
        },
        "disk_root": {"total_bytes": disk.total, "used_bytes": disk.used, "free_bytes": disk.free,
                      "used_percent": round(disk.used * 100 / disk.total, 1) if disk.total else None},
    })


async def run_shell(command: str, timeout: int = 30) -> str:
    """Run a shell command on the OpsAgent host (needs an approval every time) and return its exit code and output."""
    timeout = min(max(int(timeout), 1), SHELL_MAX_TIMEOUT)
    process = await asyncio.create_subprocess_shell(
        command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return json_text({"command": command, "exit_code": None, "error": f"timed out after {timeout} s"})
    return json_text({
        "command": command,
        "exit_code": process.returncode,
        "output": truncate(output.decode(errors="replace"), SHELL_OUTPUT_LIMIT),
    })


# Tools bound to one run (its session, its app's network allow-list) are copies of one template per name: every
# run's closure has the same signature, so the schema derived from the first one (about a millisecond) is reused
# with this run's coroutine.
_per_run_templates: dict[str, BaseTool] = {}


def per_run_tool(coroutine, *, description: str | None = None) -> BaseTool:
    template = _per_run_templates.get(coroutine.__name__)
    if template is None:  # two first runs at once would both build it: harmless, the result is the same
        template = _per_run_templates[coroutine.__name__] = StructuredTool.from_function(
            coroutine=coroutine, name=coroutine.__name__, description=description)
    return template.model_copy(update={"coroutine": coroutine})


@lru_cache(maxsize=1)
def run_free_tools() -> tuple[BaseTool, ...]:
    """The built-in tools bound to no run. Built once per process: deriving a tool's schema from its signature costs
    about a millisecond per tool."""
    return tuple(
        StructuredTool.from_function(coroutine=fn, name=fn.__name__)
        for fn in (current_time, dns_lookup, system_status, run_shell)
    )
