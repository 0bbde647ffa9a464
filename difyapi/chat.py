"""POST /v1/chat-messages, the request side: the Dify body validated into the turn it asks for (TurnRequest), files
into attachments and MessageFile rows, and engine errors raised before the run into Dify's envelope. What the run
then yields becomes Dify's events in difyapi.events."""
from __future__ import annotations

import base64
import logging
import math
import mimetypes
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import close_old_connections

from agentcore.errors import (
    ApprovalAlreadyDecided,
    ApprovalForbidden,
    ApprovalNotFound,
    AppUnavailable,
    SessionNotFound,
    TooManyActiveRuns,
)
from agentcore.generation import session_generate_name
from agentcore.limits import Counted, Meter, OverLimit, usage_uncount
from agentcore.models import AgentApp, Session
from agentcore.runs import ApprovalDecision, Attachment, TurnOverrides, TurnRequest, turn_admit
from agentcore.selectors import app_pool_resolve
from agentcore.services import inputs_check
from difyapi.errors import (
    APP_UNAVAILABLE,
    INTERNAL,
    NOT_CHAT_APP,
    DifyError,
    forbidden,
    invalid_param,
    not_found,
    over_limit,
    unexpected_error,
)
from difyapi.models import MessageFile, UploadFile
from difyapi.selectors import app_file_upload, conversation_get
from difyapi.services import end_user_get_or_create
from difyapi.validation import bool_from, choice_from, user_from, uuid_from
from llmconfigs.errors import NoUsableConfig
from llmconfigs.models import LLMConfig
from llmconfigs.providers import provider_spec
from opsagent.common.errors import ServiceError

logger = logging.getLogger(__name__)

STREAMING = "streaming"
BLOCKING = "blocking"
MODEL_FIELDS = ("model_config_id", "model", "temperature", "max_tokens", "top_p")
# The longest name, route or model name a config can have (LLMConfig's columns): a longer `model` names nothing.
MODEL_MAX_LENGTH = 200
FILE_TYPES = ("image", "document", "audio", "video", "custom")
TRANSFER_METHODS = ("remote_url", "local_file")
TEXT_EXTENSIONS = frozenset({"txt", "md", "markdown", "csv", "json", "log", "yaml", "yml"})
# A text document is given to the model whole up to this many characters, then cut (with a note saying so).
TEXT_ATTACHMENT_CHARS = 100_000
PROVIDER_NOT_INITIALIZE = "provider_not_initialize"
# Dify strips NUL characters from the query (SPEC §2); in any other field they are refused.
CHAT_NUL_STRIPPED = ("query",)


# ----- the request -----

@dataclass(frozen=True)
class FileRef:
    """A file sent with the message, validated; recorded as a MessageFile once the message exists."""

    type: str
    transfer_method: str
    url: str = ""
    upload: UploadFile | None = None


@dataclass(frozen=True)
class ChatCall:
    """A validated POST /v1/chat-messages or /v1/completion-messages."""

    request: TurnRequest
    streaming: bool
    auto_generate_name: bool
    files: tuple[FileRef, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class _Body:
    """A body that passed the schema: each field of the right type (Dify's pydantic payload models)."""

    inputs: dict[str, Any]
    query: str
    files: list[dict[str, Any]] | None
    streaming: bool
    conversation_id: uuid.UUID | None
    auto_generate_name: bool
    approval: ApprovalDecision | None
    overrides: TurnOverrides


def chat_call_build(*, app: AgentApp, payload: dict[str, Any], audit: dict | None = None,
                    meter: Meter | None = None, completion: bool = False) -> ChatCall:
    """Validate a POST /v1/chat-messages body (or, with `completion`, a POST /v1/completion-messages one) and build
    the turn it asks for, checking in Dify's order (SPEC.md §2), so that a request wrong in two ways gets Dify's
    error: `user`, the app's mode, the body's schema, the limits (rate limits and budgets, then the concurrency
    limit: the request is counted here), blocking mode, an empty query, the conversation, the files, the model, the
    inputs.

    Sync (reads the conversation, upload files and the conversation's config): call it off the event loop.
    `audit` (source, ip_address, user_agent) goes with an approval decision, for its audit row."""
    user = user_from(payload.get("user"))
    app_mode_check(app, completion=completion)
    body = _body(payload, completion=completion, audit=audit or {})
    counted = turn_admit(app=app, meter=meter, resume=body.approval is not None)
    try:
        return _chat_call(app=app, user=user, body=body, meter=meter, completion=completion, counted=counted)
    except Exception:
        usage_uncount(counted)  # refused after all: a refused request does not use the quota
        raise


def _chat_call(*, app: AgentApp, user: str, body: _Body, meter: Meter | None, completion: bool,
               counted: Counted) -> ChatCall:
    """The rest of chat_call_build, once the request is admitted."""
    if app.mode == AgentApp.Mode.AGENT_CHAT and not body.streaming:
        raise invalid_param("Agent Chat App does not support blocking mode")
    if not completion and body.approval is None and not body.query.strip():
        raise invalid_param("query is required")
    session = None
    if body.conversation_id is not None:
        session = conversation_get(app=app, user=user, conversation_id=body.conversation_id)
    files = _files(app=app, user=user, items=body.files)
    attachments: tuple[Attachment, ...] = ()  # a resumed run goes on with what it was given
    if body.approval is None:
        # The model that will answer first: Dify finds a model without credentials after the files, before the
        # inputs. (The turn's rows are written with the pool resolved again, in their transaction.)
        pool = app_pool_resolve(app=app, config_id=body.overrides.config_id, model=body.overrides.model,
                                session_config_id=session.llm_config_id if session is not None else None)
        attachments = _attachments(files=files, config=pool[0])
    user_inputs = {k: v for k, v in body.inputs.items() if k not in MODEL_FIELDS}
    if body.conversation_id is None:  # a conversation goes on with the inputs it started with
        user_inputs = inputs_validate(form=app.user_input_form or [], inputs=user_inputs)
    request = TurnRequest(
        app=app,
        query=body.query,
        session_id=str(body.conversation_id) if body.conversation_id else None,
        end_user=user,
        source=Session.Source.API,
        inputs=user_inputs,
        overrides=body.overrides,
        attachments=attachments,
        approval=body.approval,
        meter=meter,
        admitted=True,
        counted=counted,
    )
    return ChatCall(request=request, streaming=body.streaming, auto_generate_name=body.auto_generate_name,
                    files=files)


def _body(payload: dict[str, Any], *, completion: bool, audit: dict) -> _Body:
    """The body's schema, field by field in the order of Dify's payload models (ChatRequestPayload,
    CompletionRequestPayload), whose validation error lists the first wrong field first; then OpsAgent's extension
    fields. A completion body has no conversation: `conversation_id` and `auto_generate_name` are ignored there."""
    inputs = payload.get("inputs")
    if not isinstance(inputs, dict):
        raise invalid_param("inputs is required" if inputs is None else "inputs must be an object")
    inputs_check(inputs)  # the size bounds of what the client sent, before the form keeps its variables
    if completion:
        query = payload.get("query", "")  # Dify: optional, "" by default, but never null
        if not isinstance(query, str):
            raise invalid_param("query must be a string")
    else:
        query = _query(payload.get("query"), required=payload.get("approval") is None)
    files = payload.get("files")
    if files is not None:
        if not isinstance(files, list):
            raise invalid_param("files must be a list")
        for index, item in enumerate(files):
            if not isinstance(item, dict):
                raise invalid_param(f"files[{index}] must be an object")
    response_mode = choice_from(payload.get("response_mode"), field="response_mode", choices=(STREAMING, BLOCKING),
                                default=BLOCKING)
    conversation_id, auto_generate_name, approval = None, False, None
    if not completion:
        conversation_id = uuid_from(payload.get("conversation_id"), field="conversation_id")
        auto_generate_name = bool_from(payload.get("auto_generate_name"), field="auto_generate_name", default=True)
        approval = _approval(payload.get("approval"), audit=audit)
    return _Body(inputs=inputs, query=query, files=files, streaming=response_mode == STREAMING,
                 conversation_id=conversation_id, auto_generate_name=auto_generate_name, approval=approval,
                 overrides=_overrides(payload, inputs))


def app_mode_check(app: AgentApp, *, completion: bool = False) -> None:
    """The route fits the app, with Dify's errors: a chat route (chat-messages, conversations, history) on a
    completion app is `not_chat_app`; completion-messages on a chat app is `app_unavailable`."""
    if completion:
        if app.mode != AgentApp.Mode.COMPLETION:
            raise APP_UNAVAILABLE
    elif app.mode == AgentApp.Mode.COMPLETION:
        raise NOT_CHAT_APP


def _query(value: Any, *, required: bool) -> str:
    """The schema's part: present (unless an approval stands in for it) and a string. An empty one passes here, as in
    Dify, and is refused after the limits."""
    if value is None:
        if required:
            raise invalid_param("query is required")
        return ""
    if not isinstance(value, str):
        raise invalid_param("query must be a string")
    return value


def _approval(value: Any, *, audit: dict) -> ApprovalDecision | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_param("approval must be an object with id and decision")
    approval_id = uuid_from(value.get("id"), field="approval.id", required=True)
    decision = choice_from(value.get("decision"), field="approval.decision", choices=("approve", "reject"))
    if decision is None:
        raise invalid_param("approval.decision is required")
    comment = value.get("comment") or ""
    if not isinstance(comment, str):
        raise invalid_param("approval.comment must be a string")
    return ApprovalDecision(approval_id=str(approval_id), decision=decision, comment=comment, audit=audit)


def _overrides(payload: dict[str, Any], inputs: dict[str, Any]) -> TurnOverrides:
    """The model-choice extensions, from the top level or (for clients that can only fill `inputs`) from inputs."""
    values: dict[str, Any] = {}
    for name in MODEL_FIELDS:
        value = payload.get(name)
        if value is None or value == "":
            value = inputs.get(name)
        if value is None or value == "":
            continue
        values[name] = _model_field(name, value)
    return TurnOverrides(
        config_id=values.get("model_config_id"),
        model=values.get("model"),
        temperature=values.get("temperature"),
        max_tokens=values.get("max_tokens"),
        top_p=values.get("top_p"),
    )


def _model_field(name: str, value: Any) -> Any:
    if name == "model_config_id":
        return str(uuid_from(value, field=name))
    if name == "model":
        if not isinstance(value, str) or not value.strip():
            raise invalid_param("model must be a non-empty string (an LLM config name or model name)")
        if len(value.strip()) > MODEL_MAX_LENGTH:
            raise invalid_param(f"model must be at most {MODEL_MAX_LENGTH} characters")
        return value.strip()
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise invalid_param(f"{name} must be {'an integer' if name == 'max_tokens' else 'a number'}")
    try:
        number = float(value)
    except ValueError:
        number = None
    except OverflowError:  # an integer no float holds (JSON allows it): past every range, as infinity is
        number = math.inf
    if name == "max_tokens":
        if isinstance(value, int) and value >= 1:
            return value  # exact, however large: the provider's range check refuses it by name
        if number is None or not number.is_integer() or number < 1:
            raise invalid_param("max_tokens must be a positive integer")
        return int(number)
    if number is None or number != number:  # NaN
        raise invalid_param(f"{name} must be a number")
    return number


def inputs_validate(*, form: list[Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs of a new conversation checked against the app's Dify `user_input_form`, with Dify's messages.
    Like Dify, only the form's variables are kept, and a missing optional one gets its default."""
    cleaned: dict[str, Any] = {}
    for item in form:
        if not isinstance(item, dict) or len(item) != 1:
            continue
        kind, spec = next(iter(item.items()))
        if not isinstance(spec, dict) or not spec.get("variable"):
            continue
        variable = spec["variable"]
        value = inputs.get(variable)
        if value is None or value == "":
            if spec.get("required"):
                raise invalid_param(f"{variable} is required in input form")
            cleaned[variable] = spec.get("default") if spec.get("default") is not None else ""
            continue
        cleaned[variable] = _input_value(kind, spec, variable, value)
    return cleaned


def _input_value(kind: str, spec: dict[str, Any], variable: str, value: Any) -> Any:
    if kind in ("text-input", "paragraph", "select"):
        if not isinstance(value, str):
            raise invalid_param(f"(type '{kind}') {variable} in input form must be a string")
        max_length = spec.get("max_length")
        if kind != "select" and isinstance(max_length, int) and max_length > 0 and len(value) > max_length:
            raise invalid_param(f"{variable} in input form must be less than {max_length} characters")
        options = spec.get("options") or []
        if kind == "select" and value not in options:
            raise invalid_param(f"{variable} in input form must be one of the following: {options}")
        return value
    if kind == "number":
        if isinstance(value, bool):
            raise invalid_param(f"{variable} in input form must be a valid number")
        if isinstance(value, int | float):
            return value
        try:
            float(value)
        except (TypeError, ValueError):
            raise invalid_param(f"{variable} in input form must be a valid number") from None
        return value
    return value


# ----- files -----

def _files(*, app: AgentApp, user: str, items: list[dict[str, Any]] | None) -> tuple[FileRef, ...]:
    """The files of a body that passed the schema (a list of objects), checked against the app's upload settings
    and resolved (an upload must be this end user's)."""
    if items is None:
        return ()
    upload = app_file_upload(app=app)
    if not upload.enabled or not items:
        return ()  # an app with uploads off ignores files silently, as Dify does
    if len(items) > upload.number_limits:
        raise invalid_param(f"Number of files exceeds the limit of {upload.number_limits}.")
    refs: list[FileRef] = []
    upload_ids: list[uuid.UUID] = []
    for index, item in enumerate(items):
        file_type = choice_from(item.get("type"), field=f"files[{index}].type", choices=FILE_TYPES, default="image")
        if upload.allowed_file_types is not None and file_type not in upload.allowed_file_types:
            raise invalid_param(f"files[{index}].type {file_type!r} is not allowed for this app")
        method = choice_from(item.get("transfer_method"), field=f"files[{index}].transfer_method",
                             choices=TRANSFER_METHODS)
        if method is None:
            raise invalid_param(f"files[{index}].transfer_method is required")
        if method == "remote_url":
            url = item.get("url")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2000:
                raise invalid_param(f"files[{index}].url must be an http(s) URL")
            refs.append(FileRef(type=file_type, transfer_method=method, url=url))
        else:
            upload_ids.append(uuid_from(item.get("upload_file_id"), field=f"files[{index}].upload_file_id",
                                        required=True))
            refs.append(FileRef(type=file_type, transfer_method=method))
    if upload_ids:
        end_user = end_user_get_or_create(app=app, user=user)
        uploads = {u.id: u for u in UploadFile.objects.filter(id__in=upload_ids, app=app, end_user=end_user)}
        ids = iter(upload_ids)
        resolved = []
        for ref in refs:
            if ref.transfer_method != "local_file":
                resolved.append(ref)
                continue
            upload = uploads.get(next(ids))
            if upload is None:
                raise invalid_param("Invalid upload file id.")
            resolved.append(FileRef(type=ref.type, transfer_method=ref.transfer_method, upload=upload))
        refs = resolved
    return tuple(refs)


def _attachments(*, files: tuple[FileRef, ...], config: LLMConfig) -> tuple[Attachment, ...]:
    """What the model gets of the files: images as image content when the answering config supports vision, text
    documents as text. Everything else is only recorded on the message."""
    if not files:
        return ()
    vision = _vision(config)
    attachments = []
    for ref in files:
        attachment = _attachment(ref, vision=vision)
        if attachment is not None:
            attachments.append(attachment)
    return tuple(attachments)


def _vision(config: LLMConfig) -> bool:
    if (config.extra_config or {}).get("vision"):
        return True
    return provider_spec(config.provider).supports_vision(config.model_name)


def _attachment(ref: FileRef, *, vision: bool) -> Attachment | None:
    upload = ref.upload
    name = upload.name if upload else ref.url.rsplit("/", 1)[-1].split("?", 1)[0]
    mime = (upload.mime_type if upload else "") or mimetypes.guess_type(name)[0] or ""
    extension = (upload.extension if upload else name.rsplit(".", 1)[-1] if "." in name else "").lower()
    is_image = ref.type == "image" or mime.startswith("image/")
    if is_image:
        if not vision:
            return None
        if upload is None:
            return Attachment(kind="image", name=name, mime_type=mime, url=ref.url)
        if upload.size > settings.UPLOAD_IMAGE_FILE_SIZE_LIMIT_MB * 1024 * 1024:
            raise DifyError("file_too_large", f"File size exceeded. {name}", 413)
        data = _read(upload)
        return Attachment(kind="image", name=name, mime_type=mime or "image/png",
                          url=f"data:{mime or 'image/png'};base64,{base64.b64encode(data).decode()}")
    is_text = extension in TEXT_EXTENSIONS or mime.startswith("text/")
    if upload is None and is_text:  # fetched when the run starts (agentcore.remote_files)
        return Attachment(kind="text", name=name, mime_type=mime or "text/plain", url=ref.url)
    if upload is not None and is_text:
        if upload.size > settings.UPLOAD_FILE_SIZE_LIMIT_MB * 1024 * 1024:
            raise DifyError("file_too_large", f"File size exceeded. {name}", 413)
        text = _read(upload).decode("utf-8", errors="replace")
        if len(text) > TEXT_ATTACHMENT_CHARS:
            text = text[:TEXT_ATTACHMENT_CHARS] + f"\n[... truncated at {TEXT_ATTACHMENT_CHARS} characters]"
        return Attachment(kind="text", name=name, mime_type=mime or "text/plain", text=text)
    return None


def _read(upload: UploadFile) -> bytes:
    try:
        with upload.file.open("rb") as handle:
            return handle.read()
    except OSError:
        raise invalid_param(f"The uploaded file {upload.name!r} can no longer be read.") from None


def message_files_record(*, message_id: Any, files: tuple[FileRef, ...]) -> None:
    """The files of a user message, for GET /v1/messages `message_files`."""
    MessageFile.objects.bulk_create(
        MessageFile(message_id=message_id, type=ref.type, transfer_method=ref.transfer_method, url=ref.url,
                    upload_file=ref.upload, belongs_to="user")
        for ref in files
    )


def conversation_auto_name(*, session_id: Any, meter: Meter | None = None) -> None:
    """Name a new conversation with its model (agentcore.generation; the shortened query when that fails). Runs in a
    worker thread of its own, so it closes its database connection itself."""
    try:
        session = Session.objects.select_related("app").filter(pk=session_id, is_deleted=False).first()
        if session is not None:
            name = session_generate_name(session=session, meter=meter)
            Session.objects.filter(pk=session_id).update(name=name)
    except Exception:
        logger.warning("Naming conversation %s failed", session_id, exc_info=True)
    finally:
        close_old_connections()


# ----- errors -----

def dify_error_from(exc: Exception, *, app: AgentApp) -> DifyError:
    """The Dify envelope for an error raised before a run started."""
    if isinstance(exc, DifyError):
        return exc
    if isinstance(exc, SessionNotFound):
        return not_found("Conversation Not Exists.")
    if isinstance(exc, TooManyActiveRuns):
        return DifyError(
            "too_many_requests",
            "Too many requests. Please try again later. The current maximum concurrent requests allowed for "
            f"{app.name} is {app.max_active_requests}.",
            429,
        )
    if isinstance(exc, OverLimit):
        return over_limit(exc)
    if isinstance(exc, ApprovalNotFound):
        return not_found("Approval Not Exists.")
    if isinstance(exc, ApprovalAlreadyDecided):
        return DifyError("conflict", exc.message, 409)
    if isinstance(exc, ApprovalForbidden):
        return forbidden(exc.message)
    if isinstance(exc, AppUnavailable):
        return APP_UNAVAILABLE
    if isinstance(exc, NoUsableConfig):
        return DifyError(PROVIDER_NOT_INITIALIZE, exc.message, 400)
    if isinstance(exc, ServiceError):  # the engine's other refusals: a field of the request is wrong
        return invalid_param(_naming_field(exc.message, exc.field))
    error = unexpected_error(exc)
    if error is INTERNAL:
        logger.exception("chat-messages failed before the run started")
    return error


def _naming_field(message: str, field_name: str | None) -> str:
    if field_name and field_name not in message:
        return f"{field_name}: {message}"
    return message
