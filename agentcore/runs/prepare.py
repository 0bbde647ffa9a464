"""Preparing a turn: the request is validated and the turn's rows are written in one transaction (a new query's
session and running message within the app's capacity, or an approval's decision and the paused message it
resumes). Nothing is written when preparing fails."""
from __future__ import annotations

import asyncio
import contextlib
import uuid

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agentcore.errors import ApprovalAlreadyDecided, ApprovalNotFound, AppUnavailable, InvalidInput, TooManyActiveRuns
from agentcore.generation import session_fallback_name
from agentcore.limits import Counted, Meter, usage_check, usage_uncount
from agentcore.models import AgentApp, Approval, Message, Session
from agentcore.permissions import DECIDE_APPROVALS, has_perms
from agentcore.prompts import prompt_fill
from agentcore.runs.types import Turn, TurnRequest
from agentcore.selectors import app_pool_resolve, message_running_live, session_get_for, session_visible_q
from agentcore.services import (
    approval_decide,
    approval_supersede,
    inputs_check,
    message_close_stale_due,
    message_stale_sweep_due,
)
from agentcore.tools.policies import known_tool_names, tool_setup_load
from llmconfigs.factory import OVERRIDABLE, effective_parameters
from llmconfigs.selectors import llm_config_get, llm_config_snapshot, llm_pool_resolve
from opsagent.common.db.statements import instance_insert, statements_together

MAX_ATTACHMENTS = 10


def turn_prepare(request: TurnRequest) -> Turn:
    """Validate the request and write the turn's rows (session, running message; an approval's decision). Writes
    nothing when it raises. For a caller off the event loop, so that its own database work shares the turn's one
    thread hop and connection (each hop costs a connection and a turn of the shared ORM thread). An agent turn also
    reads its tool setup here, so the run starts without another hop."""
    with llm_config_snapshot():  # the turn's config lookups in one cache round trip
        return _turn_prepared(request)


def _turn_prepared(request: TurnRequest) -> Turn:
    meter = request.meter or Meter.of_app(request.app)
    counted = request.counted if request.admitted else None
    try:
        _validate(request)
        # Before any row is written or provider called; a turn that then crosses a budget still finishes. Counted
        # once: not again for a request turn_admit let in.
        if not request.admitted:
            counted = usage_check(meter=meter)
        turn = _prepare_resume(request) if request.approval is not None else _prepare_query(request)
    except Exception:
        # Refused (bad input, an unknown session, a model or parameter it may not have, no capacity): a refused
        # request does not use the quota.
        usage_uncount(counted)
        raise
    turn.meter = meter
    if turn.session.app.mode == AgentApp.Mode.AGENT_CHAT:
        turn.tool_setup = tool_setup_load()
    return turn


def turn_admit(*, app: AgentApp, meter: Meter | None = None, resume: bool = False) -> Counted:
    """Let a request in, or refuse it (OverLimit, TooManyActiveRuns) before anything else of it is looked at: the
    app's and the key's rate limits and budgets (the request is counted), then the app's concurrency limit. For an
    adapter whose protocol reports these first (Dify: 429 whatever else is wrong with the body); it then builds its
    TurnRequest with `admitted=True` and `counted` (what this returns, given back with `usage_uncount` when the
    request is refused afterwards: a refused request does not use the quota). The concurrency limit is checked
    again, under the app's row lock, when the turn's rows are written: two requests racing for the last slot cannot
    both start. A `resume` (an approval's decision) goes on with a run the app let in before: only the rate limits
    apply, as when it is prepared."""
    counted = usage_check(meter=meter or Meter.of_app(app))
    if not resume:
        try:
            _check_capacity(app, lock=False)
        except TooManyActiveRuns:
            usage_uncount(counted)
            raise
    return counted


async def aturn_prepare(request: TurnRequest) -> Turn:
    """`turn_prepare` from the event loop. A caller cancelled meanwhile (its client left) leaves no running message
    behind."""
    return await prepared_or_abandoned(database_sync_to_async(turn_prepare)(request))


async def prepared_or_abandoned(prepare):
    """Await `prepare` (a coroutine that writes a turn's rows off the event loop and returns a Turn, or a tuple
    ending with one). If the awaiting task is cancelled, the write still finishes in its thread: wait for it and
    close the turn it made, so that its message is not left "running" until the stale-run sweep."""
    future = asyncio.ensure_future(prepare)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        try:
            result = await future
        except Exception:
            raise asyncio.CancelledError() from None
        await turn_abandon(result[-1] if isinstance(result, tuple) else result)
        raise


async def turn_abandon(turn: Turn) -> None:
    """Close a prepared turn that will not run (its client left before the run started): its message ends as
    stopped. A run that did start closes its own message; this then changes nothing."""
    await Message.objects.filter(pk=turn.message.pk, status=Message.Status.RUNNING).aupdate(
        status=Message.Status.STOPPED, heartbeat_at=None
    )


def _validate(request: TurnRequest) -> None:
    if not request.app.is_active:
        raise AppUnavailable("This app is disabled.", field="app")
    completion = request.app.mode == AgentApp.Mode.COMPLETION
    if completion and (request.approval is not None or request.session_id):
        raise InvalidInput("A completion app answers single messages: no conversation, no approvals.", field="app")
    if request.approval is None:
        if not isinstance(request.query, str):
            raise InvalidInput("query is required.", field="query")
        # A completion app's prompt may be the whole request (its inputs filled in); other apps need a question.
        asked = request.query.strip() or (completion and prompt_fill(request.app.system_prompt,
                                                                     inputs=request.inputs).strip())
        if not asked:
            raise InvalidInput("query is required.", field="query")
        if len(request.query) > settings.QUERY_MAX_LENGTH:
            raise InvalidInput(f"query is longer than {settings.QUERY_MAX_LENGTH} characters.", field="query")
    inputs_check(request.inputs)
    if len(request.attachments) > MAX_ATTACHMENTS:
        raise InvalidInput(f"At most {MAX_ATTACHMENTS} files per message.", field="files")
    for attachment in request.attachments:
        if attachment.kind == "image":
            if not attachment.url.startswith(("http://", "https://", "data:image/")):
                raise InvalidInput(f"Image {attachment.name!r} needs an http(s) or data: URL.", field="files")
        elif attachment.kind != "text":
            raise InvalidInput(f"Unsupported file kind {attachment.kind!r}.", field="files")
    for role, text in request.history:
        if role not in ("user", "assistant") or not isinstance(text, str):
            raise InvalidInput("history holds (role, text) pairs of user and assistant turns.", field="history")
    if sum(len(text) for _, text in request.history) > settings.QUERY_MAX_LENGTH:
        raise InvalidInput(f"The history is longer than {settings.QUERY_MAX_LENGTH} characters.", field="history")
    tools = request.overrides.tools
    if tools is not None:
        if not isinstance(tools, list | tuple) or not all(isinstance(t, str) for t in tools):
            raise InvalidInput("tools must be a list of tool names.", field="tools")
        unknown = sorted(set(tools) - known_tool_names())
        if unknown:
            raise InvalidInput(f"Unknown tool(s): {', '.join(unknown)}.", field="tools")


def _prepare_query(request: TurnRequest) -> Turn:
    overrides = request.overrides
    # The new rows go out together when the block ends (one statement on PostgreSQL, atomic by itself). A
    # transaction around them is needed only when the turn start does more: sweeps stale runs, counts the app's
    # running answers under its row lock, or supersedes a conversation's paused turn and touches its session. A new
    # conversation's first turn usually does none of these: there it would only add BEGIN and COMMIT, two round
    # trips with the database on every such turn.
    # Decided once: a sweep that fell due between the two reads would run outside any transaction.
    sweep = message_stale_sweep_due()
    alone = not (request.session_id or request.app.max_active_requests or sweep)
    with contextlib.nullcontext() if alone else transaction.atomic(), statements_together():
        # Runs left by a dead process end first (they would count against the app's limit); in the turn's own
        # transaction, which saves a commit.
        if sweep:
            message_close_stale_due()
        # The limit comes first, as in Dify: a client over it gets 429 whatever else is wrong with the request.
        _check_capacity(request.app)
        session: Session | None = None
        if request.session_id:
            session = session_get_for(session_id=request.session_id, app=request.app, owner=request.owner,
                                      end_user=request.end_user, source=request.source)
        app = session.app if session is not None else request.app
        pool = app_pool_resolve(app=app, config_id=overrides.config_id, model=overrides.model,
                                session_config_id=session.llm_config_id if session else None)
        config = pool[0]
        requested = {**(app.model_parameters or {}), **((session.model_parameters if session else None) or {})}
        requested = {k: v for k, v in requested.items() if k in OVERRIDABLE}
        requested.update({k: getattr(overrides, k) for k in OVERRIDABLE if getattr(overrides, k) is not None})
        parameters = effective_parameters(config, **requested)
        created = session is None
        if created:
            session = Session(
                app=app, owner=request.owner, end_user=request.end_user, source=request.source,
                name=(request.session_name or session_fallback_name(request.query))[:255], inputs=request.inputs,
            )
            instance_insert(session)  # the INSERT Django would compile on every turn, written once
        else:
            approval_supersede(session=session)
            Session.objects.filter(pk=session.pk).update(updated_at=timezone.now())
        message = Message(
            session=session, query=request.query, inputs=request.inputs, llm_config=config,
            model_name=config.model_name, model_parameters=parameters, heartbeat_at=timezone.now(),
            tools=list(overrides.tools) if overrides.tools is not None else None,
        )
        instance_insert(message)
    return Turn(session=session, message=message, config=config, parameters=parameters, session_created=created,
                tools=message.tools, attachments=tuple(request.attachments), pool=pool,
                requested_parameters={k: parameters[k] for k, v in requested.items() if v is not None},
                history=tuple(request.history) if created else ())


def _check_capacity(app: AgentApp, *, lock: bool = True) -> None:
    if not app.max_active_requests:
        return
    if lock:
        # The app row lock serialises concurrent starts, so two of them cannot both see "one slot left".
        AgentApp.objects.select_for_update().filter(pk=app.pk).first()
    # Only live runs count: one whose process died stops counting when its heartbeat goes stale, before the sweep
    # marks it failed.
    running = message_running_live(app=app).count()
    if running >= app.max_active_requests:
        raise TooManyActiveRuns(f"This app already has {running} answers running; try again shortly.")


def _prepare_resume(request: TurnRequest) -> Turn:
    decision = request.approval
    try:
        approval_pk = uuid.UUID(str(decision.approval_id))
    except ValueError:
        raise ApprovalNotFound("Approval not found.", field="approval_id") from None
    visible = session_visible_q(app=request.app, owner=request.owner, end_user=request.end_user,
                                source=request.source, permission=DECIDE_APPROVALS)
    if has_perms(request.owner, DECIDE_APPROVALS):
        visible = {}  # approvers decide approvals of every session, API ones included (admin, REST)
    with transaction.atomic():
        message_close_stale_due()
        approval = (Approval.objects.select_related("session__app")
                    .filter(pk=approval_pk, **{f"session__{k}": v for k, v in visible.items()}).first())
        if approval is None or (request.session_id and str(approval.session_id) != str(request.session_id)):
            raise ApprovalNotFound("Approval not found.", field="approval_id")
        session = approval.session
        # The decider is the Django user, if any: API end users come without one, so they hold no permission.
        audit = {"source": request.source, **{k: v for k, v in decision.audit.items() if k != "actor"}}
        approval = approval_decide(approval_id=approval.pk, decision=decision.decision, comment=decision.comment,
                                   user=request.owner, end_user="" if request.owner else request.end_user, **audit)
        message = Message.objects.select_for_update().get(pk=approval.message_id)
        if message.status != Message.Status.PAUSED:  # rolls the decision back: the run is not waiting any more
            raise ApprovalAlreadyDecided("This answer is no longer waiting for an approval.", field="approval_id")
        config = llm_config_get(config_id=message.llm_config_id) if message.llm_config_id else None
        if config is None or not config.is_active:
            pool = llm_pool_resolve(session_config_id=session.llm_config_id, app_config_id=session.app.llm_config_id)
        else:
            pool = llm_pool_resolve(config_id=config.pk)
        config = pool[0]
        message.status = Message.Status.RUNNING
        message.heartbeat_at = timezone.now()
        message.save(update_fields=["status", "heartbeat_at", "updated_at"])
    return Turn(session=session, message=message, config=config, parameters=message.model_parameters,
                session_created=False, resume={"decision": decision.decision, "comment": decision.comment},
                tools=message.tools, pool=pool)

