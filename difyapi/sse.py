"""Server-sent event framing of the Dify stream: `data: <compact raw-UTF-8 JSON>\\n\\n` blocks and `event: ping`."""
from __future__ import annotations

from typing import Any

from difyapi.encoding import dify_json

PING = b"event: ping\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"x-content-type-options", b"nosniff"),  # served by a Channels consumer, outside Django's SecurityMiddleware
]


def encode_event(payload: dict[str, Any]) -> bytes:
    """One SSE block. orjson escapes newlines inside strings, so the JSON is always a single line."""
    return b"data: " + dify_json(payload) + b"\n\n"
