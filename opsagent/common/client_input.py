"""What every value a client sends must be before any surface reads it: JSON no deeper than JSON_MAX_DEPTH, text
without NUL characters (PostgreSQL refuses them) or lone surrogates (they cannot be encoded as UTF-8), finite
numbers, and JSON objects within the size bounds a caller asks for. Each surface maps `ClientInputError` to its own
wire format."""
from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from django.conf import settings


class ClientInputError(ValueError):
    """A value outside the bounds; `message` names the offending field the way the client wrote it."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as text, or None when it can."""
    if "\x00" in value:
        return "must not contain NUL characters"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid Unicode text (it contains a lone surrogate)"
    return None


def json_loads(data: bytes | str, *, strip_nul: Collection[str] = ()) -> Any:
    """`json.loads` for a client's document, then `json_check` on it. Unparseable input raises ValueError as
    json.loads does (UnicodeDecodeError for bytes that are not UTF-8); input out of bounds raises ClientInputError,
    also for nesting so deep that the parser itself gives up."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise _too_deep() from None
    json_check(value, strip_nul=strip_nul)
    return value


def _too_deep() -> ClientInputError:
    return ClientInputError(f"JSON is nested too deeply (at most {settings.JSON_MAX_DEPTH} levels)")


def json_check(value: Any, *, strip_nul: Collection[str] = ()) -> None:
    """Walk a parsed JSON value without recursion: depth at most JSON_MAX_DEPTH, every key and string storable as
    text, every number finite. NUL characters are removed instead from the top-level string fields named in
    `strip_nul` (Dify strips them from `query`)."""
    if isinstance(value, dict):
        for name in strip_nul:
            if isinstance(value.get(name), str):
                value[name] = value[name].replace("\x00", "")
    max_depth = settings.JSON_MAX_DEPTH
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                raise ClientInputError(f"{path or 'value'} {problem}", field=_top(path))
        elif isinstance(item, float) and not math.isfinite(item):
            # NaN and Infinity (or 1e999) are not JSON: PostgreSQL's jsonb refuses them.
            raise ClientInputError(f"{path or 'value'} must be a finite number", field=_top(path))
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                raise _too_deep()
            if isinstance(item, list):
                stack.extend((child, f"{path}[{index}]", depth + 1) for index, child in enumerate(item))
                continue
            for key, child in item.items():
                problem = text_problem(key)
                if problem is not None:
                    raise ClientInputError(f"a key of {path or 'the body'} {problem}", field=_top(path))
                stack.append((child, _join(path, key), depth + 1))


@dataclass(frozen=True)
class ObjectBounds:
    """Size bounds for a client's free-form JSON object (e.g. a chat's `inputs`)."""

    max_bytes: int
    max_keys: int
    max_key_length: int
    max_string_length: int
    max_depth: int


def object_check(value: dict[str, Any], *, field: str, bounds: ObjectBounds) -> None:
    """ClientInputError naming `field` when `value` exceeds `bounds`: keys are counted at every level, depth counts
    `value` itself as 1, and the size is that of its compact JSON encoding in UTF-8."""
    keys = 0
    stack: list[tuple[Any, str, int]] = [(value, field, 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if len(item) > bounds.max_string_length:
                raise ClientInputError(f"{path} must be at most {bounds.max_string_length} characters", field=field)
        elif isinstance(item, dict | list):
            if depth > bounds.max_depth:
                raise ClientInputError(f"{field} must be nested at most {bounds.max_depth} levels deep", field=field)
            if isinstance(item, list):
                stack.extend((child, f"{path}[{index}]", depth + 1) for index, child in enumerate(item))
                continue
            keys += len(item)
            if keys > bounds.max_keys:
                raise ClientInputError(f"{field} may have at most {bounds.max_keys} keys", field=field)
            for key, child in item.items():
                if len(key) > bounds.max_key_length:
                    raise ClientInputError(
                        f"{field} keys must be at most {bounds.max_key_length} characters", field=field
                    )
                stack.append((child, _join(path, key), depth + 1))
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    if size > bounds.max_bytes:
        raise ClientInputError(f"{field} must be at most {bounds.max_bytes} bytes as JSON (got {size})", field=field)


def _join(path: str, key: str) -> str:
    shown = key if len(key) <= 40 and key.isprintable() else repr(key[:40])
    return f"{path}.{shown}" if path else shown


def _top(path: str) -> str | None:
    return path.split(".", 1)[0].split("[", 1)[0] or None
