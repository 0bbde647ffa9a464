"""Reads of the Dify Service API, always scoped to (app, end user, source="api") as Dify scopes them: conversations,
messages with their thoughts/files/feedback, app feedback, uploaded files and the models an app may use."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Prefetch, Q, QuerySet

from agentcore.models import AgentApp, Message, Session
from agentcore.selectors import app_route_allowed
from agentcore.tools.policies import tool_policies_with_defaults
from difyapi.errors import DifyError, not_found
from difyapi.models import EndUser, Feedback, MessageFile, UploadFile
from llmconfigs.models import LLMConfig

CONVERSATION_NOT_FOUND = "Conversation Not Exists."
MESSAGE_NOT_FOUND = "Message Not Exists."
FIRST_MESSAGE_NOT_FOUND = "First Message Not Exists."
LAST_CONVERSATION_NOT_FOUND = "Last Conversation Not Exists."
CONVERSATION_VARIABLE_NOT_FOUND = "Conversation Variable Not Exists."
END_USER_NOT_FOUND = DifyError("end_user_not_found", "End user not found.", 404)

CONVERSATION_SORTS = ("created_at", "-created_at", "updated_at", "-updated_at")
# Dify's defaults for an app that never configured uploads: off, three files.
DEFAULT_FILE_NUMBER_LIMITS = 3


@dataclass(frozen=True)
class Page:
    items: list
    has_more: bool


@dataclass(frozen=True)
class FileUpload:
    enabled: bool
    number_limits: int
    allowed_file_types: list[str] | None  # None: every type


def app_file_upload(*, app: AgentApp) -> FileUpload:
    """The one reading of an app's Dify-style `file_upload` setting, for what chat-messages accepts and what
    /v1/parameters reports. Both of Dify's shapes are read: the current one (`enabled`, `number_limits`,
    `allowed_file_types` at the top) and the older one (`image: {enabled, number_limits}`). Unset, uploads are off
    with a limit of 3, as in Dify; the workflow limit caps every app's own number."""
    config = app.file_upload if isinstance(app.file_upload, dict) else {}
    image = config.get("image") if isinstance(config.get("image"), dict) else {}
    enabled = config.get("enabled", image.get("enabled", False))
    limit = config.get("number_limits") or image.get("number_limits")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        limit = DEFAULT_FILE_NUMBER_LIMITS
    allowed = config.get("allowed_file_types")
    return FileUpload(
        enabled=bool(enabled),
        number_limits=min(limit, settings.WORKFLOW_FILE_UPLOAD_LIMIT),
        allowed_file_types=allowed if isinstance(allowed, list) and allowed else None,
    )


def _api_sessions(*, app: AgentApp, user: str) -> QuerySet[Session]:
    return Session.objects.filter(app=app, end_user=user, source=Session.Source.API, is_deleted=False)


def conversation_get(*, app: AgentApp, user: str, conversation_id: uuid.UUID) -> Session:
    """A live API conversation of this end user, else 404 `Conversation Not Exists.` (other user/app, deleted, or
    created outside the Service API)."""
    session = _api_sessions(app=app, user=user).select_related("app").filter(pk=conversation_id).first()
    if session is None:
        raise not_found(CONVERSATION_NOT_FOUND)
    return session


def end_user_get(*, app: AgentApp, end_user_id: uuid.UUID) -> EndUser:
    """One of this app's end users by the id Dify clients see (an upload's `created_by`, a feedback's
    `from_end_user_id`), else 404 `end_user_not_found`: another app's end users are not visible."""
    end_user = EndUser.objects.filter(app=app, pk=end_user_id).first()
    if end_user is None:
        raise END_USER_NOT_FOUND
    return end_user


def conversation_list(
    *, app: AgentApp, user: str, last_id: uuid.UUID | None, limit: int, sort_by: str = "-updated_at"
) -> Page:
    """Keyset page of the end user's API conversations, after the `last_id` row in `sort_by` order (id breaks ties)."""
    field = sort_by.lstrip("-")
    descending = sort_by.startswith("-")
    qs = _api_sessions(app=app, user=user).select_related("app")
    if last_id is not None:
        last = qs.filter(pk=last_id).values(field, "pk").first()
        if last is None:
            raise not_found(LAST_CONVERSATION_NOT_FOUND)
        op = "lt" if descending else "gt"
        qs = qs.filter(Q(**{f"{field}__{op}": last[field]}) | Q(**{field: last[field], f"pk__{op}": last["pk"]}))
    order = (f"-{field}", "-pk") if descending else (field, "pk")
    rows = list(qs.order_by(*order)[: limit + 1])
    return Page(items=rows[:limit], has_more=len(rows) > limit)


def message_list(*, session: Session, first_id: uuid.UUID | None, limit: int) -> Page:
    """The newest `limit` messages older than `first_id` (404 `First Message Not Exists.` if it is not in this
    conversation), returned oldest -> newest, with thoughts, files and the end user's own feedback prefetched."""
    qs = Message.objects.filter(session=session)
    if first_id is not None:
        first = qs.filter(pk=first_id).values("created_at", "pk").first()
        if first is None:
            raise not_found(FIRST_MESSAGE_NOT_FOUND)
        qs = qs.filter(Q(created_at__lt=first["created_at"]) | Q(created_at=first["created_at"], pk__lt=first["pk"]))
    qs = qs.prefetch_related(
        "thoughts",
        Prefetch("message_files", queryset=MessageFile.objects.select_related("upload_file")),
        Prefetch("feedbacks", queryset=Feedback.objects.filter(from_source=Feedback.FromSource.USER),
                 to_attr="user_feedbacks"),
    )
    rows = list(qs.order_by("-created_at", "-pk")[: limit + 1])
    has_more = len(rows) > limit
    return Page(items=list(reversed(rows[:limit])), has_more=has_more)


def message_get(*, app: AgentApp, user: str, message_id: uuid.UUID) -> Message:
    """A message of one of this end user's live API conversations, else 404 `Message Not Exists.`"""
    message = (
        Message.objects.select_related("session", "session__app")
        .filter(
            pk=message_id,
            session__app=app,
            session__end_user=user,
            session__source=Session.Source.API,
            session__is_deleted=False,
        )
        .first()
    )
    if message is None:
        raise not_found(MESSAGE_NOT_FOUND)
    return message


def feedback_list(*, app: AgentApp, page: int, limit: int) -> list[Feedback]:
    """App-wide feedback, newest first (Dify's `created_at DESC, id DESC`), page-numbered."""
    offset = (page - 1) * limit
    return list(Feedback.objects.filter(app=app).order_by("-created_at", "-id")[offset : offset + limit])


def upload_file_get(*, file_id: uuid.UUID, app: AgentApp | None = None) -> UploadFile | None:
    """An uploaded file, restricted to one app's files when `app` is given."""
    qs = UploadFile.objects.filter(pk=file_id)
    if app is not None:
        qs = qs.filter(app=app)
    return qs.first()


def app_models(*, app: AgentApp) -> list[tuple[LLMConfig, bool]]:
    """The active chat configs the app may use (its allow-list of routes; empty: all), with whether each is the one
    the app uses by default (its own config when set, else the default chat config). Keys are never read."""
    configs = [
        config for config in LLMConfig.objects.filter(is_active=True, is_embedding=False)
        .only("id", "name", "provider", "model_name", "route", "is_default", "created_at")
        .order_by("-is_default", "name")
        if app_route_allowed(app=app, route=config.route_name)
    ]
    if app.llm_config_id and any(c.pk == app.llm_config_id for c in configs):
        return [(c, c.pk == app.llm_config_id) for c in configs]
    return [(c, c.is_default) for c in configs]


def app_tool_names(*, app: AgentApp) -> list[str]:
    """The tools an agent-chat app may call: enabled by policy (a built-in without a policy row yet has its default)
    and allowed by the app (its list, empty = all); none for basic chat."""
    if app.mode != AgentApp.Mode.AGENT_CHAT:
        return []
    names = sorted(policy.name for policy in tool_policies_with_defaults() if policy.enabled)
    if app.enabled_tools:
        allowed = {str(name) for name in app.enabled_tools}
        names = [name for name in names if name in allowed]
    return names
