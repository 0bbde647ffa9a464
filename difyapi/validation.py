"""Request parsing for /v1: JSON bodies, `user`, UUIDs, limits, choices, failing with Dify's errors (SPEC §1, §11)."""
from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from difyapi.errors import INVALID_JSON, UNSUPPORTED_MEDIA_TYPE, invalid_param
from opsagent.common.client_input import ClientInputError, json_loads, text_problem

# Dify's shared end user for requests that may omit `user` (GET /messages, /conversations, /files/upload).
DEFAULT_USER = "DEFAULT-USER"
USER_REQUIRED_MESSAGE = "Arg user must be provided."
# The EndUser column's width.
USER_MAX_LENGTH = 255


def is_json_content_type(content_type: str | None) -> bool:
    """True for `application/json` and `application/*+json` (Werkzeug's `is_json`), parameters ignored."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def parse_json_body(body: bytes, content_type: str | None, *, strip_nul: Collection[str] = ()) -> dict[str, Any]:
    """The JSON object of a request body: 415 `unsupported_media_type` without a JSON content type, 400 `bad_request`
    for an empty, unparseable or non-object body (what Flask's `request.get_json()` gives Dify), 400 `invalid_param`
    naming the field for nesting deeper than JSON_MAX_DEPTH or text PostgreSQL cannot store (NUL characters, except
    in the top-level fields of `strip_nul`, where they are removed; lone surrogates)."""
    if not is_json_content_type(content_type):
        raise UNSUPPORTED_MEDIA_TYPE
    if not body or not body.strip():
        raise INVALID_JSON
    try:
        data = json_loads(body, strip_nul=strip_nul)
    except ClientInputError as exc:
        raise invalid_param(exc.message) from None
    except ValueError:
        raise INVALID_JSON from None
    if not isinstance(data, dict):
        raise INVALID_JSON
    return data


def request_json(request) -> dict[str, Any]:
    """`parse_json_body` for a Django HttpRequest."""
    return parse_json_body(request.body, request.META.get("CONTENT_TYPE"))


def user_from(value: Any) -> str:
    """The required `user` (body or query): a number is cast with str(); missing or blank -> 400 invalid_param."""
    if isinstance(value, bool) or value is None:
        raise invalid_param(USER_REQUIRED_MESSAGE)
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise invalid_param(USER_REQUIRED_MESSAGE)
    if len(value) > USER_MAX_LENGTH:
        raise invalid_param(f"user must be at most {USER_MAX_LENGTH} characters.")
    return text_from(value, field="user")


def text_from(value: str, *, field: str) -> str:
    """`value` when it can be stored as text (form fields and file names do not pass the JSON checks); else 400."""
    problem = text_problem(value)
    if problem is not None:
        raise invalid_param(f"{field} {problem}")
    return value


def optional_user_from(value: Any) -> str:
    """`user` where Dify falls back to the shared DEFAULT-USER when it is omitted."""
    if value is None or value == "":
        return DEFAULT_USER
    return user_from(value)


def uuid_from(value: Any, *, field: str, required: bool = False) -> uuid.UUID | None:
    """A UUID parameter: None/"" -> None (or 400 `<field> is required` when required); not a UUID -> 400."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise invalid_param(f"{field} is required")
        return None
    if not isinstance(value, str):
        raise invalid_param(f"{field} must be a valid UUID")
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise invalid_param(f"{field} must be a valid UUID") from None


def int_from(value: Any, *, field: str, default: int, minimum: int, maximum: int | None = None) -> int:
    """An integer parameter in [minimum, maximum]; never clamped (Dify answers 400 for out-of-range values)."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise invalid_param(f"{field} must be an integer")
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        number = None
    if number is None:
        raise invalid_param(f"{field} must be an integer")
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"within the range {minimum} - {maximum}" if maximum is not None else f"at least {minimum}"
        raise invalid_param(f"Invalid argument {field}: {value}. argument must be {bound}")
    return number


def limit_from(value: Any, *, default: int = 20, maximum: int = 100) -> int:
    """The `limit` of a paginated list: 1..100 (default 20) unless told otherwise."""
    return int_from(value, field="limit", default=default, minimum=1, maximum=maximum)


def bool_from(value: Any, *, field: str, default: bool) -> bool:
    """A boolean from JSON (true/false) or a query string (true/false/1/0)."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "1", "yes"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"false", "0", "no"}:
        return False
    raise invalid_param(f"{field} must be a boolean")


def choice_from(value: Any, *, field: str, choices: Iterable[str], default: str | None = None) -> str | None:
    """One of `choices` (None/"" -> default); anything else -> 400 naming the field and the choices."""
    if value is None or value == "":
        return default
    allowed = list(choices)
    if value not in allowed:
        raise invalid_param(f"{field} must be one of the following: {allowed}")
    return value


def str_from(value: Any, *, field: str, default: str = "", max_length: int | None = None) -> str:
    """An optional string field; non-strings -> 400 `<field> must be a string`."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise invalid_param(f"{field} must be a string")
    if max_length is not None and len(value) > max_length:
        raise invalid_param(f"{field} must be at most {max_length} characters")
    return value


def query_dict(request) -> Mapping[str, str]:
    """The query string of a request as a plain mapping; a repeated key gives its first value, as Flask does."""
    return {key: request.GET.getlist(key)[0] for key in request.GET}
