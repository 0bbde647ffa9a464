"""Size limits on what clients send: each surface's request body limit and its 413 answer in that surface's format
(opsagent.common.surfaces), and the ASGI guards that enforce them (HTTP bodies, WebSocket messages) whatever server
runs the app."""
from __future__ import annotations

from typing import Any

from django.conf import settings

from opsagent.common.surfaces import Refusal, surface_for


def body_limit(path: str) -> int:
    """Bytes a request body to `path` may have: its surface's limit (REQUEST_BODY_MAX_BYTES unless the surface
    accepts uploads there)."""
    return surface_for(path).body_limit(path)


def too_large(path: str, limit: int) -> Refusal:
    """The 413 for a body over `limit`, in the format of the surface `path` belongs to."""
    return surface_for(path).too_large(path, limit)


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _send_too_large(send, path: str, limit: int) -> None:
    refusal = too_large(path, limit)
    headers = [*refusal.raw_headers(), (b"content-length", str(len(refusal.body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": refusal.body})


class HttpBodyLimit:
    """Refuses a body over its path's limit with a 413: at once when Content-Length says so, or as soon as the
    bytes received pass it (chunked bodies); the app then sees a disconnect and buffers nothing more. Daphne
    buffers a whole body before the app sees it, so under daphne `opsagent.daphne_limits` applies the same limits while
    it reads; this guard keeps them under any other ASGI server."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = body_limit(path)
        length = declared_length(scope.get("headers", []))
        if length is not None and length > limit:
            await _send_too_large(send, path, limit)
            return None
        received = 0
        refused = False  # the 413 went out: whatever the app still sends is dropped
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received, refused
            if received > limit:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started:
                        refused = True
                        await _send_too_large(send, path, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if refused:
                return
            started = True
            await send(message)

        return await self.app(scope, counting_receive, guarded_send)


# RFC 6455: the endpoint received a message too big for it to process.
CLOSE_MESSAGE_TOO_BIG = 1009


def _message_size(message: dict[str, Any]) -> int:
    text = message.get("text")
    if text is not None:
        return len(text) if text.isascii() else len(text.encode())
    return len(message.get("bytes") or b"")


class WebSocketMessageLimit:
    """Closes a WebSocket with 1009 on a message over WEBSOCKET_MESSAGE_MAX_BYTES; the consumer sees a disconnect
    with that code instead of the message. Under daphne the same limit is daphne's own (opsagent.daphne_limits), so
    such a message never gets here."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        closed = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal closed
            message = await receive()
            if message["type"] == "websocket.receive" and _message_size(message) > settings.WEBSOCKET_MESSAGE_MAX_BYTES:
                closed = True
                await send({"type": "websocket.close", "code": CLOSE_MESSAGE_TOO_BIG})
                return {"type": "websocket.disconnect", "code": CLOSE_MESSAGE_TOO_BIG}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not closed:
                await send(message)

        return await self.app(scope, limited_receive, guarded_send)
