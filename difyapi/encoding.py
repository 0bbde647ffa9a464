"""The one JSON encoding of difyapi: every /v1 body, error envelope and SSE event is compact, raw-UTF-8 JSON
(Dify's orjson style: no spaces, no \\uXXXX escapes) with Decimals as plain decimal strings."""
from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dify_json(data: Any) -> bytes:
    return orjson.dumps(data, default=_default)
