"""Text documents given by URL (Dify's `remote_url` files), fetched for the model when their run starts.

A client of the public API chooses the URL, so the server must not become its way into the private network
(server-side request forgery): only globally routable addresses are fetched unless REMOTE_FILES_ALLOW_PRIVATE is set,
every address a name resolves to is checked, the connection goes to the address that was checked (a second DNS
answer cannot swap it), and each redirect is checked again. Size and time are bounded.
"""
from __future__ import annotations

from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
from django.conf import settings

from agentcore.tools.builtin import ip_of, resolve

FETCH_TIMEOUT_SECONDS = 10.0
MAX_REDIRECTS = 3


class RemoteFileError(Exception):
    """Why a remote file was not fetched (safe to show: it names no secret, only the URL's host)."""


def remote_address_refusal(address: str) -> str | None:
    """Why the server may not connect to `address` for a remote file, or None."""
    if settings.REMOTE_FILES_ALLOW_PRIVATE:
        return None
    ip = ip_of(address)
    if not ip.is_global or ip.is_multicast:
        return "not a public address"
    return None


async def _checked_address(host: str, port: int) -> str:
    try:
        addresses = await resolve(host, port)
    except OSError:
        raise RemoteFileError(f"cannot resolve {host}") from None
    for address in addresses:  # all of them: one public and one private answer is refused
        reason = remote_address_refusal(address)
        if reason:
            raise RemoteFileError(f"refused: {host} resolves to {address}, {reason}")
    return addresses[0]


async def remote_file_fetch(url: str, *, max_bytes: int) -> bytes:
    """The body of `url` (http or https), at most `max_bytes`; RemoteFileError for anything else."""
    async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise RemoteFileError("only http and https URLs with a host can be fetched")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = await _checked_address(parts.hostname, port)
            pinned = urlunsplit((parts.scheme, f"[{address}]:{port}" if ":" in address else f"{address}:{port}",
                                 parts.path or "/", parts.query, ""))
            host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
            extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
            try:
                async with client.stream("GET", pinned, headers={"Host": host_header, "User-Agent": "OpsAgent"},
                                         extensions=extensions) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code >= 400:
                        raise RemoteFileError(f"{parts.hostname} answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise RemoteFileError(f"larger than {max_bytes} bytes")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise RemoteFileError(f"larger than {max_bytes} bytes")
                    return bytes(body)
            except httpx.TimeoutException:
                raise RemoteFileError(f"{parts.hostname} did not answer within {FETCH_TIMEOUT_SECONDS:g} s") from None
            except httpx.HTTPError as exc:
                raise RemoteFileError(f"{parts.hostname}: {type(exc).__name__}") from None
    raise RemoteFileError(f"more than {MAX_REDIRECTS} redirects")
