"""Writes of the agent's domain: sessions, approvals, plans, MCP servers, stale runs and the demo app (tool policies:
agentcore.tools.policies)."""
from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agentcore.errors import (
    ApprovalAlreadyDecided,
    ApprovalForbidden,
    ApprovalNotFound,
    InvalidInput,
    PermissionRefused,
)
from agentcore.mcp import mcp_server_test
from agentcore.models import AgentApp, Approval, MCPServer, Message, Session, Task
from agentcore.permissions import (
    MANAGE_MCP_STDIO,
    approval_decision_permissions,
    has_perms,
    mcp_server_is_command,
)
from agentcore.selectors import app_pool_resolve, run_stale_cutoff
from llmconfigs.errors import ConfigNotFound, InvalidParameter, NoUsableConfig
from llmconfigs.factory import OVERRIDABLE, effective_parameters
from llmconfigs.models import AuditLog
from llmconfigs.secrets import url_origin
from llmconfigs.selectors import llm_config_get, llm_config_resolve
from llmconfigs.services import audit_changes, audit_record
from opsagent.common.client_input import ClientInputError, ObjectBounds, object_check

STALE_RUN_ERROR = "interrupted: the server stopped during this answer"
_UNSET: Any = object()

DEMO_SYSTEM_PROMPT = """You are OpsAgent, a careful site-reliability assistant.
- Investigate before you conclude: use the tools (http_check, dns_lookup, system_status, current_time and any MCP
  tools) to gather facts, and say which tool told you what.
- For work with several steps, write a short plan with update_plan and keep its statuses current.
- Never guess command output. run_shell needs a staff approval every time: propose the exact command and why.
- If a tool fails or a call is rejected, explain what that means and suggest the next safe step.
- Answer concisely, in the user's language, with concrete numbers (status codes, latencies, percentages)."""


def inputs_check(inputs: Any) -> dict[str, Any]:
    """`inputs` (of a turn or a session) when it is an object within the INPUTS_* bounds; else InvalidInput."""
    if not isinstance(inputs, dict):
        raise InvalidInput("inputs must be an object.", field="inputs")
    bounds = ObjectBounds(
        max_bytes=settings.INPUTS_MAX_BYTES,
        max_keys=settings.INPUTS_MAX_KEYS,
        max_key_length=settings.INPUTS_MAX_KEY_LENGTH,
        max_string_length=settings.INPUTS_MAX_VALUE_LENGTH,
        max_depth=settings.INPUTS_MAX_DEPTH,
    )
    try:
        object_check(inputs, field="inputs", bounds=bounds)
    except ClientInputError as exc:
        raise InvalidInput(exc.message, field="inputs") from None
    return inputs


def _validated_parameters(parameters: Any, *, config_id: Any, app: AgentApp) -> dict[str, Any]:
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidInput("model_parameters must be an object.", field="model_parameters")
    unknown = sorted(set(parameters) - set(OVERRIDABLE))
    if unknown:
        raise InvalidInput(f"Unknown model parameter(s): {', '.join(unknown)}; allowed: {', '.join(OVERRIDABLE)}.",
                           field="model_parameters")
    try:
        config = llm_config_resolve(session_config_id=config_id, app_config_id=app.llm_config_id)
    except NoUsableConfig:
        return dict(parameters)  # nothing to check ranges against yet; the turn checks them again
    try:
        effective_parameters(config, **parameters)
    except InvalidParameter as exc:
        raise InvalidParameter(exc.message, field="model_parameters") from None
    return {k: v for k, v in parameters.items() if v is not None}


def _chat_config_id(llm_config_id: Any, *, app: AgentApp) -> Any:
    if llm_config_id in (None, ""):
        return None
    config = llm_config_get(config_id=llm_config_id)
    if config is None:
        raise ConfigNotFound(f"LLM config {llm_config_id} does not exist.", field="llm_config_id")
    try:
        app_pool_resolve(app=app, config_id=config.pk)
    except Exception as exc:
        exc.field = "llm_config_id"
        raise
    return config.pk


def session_create(*, app: AgentApp, owner=None, end_user: str = "", source: str = Session.Source.CONSOLE,
                   name: str = "", inputs: dict | None = None, llm_config_id: Any = None,
                   model_parameters: dict | None = None) -> Session:
    if app.mode == AgentApp.Mode.COMPLETION:
        raise InvalidInput("A completion app has no conversations: send it single messages.", field="app_id")
    inputs = inputs_check(inputs or {})
    config_id = _chat_config_id(llm_config_id, app=app)
    parameters = _validated_parameters(model_parameters, config_id=config_id, app=app)
    return Session.objects.create(app=app, owner=owner, end_user=end_user, source=source, name=name[:255],
                                  inputs=inputs, llm_config_id=config_id, model_parameters=parameters)


def session_update(*, session: Session, llm_config_id: Any = _UNSET, model_parameters: Any = _UNSET,
                   name: Any = _UNSET) -> Session:
    """Change a session's model, its parameter overrides or its name; only the given fields change."""
    fields = ["updated_at"]
    if llm_config_id is not _UNSET:
        session.llm_config_id = _chat_config_id(llm_config_id, app=session.app)
        fields.append("llm_config")
    if model_parameters is not _UNSET or llm_config_id is not _UNSET:
        parameters = session.model_parameters if model_parameters is _UNSET else model_parameters
        session.model_parameters = _validated_parameters(parameters, config_id=session.llm_config_id, app=session.app)
        fields.append("model_parameters")
    if name is not _UNSET:
        if not isinstance(name, str):
            raise InvalidInput("name must be a string.", field="name")
        session.name = name.strip()[:255]
        fields.append("name")
    session.save(update_fields=fields)
    return session


def session_delete(*, session: Session) -> None:
    """Soft delete: the conversation disappears from every list but its rows stay for audit."""
    Session.objects.filter(pk=session.pk).update(is_deleted=True, deleted_at=timezone.now())
    session.is_deleted = True


def message_close_stale(*, session: Session | None = None) -> int:
    """Mark runs whose process died (no heartbeat for AGENT_STALE_RUN_SECONDS) as failed; returns how many. Their
    answer stays as the last heartbeat saved it: what was streamed until then."""
    stale = Message.objects.filter(status=Message.Status.RUNNING, heartbeat_at__lt=run_stale_cutoff())
    if session is not None:
        stale = stale.filter(session=session)
    return stale.update(status=Message.Status.ERROR, error=STALE_RUN_ERROR, error_category="internal",
                        heartbeat_at=None)


# When this process last swept (time.monotonic()); see message_close_stale_due.
_last_stale_sweep = float("-inf")


def message_stale_sweep_due() -> bool:
    """Whether this process's next message_close_stale_due sweeps (a statement) or returns at once."""
    return time.monotonic() - _last_stale_sweep >= settings.AGENT_STALE_SWEEP_SECONDS


def message_close_stale_due() -> None:
    """message_close_stale at most once every AGENT_STALE_SWEEP_SECONDS per process, in the caller's transaction.
    Every turn starts with the sweep, but a run is stale only after AGENT_STALE_RUN_SECONDS: sweeping on each turn
    would add a statement to every first token and find nothing nearly every time."""
    if not message_stale_sweep_due():
        return
    now = time.monotonic()
    message_close_stale()

    def swept() -> None:
        global _last_stale_sweep
        _last_stale_sweep = now

    transaction.on_commit(swept)  # a turn rolled back (a 429, a bad id) swept nothing: the next one sweeps


def approval_decide(*, approval_id: Any, decision: str, comment: str = "", user=None, end_user: str = "",
                    source: str = "", ip_address: str | None = None, user_agent: str = "") -> Approval:
    """Record a decision once (row lock: a second decision raises ApprovalAlreadyDecided), with its audit row.
    Resuming the run is the run service's job (runs.turn_prepare with an ApprovalDecision)."""
    if decision not in ("approve", "reject"):
        raise InvalidInput("decision must be 'approve' or 'reject'.", field="decision")
    try:
        pk = uuid.UUID(str(approval_id))
    except ValueError:
        raise ApprovalNotFound("Approval not found.", field="approval_id") from None
    with transaction.atomic():
        approval = Approval.objects.select_for_update().filter(pk=pk).first()
        if approval is None:
            raise ApprovalNotFound("Approval not found.", field="approval_id")
        if approval.status != Approval.Status.PENDING:
            raise ApprovalAlreadyDecided(f"This approval was already {approval.status}.", field="approval_id")
        needed = approval_decision_permissions(tool=approval.tool, approver=approval.approver)
        if needed and not has_perms(user, *needed):
            raise ApprovalForbidden(f"Deciding {approval.tool} needs the permission {', '.join(needed)}.",
                                    field="approval_id")
        approval.status = Approval.Status.APPROVED if decision == "approve" else Approval.Status.REJECTED
        approval.comment = (comment or "")[:2000]
        approval.decided_by = user if user is not None and user.is_authenticated else None
        approval.decided_by_end_user = end_user or ""
        approval.decided_at = timezone.now()
        approval.save(update_fields=["status", "comment", "decided_by", "decided_by_end_user", "decided_at"])
        # The tool's arguments and the comment stay on the approval: they may hold anything the model or a user wrote.
        audit_record(actor=user, action=AuditLog.Action.DECIDE, target=approval,
                     changes={"status": {"old": Approval.Status.PENDING, "new": approval.status},
                              "tool": approval.tool, "approver": approval.approver, "session": str(approval.session_id),
                              "end_user": approval.decided_by_end_user},
                     source=source, ip_address=ip_address, user_agent=user_agent)
    return approval


def approval_supersede(*, session: Session) -> int:
    """A new query in a session abandons its paused turn: pending approvals are closed as rejected and the paused
    message as stopped, so a late decision cannot resume a conversation that has moved on."""
    now = timezone.now()
    count = Approval.objects.filter(session=session, status=Approval.Status.PENDING).update(
        status=Approval.Status.REJECTED, comment="superseded by a new message", decided_at=now)
    Message.objects.filter(session=session, status=Message.Status.PAUSED).update(status=Message.Status.STOPPED)
    return count


def task_replace(*, session_id: Any, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace a session's plan (what the update_plan tool writes)."""
    statuses = set(Task.Status.values)
    for item in tasks:
        if item.get("status", "pending") not in statuses:
            raise ValueError(f"unknown status {item.get('status')!r}; use one of {', '.join(sorted(statuses))}")
        if not str(item.get("title", "")).strip():
            raise ValueError("every step needs a title")
    with transaction.atomic():
        Task.objects.filter(session_id=session_id).delete()
        created = Task.objects.bulk_create([
            Task(session_id=session_id, title=str(item["title"]).strip()[:500], status=item.get("status", "pending"),
                 order=i)
            for i, item in enumerate(tasks)
        ])
    return [{"title": t.title, "status": t.status, "order": t.order} for t in created]


# MCP server fields an audit record may show as they are; args, env and headers can hold tokens.
_MCP_PLAIN_FIELDS = ("name", "transport", "command", "url", "enabled", "allowed_tools", "requires_approval_default")
_MCP_SECRET_FIELDS = ("args", "env", "headers")
_MCP_FIELDS = (*_MCP_PLAIN_FIELDS, *_MCP_SECRET_FIELDS)


def _mcp_command_allowed(actor, server: MCPServer) -> None:
    if mcp_server_is_command(server) and not has_perms(actor, MANAGE_MCP_STDIO):
        raise PermissionRefused(
            f"A stdio MCP server is a command run on the host: adding, changing or testing one needs the permission "
            f"{MANAGE_MCP_STDIO}.", field="transport")


def _mcp_changes(before: dict[str, Any], server: MCPServer) -> dict[str, Any]:
    return audit_changes(before, {name: getattr(server, name) for name in _MCP_FIELDS}, secret=_MCP_SECRET_FIELDS)


def mcp_server_headers_refusal(*, stored_url: str, stored_headers: dict | None, url: str) -> str:
    """Why stored headers (tokens) may not follow a server to `url` without being entered again ("" if they may):
    they go only to the origin they were entered for."""
    if not stored_headers or url_origin(stored_url) == url_origin(url):
        return ""
    return (f"The URL now points at {url_origin(url) or 'no server'}, not {url_origin(stored_url)} where the stored "
            "headers were entered; enter the headers again to send them there.")


def mcp_server_create(*, actor=None, source: str = "", ip_address: str | None = None, user_agent: str = "",
                      **fields: Any) -> MCPServer:
    """Register an MCP server; a stdio one (a command line) needs MANAGE_MCP_STDIO."""
    server = MCPServer(**fields)
    _mcp_command_allowed(actor, server)
    with transaction.atomic():
        server.save()
        audit_record(actor=actor, action=AuditLog.Action.CREATE, target=server, source=source, ip_address=ip_address,
                     user_agent=user_agent, changes=_mcp_changes({}, server))
    return server


def mcp_server_update(*, server: MCPServer, actor=None, source: str = "", ip_address: str | None = None,
                      user_agent: str = "", **fields: Any) -> MCPServer:
    """Change an MCP server. Any change to a stdio server, or into one, needs MANAGE_MCP_STDIO. Stored headers go
    only to the origin they were entered for: moving an HTTP server's URL to another host needs them again."""
    with transaction.atomic():
        locked = MCPServer.objects.select_for_update().get(pk=server.pk)
        before = {name: getattr(locked, name) for name in _MCP_FIELDS}
        _mcp_command_allowed(actor, locked)
        for name, value in fields.items():
            setattr(locked, name, value)
        _mcp_command_allowed(actor, locked)
        refusal = "" if "headers" in fields else mcp_server_headers_refusal(
            stored_url=before["url"], stored_headers=before["headers"], url=locked.url)
        if refusal:
            raise InvalidInput(refusal, field="headers")
        locked.save()
        changes = _mcp_changes(before, locked)
        if changes:
            audit_record(actor=actor, action=AuditLog.Action.UPDATE, target=locked, source=source,
                         ip_address=ip_address, user_agent=user_agent, changes=changes)
    return locked


def mcp_server_delete(*, server: MCPServer, actor=None, source: str = "", ip_address: str | None = None,
                      user_agent: str = "") -> None:
    with transaction.atomic():
        audit_record(actor=actor, action=AuditLog.Action.DELETE, target=server, source=source, ip_address=ip_address,
                     user_agent=user_agent, changes={"name": {"old": server.name}})
        server.delete()


def mcp_server_run_test(*, server: MCPServer, actor=None, source: str = "", ip_address: str | None = None,
                        user_agent: str = "") -> dict[str, Any]:
    """Connect to the server and list its tools (agentcore.mcp.mcp_server_test), audited. Testing a stdio server
    starts its command, so it needs MANAGE_MCP_STDIO like changing it."""
    _mcp_command_allowed(actor, server)
    result = mcp_server_test(server=server)
    outcome = {"ok": result["ok"], "tools": len(result.get("tools") or [])} if result["ok"] else {"ok": False}
    audit_record(actor=actor, action=AuditLog.Action.TEST_CONNECTION, target=server, source=source,
                 ip_address=ip_address, user_agent=user_agent, changes=outcome)
    return result


# ----- agent apps -----

def _app_values(app: AgentApp) -> dict[str, Any]:
    """The app's editable fields, JSON-ready, for its audit rows (an app holds no secret)."""
    values = {}
    for field in AgentApp._meta.concrete_fields:
        if field.primary_key or field.name in ("created_at", "updated_at"):
            continue
        value = getattr(app, field.attname)
        if isinstance(value, Decimal):  # budgets: the stored precision, so that "0" and "0.0000" are no change
            value = str(value.quantize(Decimal(1).scaleb(-field.decimal_places)))
        values[field.attname] = str(value) if isinstance(value, uuid.UUID) else value
    return values


def agent_app_created_record(*, app: AgentApp, actor=None, source: str = "", ip_address: str | None = None,
                             user_agent: str = "") -> None:
    """The audit row of a new app (every field), for whoever created it (the admin, create_app, the seed)."""
    audit_record(actor=actor, action=AuditLog.Action.CREATE, target=app, source=source, ip_address=ip_address,
                 user_agent=user_agent, changes={name: {"new": value} for name, value in _app_values(app).items()})


def agent_app_save(*, app: AgentApp, actor=None, source: str = "", ip_address: str | None = None,
                   user_agent: str = "") -> AgentApp:
    """Save a new or edited app (already validated, e.g. by the admin form), with an audit row: every field for a
    new app, the fields that changed for an edit (none changed: no row)."""
    with transaction.atomic():
        if app._state.adding:
            app.save()
            agent_app_created_record(app=app, actor=actor, source=source, ip_address=ip_address,
                                     user_agent=user_agent)
            return app
        stored = AgentApp.objects.select_for_update().get(pk=app.pk)
        before, after = _app_values(stored), _app_values(app)
        app.save()
        changes = audit_changes(before, after)
        if changes:
            audit_record(actor=actor, action=AuditLog.Action.UPDATE, target=app, changes=changes, source=source,
                         ip_address=ip_address, user_agent=user_agent)
    return app


def agent_app_delete(*, app: AgentApp, actor=None, source: str = "", ip_address: str | None = None,
                     user_agent: str = "") -> None:
    """Delete an app (its sessions and keys go with it), recorded first while the row still has its id."""
    with transaction.atomic():
        audit_record(actor=actor, action=AuditLog.Action.DELETE, target=app, source=source, ip_address=ip_address,
                     user_agent=user_agent, changes={"name": {"old": app.name}, "mode": {"old": app.mode}})
        app.delete()


def agent_app_seed_demo() -> AgentApp:
    """The demo "OpsAgent" agent-chat app when no app exists yet (idempotent); otherwise the first app."""
    with transaction.atomic():
        existing = AgentApp.objects.order_by("created_at").first()
        if existing is not None:
            return existing
        app, created = AgentApp.objects.get_or_create(
            name="OpsAgent",
            defaults={
                "mode": AgentApp.Mode.AGENT_CHAT,
                "description": "An operations assistant with HTTP, DNS, system and plan tools.",
                "system_prompt": DEMO_SYSTEM_PROMPT,
                "opening_statement": "Hi, I'm OpsAgent. Ask me to check a URL, a host name or this server's health.",
                "suggested_questions": [
                    "Is https://example.com up, and how fast does it answer?",
                    "What does this server's load, memory and disk look like?",
                    "Resolve github.com and tell me its IPv4 and IPv6 addresses.",
                ],
            },
        )
        if created:
            agent_app_created_record(app=app, source="command")
    return app
