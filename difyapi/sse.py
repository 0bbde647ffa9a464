"""Server-sent event framing of the Dify stream: `data: <compact raw-UTF-8 JSON>\\n\\n` blocks and `event: ping`."""
from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson

PING = b"event: ping\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"x-content-type-options", b"nosniff"),  # served by a Channels consumer, outside Django's SecurityMiddleware
]


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_bytes(payload: Any) -> bytes:
    """Compact JSON with raw UTF-8 (orjson: no spaces, no \\uXXXX escapes); Decimals as plain decimal strings."""
    return orjson.dumps(payload, default=_default)


def encode_event(payload: dict[str, Any]) -> bytes:
    """One SSE block. orjson escapes newlines inside strings, so the JSON is always a single line."""
    return b"data: " + json_bytes(payload) + b"\n\n"
