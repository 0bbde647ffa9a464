"""Text documents given by URL (Dify's `remote_url` files), fetched for the model when their run starts.

A client of the public API chooses the URL, so the server must not become its way into the private network
(server-side request forgery): every hop, redirects included, goes through agentcore.network's checks with the app's
network allow-list. Size and time are bounded.
"""
from __future__ import annotations

from urllib.parse import urljoin

import httpx

from agentcore.network import NetworkAllowList, NetworkRefused, checked_client, target_check

FETCH_TIMEOUT_SECONDS = 10.0
MAX_REDIRECTS = 3


class RemoteFileError(Exception):
    """Why a remote file was not fetched (safe to show: it names no secret, only the URL's host)."""


async def remote_file_fetch(url: str, *, max_bytes: int, allow: NetworkAllowList) -> bytes:
    """The body of `url` (http or https), at most `max_bytes`; RemoteFileError for anything else. `allow`: the
    app's network allow-list (which loopback and private targets it may reach)."""
    async with checked_client(timeout=FETCH_TIMEOUT_SECONDS) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                target = await target_check(url, allow=allow)
            except NetworkRefused as exc:
                raise RemoteFileError(str(exc)) from None
            try:
                async with target.stream_get(client, user_agent="OpsAgent") as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code >= 400:
                        raise RemoteFileError(f"{target.host} answered HTTP {response.status_code}")
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
                raise RemoteFileError(f"{target.host} did not answer within {FETCH_TIMEOUT_SECONDS:g} s") from None
            except httpx.HTTPError as exc:
                raise RemoteFileError(f"{target.host}: {type(exc).__name__}") from None
    raise RemoteFileError(f"more than {MAX_REDIRECTS} redirects")
