"""Reads of the agent's domain: sessions visible to a caller, messages with thoughts, plans, approvals, tools."""
from __future__ import annotations

import uuid
from typing import Any

from django.db import connection
from django.db.models import Prefetch, QuerySet

from agentcore.errors import SessionNotFound
from agentcore.models import AgentApp, Approval, Message, Session, Task, Thought, ToolPolicy


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except (TypeError, ValueError):
        return None


def session_visible_q(*, app: AgentApp | None, owner=None, end_user: str = "", source: str = Session.Source.CONSOLE
                      ) -> dict[str, Any]:
    """Filter kwargs for the sessions a caller may use: API sessions belong to (app, end_user); console sessions to
    their owner, and staff see every console session."""
    if source == Session.Source.API:
        return {"app": app, "end_user": end_user, "source": Session.Source.API, "is_deleted": False}
    if owner is not None and owner.is_staff:
        return {"source": Session.Source.CONSOLE, "is_deleted": False}
    if owner is None:
        return {"pk__in": []}
    return {"owner": owner, "source": Session.Source.CONSOLE, "is_deleted": False}


def session_get_for(*, session_id: Any, app: AgentApp | None = None, owner=None, end_user: str = "",
                    source: str = Session.Source.CONSOLE) -> Session:
    """The session if the caller may see it, else SessionNotFound (unknown, deleted and foreign look the same)."""
    pk = _uuid(session_id)
    session = None
    if pk is not None:
        session = (Session.objects.select_related("app")
                   .filter(pk=pk, **session_visible_q(app=app, owner=owner, end_user=end_user, source=source))
                   .first())
    if session is None:
        raise SessionNotFound("Conversation not found.", field="session_id")
    return session


def session_list_for(*, user) -> QuerySet[Session]:
    """Console sessions of `user` (every console session for staff), newest first."""
    return Session.objects.select_related("app", "llm_config").filter(**session_visible_q(app=None, owner=user))


def message_list(*, session: Session) -> QuerySet[Message]:
    """The session's messages, oldest first, with their thoughts in one extra query."""
    return (Message.objects.filter(session=session)
            .prefetch_related(Prefetch("thoughts", queryset=Thought.objects.order_by("position", "created_at")))
            .order_by("created_at", "id"))


def task_list(*, session: Session) -> QuerySet[Task]:
    return Task.objects.filter(session=session).order_by("order", "id")


def approval_list(*, status: str | None = None, user=None) -> QuerySet[Approval]:
    """Approvals, newest first; a non-staff user sees only those of their own console sessions."""
    qs = Approval.objects.select_related("session", "message", "decided_by")
    if status:
        qs = qs.filter(status=status)
    if user is not None and not user.is_staff:
        qs = qs.filter(session__owner=user, session__source=Session.Source.CONSOLE)
    return qs.order_by("-created_at")


def tool_list() -> list[dict[str, Any]]:
    """Every known tool with its policy (built-in defaults are created on first use)."""
    from agentcore.services import tool_policy_sync
    from agentcore.tools.registry import rule_for

    result = []
    for policy in sorted(tool_policy_sync(), key=lambda p: (p.source, p.name)):
        rule = rule_for(policy)
        result.append({
            "name": policy.name,
            "description": policy.description,
            "source": policy.source,
            "enabled": policy.enabled,
            "requires_approval": rule.requires_approval,
            "approver": rule.approver,
        })
    return result


def tool_policy_list() -> QuerySet[ToolPolicy]:
    return ToolPolicy.objects.select_related("mcp_server").order_by("source", "name")


# The checkpoint tables of each saver and the sizes of their stored values (PostgreSQL: jsonb counted as its text).
_CHECKPOINT_SIZES = {
    "postgresql": (
        "SELECT coalesce(sum(octet_length(checkpoint::text) + octet_length(metadata::text)), 0) FROM checkpoints",
        "SELECT coalesce(sum(octet_length(blob)), 0) FROM checkpoint_blobs",
        "SELECT coalesce(sum(octet_length(blob)), 0) FROM checkpoint_writes",
    ),
    "sqlite": (
        "SELECT coalesce(sum(length(checkpoint) + length(metadata)), 0) FROM checkpoints",
        "SELECT coalesce(sum(length(value)), 0) FROM writes",
    ),
}


def checkpoint_storage_bytes(*, thread_id: str | None = None) -> int:
    """Bytes of stored values in the checkpoint tables, of one conversation (its session id) or of all of them."""
    total = 0
    with connection.cursor() as cursor:
        for sql in _CHECKPOINT_SIZES[connection.vendor]:
            if thread_id is None:
                cursor.execute(sql)
            else:
                cursor.execute(f"{sql} WHERE thread_id = %s", [str(thread_id)])
            total += cursor.fetchone()[0]
    return total
