"""What POST /v1/chat/completions accepts: the model, the messages and the parameters passed to the provider as they
are, each checked for its type and bounds (ranges per provider are checked per pool member: llmconfigs.completions).
A field OpenAI defines that OpsAgent cannot honour, or a field no one defines, is refused naming it: never dropped."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from difyapi.openai.errors import invalid_request
from difyapi.validation import is_json_content_type
from opsagent.common.client_input import ClientInputError, json_loads

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Sent to the provider as the client wrote them (their meaning is the provider's; their size is bounded by the body).
PASSED = {
    "stop": (str, list), "tools": (list,), "tool_choice": (str, dict), "parallel_tool_calls": (bool,),
    "response_format": (dict,), "seed": (int,), "user": (str,), "logit_bias": (dict,), "logprobs": (bool,),
    "top_logprobs": (int,), "reasoning_effort": (str,), "functions": (list,), "function_call": (str, dict),
    "metadata": (dict,), "temperature": (int, float), "top_p": (int, float), "frequency_penalty": (int, float),
    "presence_penalty": (int, float), "max_tokens": (int,), "max_completion_tokens": (int,),
}
# Read by OpsAgent itself.
OWN = frozenset({"model", "messages", "stream", "stream_options", "n"})
USER_MAX_LENGTH = 255
# The longest route, config name or model name a config can have (difyapi.chat's bound), or `app:` and an app name.
MODEL_MAX_LENGTH = 210


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    # What the provider is sent besides the model and the stream flags: the messages and the PASSED fields.
    body: dict[str, Any] = field(default_factory=dict)


def completion_request_parse(raw: bytes, content_type: str | None) -> CompletionRequest:
    """The request in `raw`, or the OpenAIError (400, naming the parameter) that refuses it."""
    if not is_json_content_type(content_type):
        raise invalid_request("The request's Content-Type must be application/json.")
    try:
        payload = json_loads(raw)
    except ClientInputError as exc:
        raise invalid_request(exc.message, param=exc.field) from None
    except ValueError:
        raise invalid_request("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise invalid_request("The request body must be a JSON object.")
    unknown = sorted(set(payload) - OWN - set(PASSED))
    if unknown:
        raise invalid_request(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    model = payload.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid_request("you must provide a model parameter", param="model")
    if len(model) > MODEL_MAX_LENGTH:  # before any lookup: a name no config or app can have is not looked up
        raise invalid_request(f"model is longer than {MODEL_MAX_LENGTH} characters.", param="model")
    messages = _messages(payload.get("messages"))
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid_request("stream must be a boolean.", param="stream")
    options = payload.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                                  param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid_request("stream_options may only hold include_usage.", param="stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise invalid_request("stream_options.include_usage must be a boolean.",
                                  param="stream_options.include_usage")
    if payload.get("n") not in (None, 1) or isinstance(payload.get("n"), bool):
        raise invalid_request("Only n=1 is supported.", param="n")
    body: dict[str, Any] = {"messages": messages}
    for name, kinds in PASSED.items():
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise invalid_request(f"{name} has the wrong type.", param=name)
        body[name] = value
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise invalid_request("Give max_tokens or max_completion_tokens, not both.", param="max_tokens")
    if len(body.get("user", "")) > USER_MAX_LENGTH:
        raise invalid_request(f"user must be at most {USER_MAX_LENGTH} characters.", param="user")
    return CompletionRequest(model=model.strip(), messages=messages, stream=stream, include_usage=include_usage,
                             body=body)


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid_request("messages must be a non-empty array.", param="messages")
    if len(value) > settings.OPENAI_MESSAGES_MAX:
        raise invalid_request(f"At most {settings.OPENAI_MESSAGES_MAX} messages.", param="messages")
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid_request(f"{where} must be an object.", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise invalid_request(f"{where}.role must be one of: {', '.join(sorted(ROLES))}.", param=f"{where}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid_request(f"{where}.content must be a string or an array of parts.",
                                  param=f"{where}.content")
        if content is None and role != "assistant":
            raise invalid_request(f"{where}.content is required for role {role}.", param=f"{where}.content")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise invalid_request(f"{where}.tool_call_id is required for role tool.", param=f"{where}.tool_call_id")
    return value


def message_text(message: dict[str, Any]) -> str:
    """The text of a message's content (its text parts, for an array)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content
                       if isinstance(part, dict) and part.get("type") == "text")
    return ""
