"""The wire shapes of the Dify Service API: conversations, messages, thoughts, usage, files and feedback as Dify sends
them (SPEC.md §2, §5-§9); their JSON encoding is difyapi.encoding."""
from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

from django.conf import settings
from django.http import HttpResponse
from django.utils.crypto import constant_time_compare, salted_hmac

from agentcore.models import AgentApp, Message, Session, Thought
from difyapi.encoding import dify_json
from difyapi.models import EndUser, Feedback, MessageFile, UploadFile
from difyapi.selectors import FileUpload
from llmconfigs.models import LLMConfig
from llmconfigs.pricing import PRICE_UNIT, Cost

NEW_CONVERSATION_NAME = "New conversation"


def dify_json_response(data: Any, *, status: int = 200) -> HttpResponse:
    return HttpResponse(dify_json(data), status=status, content_type="application/json")


def unix(value: datetime | None) -> int | None:
    """A timestamp as Dify sends it: integer unix seconds."""
    return int(value.timestamp()) if value is not None else None


def iso(value: datetime) -> str:
    """A timestamp where Dify sends ISO-8601 (the feedback list): UTC, seconds, `Z`."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def price(value: Decimal | int | float | None) -> str:
    """A price as a plain decimal string ("0.0010330", never "1E-7")."""
    return format(Decimal(value) if value is not None else Decimal(0), "f")


# ----- usage -----

def usage_to_dify(
    *,
    prompt_tokens: int,
    completion_tokens: int,
    cost: Cost | None = None,
    latency: float | None = None,
    time_to_first_token: float | None = None,
    time_to_generate: float | None = None,
) -> dict[str, Any]:
    """`metadata.usage` of a blocking answer / `message_end`: every key of SPEC.md §2, prices as strings."""
    zero = Decimal(0)
    return {
        "prompt_tokens": prompt_tokens,
        "prompt_unit_price": price(cost.prompt_unit_price if cost else zero),
        "prompt_price_unit": price(cost.price_unit if cost else PRICE_UNIT),
        "prompt_price": price(cost.prompt_price if cost else zero),
        "completion_tokens": completion_tokens,
        "completion_unit_price": price(cost.completion_unit_price if cost else zero),
        "completion_price_unit": price(cost.price_unit if cost else PRICE_UNIT),
        "completion_price": price(cost.completion_price if cost else zero),
        "total_tokens": prompt_tokens + completion_tokens,
        "total_price": price(cost.total_price if cost else zero),
        "currency": (cost.currency if cost else None) or "USD",
        "latency": latency if latency is not None else 0.0,
        "time_to_first_token": time_to_first_token,
        "time_to_generate": time_to_generate,
    }


def message_metadata(usage: dict[str, Any]) -> dict[str, Any]:
    """`metadata` of a blocking answer / `message_end` (OpsAgent always sends all three keys)."""
    return {"usage": usage, "retriever_resources": [], "annotation_reply": None}


# ----- conversations -----

def conversation_to_dify(session: Session) -> dict[str, Any]:
    """Dify's SimpleConversation (list items, rename answer)."""
    return {
        "id": str(session.id),
        "name": session.name or NEW_CONVERSATION_NAME,
        "inputs": session.inputs or {},
        "status": "normal",
        "introduction": session.app.opening_statement or "",
        "created_at": unix(session.created_at),
        "updated_at": unix(session.updated_at),
    }


# ----- end users -----

def end_user_to_dify(end_user: EndUser, *, default_user: str) -> dict[str, Any]:
    """GET /v1/end-users/{id}: Dify's EndUserDetail. OpsAgent has no tenants: `tenant_id` is the app's id, as in the
    upload answer. An end user never changes after it is created, so `updated_at` is its creation time."""
    return {
        "id": str(end_user.id),
        "tenant_id": str(end_user.app_id),
        "app_id": str(end_user.app_id),
        "type": end_user.type,
        "external_user_id": end_user.session_id,
        "name": None,
        "is_anonymous": end_user.session_id == default_user,
        "session_id": end_user.session_id,
        "created_at": iso(end_user.created_at),
        "updated_at": iso(end_user.created_at),
    }


# ----- files -----

# Signed file URLs, as Dify signs them (`?timestamp=&nonce=&sign=`): fetchable without the app key for a while.
FILE_URL_TTL = 300


# The salt names the purpose, so that no other HMAC made from SECRET_KEY can pass for a file signature.
FILE_URL_SALT = "difyapi.file-preview"


def _file_signature(file_id: str, timestamp: str, nonce: str) -> str:
    return salted_hmac(FILE_URL_SALT, f"{file_id}|{timestamp}|{nonce}", algorithm="sha256").hexdigest()


def file_signed_url(upload: UploadFile, *, base_url: str = "") -> str:
    """A time-limited URL of the file's bytes (GET /v1/files/<id>/file-preview); `base_url` makes it absolute."""
    timestamp, nonce = str(int(time.time())), secrets.token_hex(8)
    sign = _file_signature(str(upload.id), timestamp, nonce)
    return f"{base_url}/v1/files/{upload.id}/file-preview?timestamp={timestamp}&nonce={nonce}&sign={sign}"


def file_signature_valid(*, file_id: str, timestamp: str, nonce: str, sign: str) -> bool:
    # Unix seconds: a few ASCII digits (str.isdigit also takes "²", and int() refuses thousands of digits).
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 20 and nonce and sign):
        return False
    if time.time() - int(timestamp) > FILE_URL_TTL:
        return False
    return constant_time_compare(sign, _file_signature(file_id, timestamp, nonce))


def upload_file_to_dify(upload: UploadFile, *, base_url: str = "") -> dict[str, Any]:
    """The 201 answer of POST /v1/files/upload (Dify 1.x key set)."""
    return {
        "id": str(upload.id),
        "name": upload.name,
        "size": upload.size,
        "extension": upload.extension,
        "mime_type": upload.mime_type,
        "created_by": str(upload.end_user_id),
        "created_at": unix(upload.created_at),
        "preview_url": None,
        "source_url": file_signed_url(upload, base_url=base_url),
        "original_url": None,
        "user_id": None,
        "tenant_id": str(upload.app_id),
        "conversation_id": None,
        "file_key": None,
    }


def message_file_to_dify(message_file: MessageFile, *, base_url: str = "") -> dict[str, Any]:
    """An item of `message_files` in GET /v1/messages."""
    upload = message_file.upload_file
    if upload is not None:
        url, filename = file_signed_url(upload, base_url=base_url), upload.name
        mime_type, size = upload.mime_type, upload.size
    else:
        url = message_file.url
        filename = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] if url else ""
        mime_type, size = None, -1
    return {
        "id": str(message_file.id),
        "filename": filename,
        "type": message_file.type,
        "url": url,
        "mime_type": mime_type,
        "size": size,
        "transfer_method": message_file.transfer_method,
        "belongs_to": message_file.belongs_to,
        "upload_file_id": str(message_file.upload_file_id) if message_file.upload_file_id else None,
    }


# ----- thoughts -----

class ToolStep(Protocol):
    """What the thought presenters read: a saved Thought row, or a run's ThoughtUpdate event as it streams (no model
    instance is built per event)."""

    tool: str
    tool_input: dict[str, Any]
    observation: str


def thought_tool_input(thought: ToolStep) -> str:
    """Dify's `tool_input`: a JSON string `{"<tool>": {args}}`, "" when the iteration called no tool. A string inside
    the body, not the body's encoding: spaced like Python's json.dumps, as Dify's own server writes it."""
    if not thought.tool:
        return ""
    return json.dumps({thought.tool: thought.tool_input or {}}, ensure_ascii=False)


def thought_observation(thought: ToolStep) -> str:
    """Dify's `observation`: a JSON string `{"<tool>": "<result>"}`, "" before the tool answered."""
    if not thought.tool or not thought.observation:
        return thought.observation or ""
    return json.dumps({thought.tool: thought.observation}, ensure_ascii=False)


def thought_tool_labels(thought: ToolStep) -> dict[str, Any]:
    if not thought.tool:
        return {}
    return {thought.tool: {"en_US": thought.tool, "zh_Hans": thought.tool}}


def thought_to_dify(thought: Thought) -> dict[str, Any]:
    """An item of `agent_thoughts` in GET /v1/messages (current key `files`)."""
    return {
        "id": str(thought.id),
        "chain_id": None,
        "message_id": str(thought.message_id),
        "position": thought.position,
        "thought": thought.thought,
        "tool": thought.tool,
        "tool_labels": thought_tool_labels(thought),
        "tool_input": thought_tool_input(thought),
        "created_at": unix(thought.created_at),
        "observation": thought_observation(thought),
        "files": [str(file_id) for file_id in (thought.files or [])],
    }


# ----- messages -----

def message_status(message: Message) -> str:
    """Dify knows only "normal" and "error"; a stopped or paused turn is a normal one with a partial answer."""
    return "error" if message.status == Message.Status.ERROR else "normal"


def message_to_dify(
    message: Message,
    *,
    feedback: Feedback | None = None,
    message_files: Iterable[MessageFile] | None = None,
    thoughts: Iterable[Thought] | None = None,
    base_url: str = "",
) -> dict[str, Any]:
    """An item of GET /v1/messages. Related rows may be passed in (prefetched); by default they are read from the
    message's prefetch cache or the database. `feedback` is the requesting end user's own feedback only;
    `base_url` makes file URLs absolute."""
    if message_files is None:
        message_files = message.message_files.all()
    if thoughts is None:
        thoughts = message.thoughts.all()
    return {
        "id": str(message.id),
        "conversation_id": str(message.session_id),
        "parent_message_id": None,
        "inputs": message.inputs or {},
        "query": message.query,
        "answer": message.answer,
        "message_files": [message_file_to_dify(f, base_url=base_url) for f in message_files],
        "feedback": {"rating": feedback.rating} if feedback is not None else None,
        "retriever_resources": [],
        "agent_thoughts": [thought_to_dify(t) for t in thoughts],
        "created_at": unix(message.created_at),
        "status": message_status(message),
        "error": (message.error or None) if message.status == Message.Status.ERROR else None,
    }


# ----- feedback -----

def feedback_to_dify(feedback: Feedback) -> dict[str, Any]:
    """An item of GET /v1/app/feedbacks (ISO-8601 timestamps, as Dify sends them there)."""
    return {
        "id": str(feedback.id),
        "app_id": str(feedback.app_id),
        "conversation_id": str(feedback.session_id),
        "message_id": str(feedback.message_id),
        "rating": feedback.rating,
        "content": feedback.content or None,
        "from_source": feedback.from_source,
        "from_end_user_id": str(feedback.end_user_id) if feedback.end_user_id else None,
        "from_account_id": str(feedback.account_id) if feedback.account_id else None,
        "created_at": iso(feedback.created_at),
        "updated_at": iso(feedback.updated_at),
    }


# ----- app metadata -----

TOOL_ICON = {"background": "#252525", "content": "🛠️"}


def app_info_to_dify(app: AgentApp) -> dict[str, Any]:
    return {"name": app.name, "description": app.description, "tags": [], "mode": app.mode, "author_name": "OpsAgent"}


def app_file_upload_to_dify(app: AgentApp, upload: FileUpload) -> dict[str, Any]:
    """The app's file upload settings as configured, with whether uploads are on and how many files a message may
    carry as chat-messages applies them (`upload`, from selectors.app_file_upload) in both of Dify's shapes."""
    configured = dict(app.file_upload) if isinstance(app.file_upload, dict) else {}
    image = {"detail": "high", "transfer_methods": ["remote_url", "local_file"]}
    if isinstance(configured.get("image"), dict):
        image.update(configured["image"])
    image.update(enabled=upload.enabled, number_limits=upload.number_limits)
    configured["image"] = image
    if "enabled" in configured or "number_limits" in configured:
        configured.update(enabled=upload.enabled, number_limits=upload.number_limits)
    return configured


def app_parameters_to_dify(app: AgentApp, *, upload: FileUpload) -> dict[str, Any]:
    """GET /v1/parameters (SPEC.md §9): features OpsAgent does not have are reported as disabled."""
    return {
        "opening_statement": app.opening_statement or None,
        "suggested_questions": [str(q) for q in (app.suggested_questions or [])],
        "suggested_questions_after_answer": {"enabled": bool(app.suggested_questions_after_answer)},
        "speech_to_text": {"enabled": False},
        "text_to_speech": {"enabled": False, "voice": "", "language": "", "autoPlay": "disabled"},
        "retriever_resource": {"enabled": False},
        "annotation_reply": {"enabled": False},
        "more_like_this": {"enabled": False},
        "user_input_form": list(app.user_input_form or []),
        "sensitive_word_avoidance": {"enabled": False, "type": "", "configs": []},
        "file_upload": app_file_upload_to_dify(app, upload),
        "system_parameters": {
            "image_file_size_limit": settings.UPLOAD_IMAGE_FILE_SIZE_LIMIT_MB,
            "video_file_size_limit": settings.UPLOAD_VIDEO_FILE_SIZE_LIMIT_MB,
            "audio_file_size_limit": settings.UPLOAD_AUDIO_FILE_SIZE_LIMIT_MB,
            "file_size_limit": settings.UPLOAD_FILE_SIZE_LIMIT_MB,
            "workflow_file_upload_limit": settings.WORKFLOW_FILE_UPLOAD_LIMIT,
        },
    }


def app_meta_to_dify(tool_names: Iterable[str]) -> dict[str, Any]:
    return {"tool_icons": {name: dict(TOOL_ICON) for name in tool_names}}


def app_site_to_dify(app: AgentApp) -> dict[str, Any]:
    """GET /v1/site: OpsAgent has no WebApp, so these are the settings a default Dify site would have."""
    return {
        "title": app.name,
        "chat_color_theme": None,
        "chat_color_theme_inverted": False,
        "icon_type": "emoji",
        "icon": "🤖",
        "icon_background": "#FFEAD5",
        "icon_url": None,
        "description": app.description,
        "copyright": None,
        "privacy_policy": None,
        "input_placeholder": None,
        "custom_disclaimer": "",
        "default_language": "en-US",
        "show_workflow_steps": False,
        "use_icon_as_answer_icon": False,
    }


def model_to_dify(config: LLMConfig, is_default: bool) -> dict[str, Any]:
    """An item of the GET /v1/models extension (never the key or its mask), also an item of OpenAI's model list:
    `id` is what a client sends as `model` to /v1/chat/completions (the config's pool, this config first)."""
    return {
        "id": str(config.id),
        "name": config.name,
        "provider": config.provider,
        "model_name": config.model_name,
        "route": config.route_name,
        "is_default": is_default,
        "object": "model",
        "created": int(config.created_at.timestamp()),
        "owned_by": config.provider,
    }
