"""The run service: prepares a turn (rows, model, parameters), runs the agent graph and yields neutral events.

This is the contract between the engine and its interfaces (REST, WebSocket, the Dify adapter): they call only
`turn_prepare`, `turn_run`, `run_turn` and `run_stop`, plus models and selectors.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import httpx
import openai
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from langchain_openai.chat_models._client_utils import _cached_async_httpx_client
from langgraph.types import Command

from agentcore.checkpoint import SaverOpening, checkpoint_prune, checkpointer, first_read_known_empty
from agentcore.errors import ApprovalAlreadyDecided, ApprovalNotFound, AppUnavailable, InvalidInput, TooManyActiveRuns
from agentcore.events import (
    ApprovalRequired,
    Event,
    RunEnd,
    RunError,
    RunStarted,
    TextDelta,
    ThoughtUpdate,
    Usage,
)
from agentcore.generation import session_fallback_name
from agentcore.graph import AgentContext, agent_graph, truncate
from agentcore.models import AgentApp, Approval, Message, Session, Thought
from agentcore.network import allow_list_for
from agentcore.permissions import CHANGE_SESSIONS, DECIDE_APPROVALS, has_perms
from agentcore.remote_files import RemoteFileError, remote_file_fetch
from agentcore.selectors import message_running_live, session_get_for, session_visible_q
from agentcore.services import (
    approval_decide,
    approval_supersede,
    inputs_check,
    message_close_stale_due,
)
from agentcore.tools.registry import ToolSetup, known_tool_names, tool_setup_load, tools_for_run
from llmconfigs.errors import ProviderCallError
from llmconfigs.factory import OVERRIDABLE, chat_model, effective_parameters, provider_error
from llmconfigs.models import LLMConfig
from llmconfigs.pricing import usage_cost
from llmconfigs.selectors import llm_config_get, llm_config_resolve
from llmconfigs.services import llm_config_record_usage
from opsagent.common.dependencies import dependency_down

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)

ATTACHMENT_TEXT_LIMIT = 100_000
MAX_ATTACHMENTS = 10
INTERNAL_ERROR = "The agent failed unexpectedly; the error was logged."
# The RunError category of a run that lost a dependency of ours (the database, Redis): a 503 for the client.
UNAVAILABLE = "unavailable"


# ----- the interface types -----

@dataclass(frozen=True)
class TurnOverrides:
    config_id: str | None = None  # LLMConfig UUID (explicit choice, wins)
    model: str | None = None  # config name or model_name (must be unambiguous)
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    tools: list[str] | None = None  # subset of tool names for this turn (None = the app's tools)


@dataclass(frozen=True)
class Attachment:
    """A file given to the model with the query."""

    kind: str  # "image" | "text"
    name: str
    mime_type: str = ""
    url: str = ""  # image: http(s) URL or data: URL; text: where to fetch it when the run starts (no text yet)
    text: str = ""  # text document: its (size-limited) content


@dataclass(frozen=True)
class ApprovalDecision:
    approval_id: str
    decision: str  # "approve" | "reject"
    comment: str = ""


@dataclass(frozen=True)
class TurnRequest:
    app: AgentApp
    query: str = ""
    session_id: str | None = None  # continue this session; None = start a new one
    owner: User | None = None  # Django user (REST/WS); staff may use any console session
    end_user: str = ""  # API end-user string (Dify `user`)
    source: str = Session.Source.CONSOLE  # "api" for the Dify API
    inputs: dict = field(default_factory=dict)
    overrides: TurnOverrides = TurnOverrides()
    attachments: tuple[Attachment, ...] = ()
    approval: ApprovalDecision | None = None  # resume a paused run instead of asking a new query
    session_name: str | None = None  # initial name for a new session (default: the query, shortened)


@dataclass
class Turn:
    """A prepared turn: its rows exist."""

    session: Session
    message: Message  # status "running"; for an approval: the paused message being resumed
    config: LLMConfig
    parameters: dict  # the sampling parameters that will be sent (recorded on the message)
    session_created: bool
    # What turn_run needs beyond the rows: the resume value for an approval, the turn's tool subset, attachments.
    resume: dict[str, Any] | None = None
    tools: list[str] | None = None
    attachments: tuple[Attachment, ...] = ()
    tool_setup: ToolSetup | None = None  # agent turns: the policy rows and MCP servers, read while preparing


_http_client_loop: weakref.ref | None = None
# Chat models of this loop by what they are built from. Building one costs about a millisecond (client setup,
# validation, its serialized form for callbacks) and a model is safe to share between concurrent runs.
_models: dict[tuple, ChatOpenAI] = {}
MODEL_CACHE_SIZE = 64


def _http_clients_for_this_loop() -> None:
    """langchain-openai keeps one pooled httpx client per base URL for the whole process, and pooled connections
    belong to the event loop that opened them. When runs move to another loop (tests, `asyncio.run` in commands) the
    cache is dropped so that the next model builds a client on the running loop; under daphne (one loop) this runs
    once."""
    global _http_client_loop
    loop = asyncio.get_running_loop()
    if _http_client_loop is not None and _http_client_loop() is loop:
        return
    _cached_async_httpx_client.cache_clear()
    _models.clear()
    _http_client_loop = weakref.ref(loop)


def _chat_model_for(config: LLMConfig, overrides: dict[str, Any]) -> ChatOpenAI:
    """The streaming chat model of `config` with `overrides`, reused while every editable field of the config (and
    the request settings) stay the same: an edited config or a rotated key builds a new one on its next run."""
    fields = tuple((f.attname, getattr(config, f.attname)) for f in config._meta.concrete_fields if f.editable)
    key = (config.pk, repr(fields), tuple(sorted(overrides.items())), settings.LLM_REQUEST_TIMEOUT,
           settings.LLM_MAX_RETRIES)
    model = _models.get(key)
    if model is None:
        if len(_models) >= MODEL_CACHE_SIZE:
            _models.clear()
        model = _models[key] = chat_model(config, streaming=True, **overrides)
    return model


def stop_group(task_id: uuid.UUID | str) -> str:
    return f"agent-run-{uuid.UUID(str(task_id)).hex}"


# ----- prepare -----

async def turn_prepare(request: TurnRequest) -> Turn:
    """Validate the request and write the turn's rows (session, running message; an approval's decision). Writes
    nothing when it raises. A caller cancelled meanwhile (its client left) leaves no running message behind."""
    return await prepared_or_abandoned(database_sync_to_async(turn_prepare_sync)(request))


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


def turn_prepare_sync(request: TurnRequest) -> Turn:
    """`turn_prepare` for a caller already off the event loop, so that its own database work shares the turn's one
    thread hop and connection (each hop costs a connection and a turn of the shared ORM thread). An agent turn also
    reads its tool setup here, so the run starts without another hop."""
    turn = _prepare(request)
    if turn.session.app.mode == AgentApp.Mode.AGENT_CHAT:
        turn.tool_setup = tool_setup_load()
    return turn


def _validate(request: TurnRequest) -> None:
    if not request.app.is_active:
        raise AppUnavailable("This app is disabled.", field="app")
    if request.approval is None:
        if not isinstance(request.query, str) or not request.query.strip():
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
    tools = request.overrides.tools
    if tools is not None:
        if not isinstance(tools, list | tuple) or not all(isinstance(t, str) for t in tools):
            raise InvalidInput("tools must be a list of tool names.", field="tools")
        unknown = sorted(set(tools) - known_tool_names())
        if unknown:
            raise InvalidInput(f"Unknown tool(s): {', '.join(unknown)}.", field="tools")


def _prepare(request: TurnRequest) -> Turn:
    _validate(request)
    if request.approval is not None:
        return _prepare_resume(request)
    overrides = request.overrides
    with transaction.atomic():
        # Runs left by a dead process end first (they would count against the app's limit); in the turn's own
        # transaction, which saves a commit.
        message_close_stale_due()
        # The limit comes first, as in Dify: a client over it gets 429 whatever else is wrong with the request.
        _check_capacity(request.app)
        session: Session | None = None
        if request.session_id:
            session = session_get_for(session_id=request.session_id, app=request.app, owner=request.owner,
                                      end_user=request.end_user, source=request.source)
        app = session.app if session is not None else request.app
        config = llm_config_resolve(
            config_id=overrides.config_id,
            model=overrides.model,
            session_config_id=session.llm_config_id if session else None,
            app_config_id=app.llm_config_id,
        )
        requested = {**(app.model_parameters or {}), **((session.model_parameters if session else None) or {})}
        requested = {k: v for k, v in requested.items() if k in OVERRIDABLE}
        requested.update({k: getattr(overrides, k) for k in OVERRIDABLE if getattr(overrides, k) is not None})
        parameters = effective_parameters(config, **requested)
        created = session is None
        if created:
            session = Session.objects.create(
                app=app, owner=request.owner, end_user=request.end_user, source=request.source,
                name=(request.session_name or session_fallback_name(request.query))[:255], inputs=request.inputs,
            )
        else:
            approval_supersede(session=session)
            Session.objects.filter(pk=session.pk).update(updated_at=timezone.now())
        message = Message.objects.create(
            session=session, query=request.query, inputs=request.inputs, llm_config=config,
            model_name=config.model_name, model_parameters=parameters, heartbeat_at=timezone.now(),
            tools=list(overrides.tools) if overrides.tools is not None else None,
        )
    return Turn(session=session, message=message, config=config, parameters=parameters, session_created=created,
                tools=message.tools,
                attachments=tuple(request.attachments))


def _check_capacity(app: AgentApp) -> None:
    if not app.max_active_requests:
        return
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
        approval = approval_decide(approval_id=approval.pk, decision=decision.decision, comment=decision.comment,
                                   user=request.owner, end_user="" if request.owner else request.end_user)
        message = Message.objects.select_for_update().get(pk=approval.message_id)
        if message.status != Message.Status.PAUSED:  # rolls the decision back: the run is not waiting any more
            raise ApprovalAlreadyDecided("This answer is no longer waiting for an approval.", field="approval_id")
        config = llm_config_get(config_id=message.llm_config_id) if message.llm_config_id else None
        if config is None or not config.is_active:
            config = llm_config_resolve(session_config_id=session.llm_config_id,
                                        app_config_id=session.app.llm_config_id)
        message.status = Message.Status.RUNNING
        message.heartbeat_at = timezone.now()
        message.save(update_fields=["status", "heartbeat_at", "updated_at"])
    return Turn(session=session, message=message, config=config, parameters=message.model_parameters,
                session_created=False, resume={"decision": decision.decision, "comment": decision.comment},
                tools=message.tools)


# ----- run -----

async def turn_run(turn: Turn, *, saver: SaverOpening | None = None) -> AsyncIterator[Event]:
    """Run a prepared turn and yield its events (see agentcore.events for the order). `saver`: the checkpointer
    opened while the turn was prepared (the run closes it); without it the run opens its own."""
    async for event in _Run(turn, saver=saver).events():
        yield event


async def run_turn(request: TurnRequest) -> AsyncIterator[Event]:
    """Prepare and run, for callers that need no access to the turn's rows before it runs."""
    turn = await turn_prepare(request)
    async for event in turn_run(turn):
        yield event


async def run_stop(*, task_id: str, end_user: str | None = None, app_id=None, user=None) -> bool:
    """Ask the worker running `task_id` to stop (through the channel layer, so any worker may ask). True when a
    running answer of the caller matched."""
    try:
        task_uuid = uuid.UUID(str(task_id))
    except ValueError:
        return False
    if end_user is not None:
        visible = {"session__end_user": end_user, "session__source": Session.Source.API}
        if app_id is not None:
            visible["session__app_id"] = app_id
    elif await database_sync_to_async(has_perms)(user, CHANGE_SESSIONS):
        visible = {}
    elif user is not None:
        visible = {"session__owner": user}
    else:
        return False
    matched = await Message.objects.filter(task_id=task_uuid, status=Message.Status.RUNNING, **visible).aexists()
    if matched:
        await get_channel_layer().group_send(stop_group(task_uuid), {"type": "run.stop"})
    return matched


_DONE = object()


class _Stopped(Exception):
    """The producer was cancelled by a stop request."""


@dataclass
class _Iteration:
    thought_id: str
    position: int
    text: str = ""


class _Run:
    """One execution of a turn: streams the graph in a producer task, so that a stop request or a client
    disconnect can cancel the upstream call at once while events flow to the consumer without buffering."""

    def __init__(self, turn: Turn, *, saver: SaverOpening | None = None):
        self.turn = turn
        self.saver = saver
        self.session = turn.session
        self.message = turn.message
        self.config = turn.config
        self.agent = self.session.app.mode == AgentApp.Mode.AGENT_CHAT
        self.texts: list[str] = [turn.message.answer] if turn.message.answer else []
        self.iteration: _Iteration | None = None
        self.position = 0
        self.thoughts_by_call: dict[str, str] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.interrupts: list[dict[str, Any]] = []
        self.started = 0.0
        self.first_token: float | None = None
        self.stop_requested = False
        self.finished = False

    # -- the consumer side --
    async def events(self) -> AsyncIterator[Event]:
        self.started = time.monotonic()
        # The producer starts first, so the upstream call does not wait for the channel layer's round trips (Redis):
        # a stop needs the task id, which the caller learns only from RunStarted, after the group is joined.
        queue: asyncio.Queue = asyncio.Queue()
        producer = asyncio.create_task(self._produce(queue))
        layer = get_channel_layer()
        group = stop_group(self.message.task_id)
        channel = None
        try:
            channel = await layer.new_channel() if layer is not None else None
            if channel:
                await layer.group_add(group, channel)
        except BaseException:
            await asyncio.shield(self._abandon(producer))
            raise
        helpers = [asyncio.create_task(self._heartbeat())]
        if channel:
            helpers.append(asyncio.create_task(self._listen(layer, channel, producer)))
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                for helper in helpers:
                    helper.cancel()
                if channel:
                    try:
                        await asyncio.shield(layer.group_discard(group, channel))
                    except Exception as exc:
                        # The run is over and saved: losing Redis now must not turn its end into an error. The
                        # group entry expires by itself (channels-redis' group expiry).
                        if dependency_down(exc) is None:
                            raise
                        logger.warning("run %s left its stop group without Redis: %s", self.message.pk, exc)

        try:
            yield RunStarted(
                session_id=str(self.session.pk), message_id=str(self.message.pk), task_id=str(self.message.task_id),
                created_at=int(self.message.created_at.timestamp()), llm_config_id=str(self.config.pk),
                model_name=self.config.model_name,
            )
            while (item := await queue.get()) is not _DONE:
                yield item
            final = await self._finish(producer)
            # Released before the end goes out: a client that answers the end at once (an approval, the next
            # message) finds the run over, not still leaving its stop group (a round trip with Redis).
            await release()
            for event in final:
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: stop the upstream call and keep what was said, even while being cancelled.
            await asyncio.shield(self._abandon(producer))
            raise
        finally:
            await release()
            # After the last event went out (or the client left): off the stream's path, in the run's own task, so
            # that a run never ends with its prune still to come.
            await checkpoint_prune(thread_id=str(self.session.pk))

    async def _finish(self, producer: asyncio.Task) -> list[Event]:
        await asyncio.wait([producer])
        if producer.cancelled() or isinstance(producer.exception(), _Stopped):
            return await self._save_end(Message.Status.STOPPED)
        exc = producer.exception()
        if exc is not None:
            return await self._save_error(exc)
        if self.interrupts:
            return await self._save_paused()
        return await self._save_end(Message.Status.NORMAL)

    async def _abandon(self, producer: asyncio.Task) -> None:
        if self.finished:
            return
        producer.cancel()
        await asyncio.wait([producer])
        await self._save_end(Message.Status.STOPPED)

    async def _listen(self, layer, channel: str, producer: asyncio.Task) -> None:
        try:
            while True:
                message = await layer.receive(channel)
                if message.get("type") == "run.stop" and not producer.done():
                    self.stop_requested = True
                    producer.cancel()
        except Exception as exc:
            # Redis went away mid-answer: the answer goes on (a disconnect still stops it), only a stop sent
            # through another worker can no longer reach it.
            if dependency_down(exc) is None:
                raise
            logger.warning("run %s no longer hears stop requests: %s", self.message.pk, exc)

    async def _heartbeat(self) -> None:
        """Tell other processes this run is alive, and keep what it has said so far: if this process dies, the
        stale-run sweep (agentcore.services.message_close_stale) ends the run with that partial answer. One row
        update every AGENT_HEARTBEAT_SECONDS, the answer only when it grew."""
        saved = None
        while True:
            await asyncio.sleep(settings.AGENT_HEARTBEAT_SECONDS)
            fields: dict[str, Any] = {"heartbeat_at": timezone.now()}
            answer = self._answer()
            if answer != saved:
                fields["answer"] = answer
            try:
                # Only while running: the row of a run that ended meanwhile keeps its final state.
                await Message.objects.filter(pk=self.message.pk, status=Message.Status.RUNNING).aupdate(**fields)
            except Exception as exc:
                if dependency_down(exc) is None:
                    raise
                logger.warning("heartbeat of run %s not written: %s", self.message.pk, exc)
                continue
            saved = answer

    # -- the producer side --
    async def _produce(self, queue: asyncio.Queue) -> None:
        try:
            await self._stream(queue)
        except asyncio.CancelledError:
            if self.stop_requested:
                raise _Stopped() from None
            raise
        finally:
            if self.saver is not None:  # a run cancelled before it reached its checkpointer still releases it
                await asyncio.shield(self.saver.aclose())
            queue.put_nowait(_DONE)

    async def _attachments(self) -> list[Attachment]:
        """The turn's attachments, with the text of documents given by URL fetched now (concurrently). A document
        that cannot be fetched is given to the model as a note saying why, and the answer goes on."""
        allow = allow_list_for(self.session.app)

        async def fetched(attachment: Attachment) -> Attachment:
            if attachment.kind != "text" or not attachment.url or attachment.text:
                return attachment
            limit = settings.UPLOAD_FILE_SIZE_LIMIT_MB * 1024 * 1024
            try:
                body = await remote_file_fetch(attachment.url, max_bytes=limit, allow=allow)
                text = body.decode("utf-8", errors="replace")
            except RemoteFileError as exc:
                logger.info("remote document of message %s not fetched: %s", self.message.pk, exc)
                text = f"[This file could not be fetched: {exc}.]"
            return replace(attachment, text=text)

        return list(await asyncio.gather(*(fetched(a) for a in self.turn.attachments)))

    def _graph_input(self, attachments: list[Attachment]) -> Any:
        if self.turn.resume is not None:
            return Command(resume=self.turn.resume)
        content: Any = self.message.query
        documents = [a for a in attachments if a.kind == "text"]
        images = [a for a in attachments if a.kind == "image"]
        if documents:
            content += "".join(f"\n\n<file name={a.name!r}>\n{truncate(a.text, ATTACHMENT_TEXT_LIMIT)}\n</file>"
                               for a in documents)
        if images:
            content = [{"type": "text", "text": content}] + [
                {"type": "image_url", "image_url": {"url": a.url}} for a in images
            ]
        return {"messages": [HumanMessage(content=content, id=str(self.message.pk))], "iterations": 0}

    async def _stream(self, queue: asyncio.Queue) -> None:
        app = self.session.app
        if self.agent:
            tools, rules = await tools_for_run(app=app, session_id=str(self.session.pk), subset=self.turn.tools,
                                               setup=self.turn.tool_setup)
        else:
            tools, rules = {}, {}
        overrides = {k: self.turn.parameters.get(k) for k in OVERRIDABLE}
        _http_clients_for_this_loop()
        model = _chat_model_for(self.config, overrides)
        if self.turn.resume is not None:
            await self._load_thoughts()
        graph_input = self._graph_input(await self._attachments() if self.turn.attachments else [])
        async with self.saver.use() if self.saver is not None else checkpointer() as saver:
            if self.turn.session_created:
                saver = first_read_known_empty(saver, thread_id=str(self.session.pk))
            graph = agent_graph(checkpointer=saver)
            context = AgentContext(model=model, tools=tools, rules=rules, system_prompt=app.system_prompt,
                                   max_iterations=app.max_iterations,
                                   max_history_messages=settings.AGENT_HISTORY_MAX_MESSAGES,
                                   max_history_chars=settings.AGENT_HISTORY_MAX_CHARS)
            config = {"configurable": {"thread_id": str(self.session.pk)},
                      "recursion_limit": 2 * app.max_iterations + 10}
            # When checkpoints are written. Agent-chat: after every step, while the next one runs, so that a tool
            # that ran (and may have changed something) is remembered even if the server dies in the next model
            # call. Chat: one model step and nothing else, so its question and answer are written together when the
            # run ends, however it ends (an answer, an error, a stop, a client gone): one write instead of three,
            # none of them on the way to the first token. Only a server dying mid-answer loses that turn from the
            # model's memory; its message stays in the history, marked as an error.
            durability = "async" if self.agent else "exit"
            async for mode, chunk in graph.astream(graph_input, config, context=context,
                                                  stream_mode=["messages", "updates"], durability=durability):
                if mode == "messages":
                    await self._on_chunk(queue, *chunk)
                else:
                    await self._on_update(queue, chunk)

    async def _on_chunk(self, queue: asyncio.Queue, chunk: Any, metadata: dict[str, Any]) -> None:
        if metadata.get("langgraph_node") != "model" or not isinstance(chunk, AIMessageChunk):
            return
        if chunk.usage_metadata:
            self.prompt_tokens += chunk.usage_metadata.get("input_tokens", 0)
            self.completion_tokens += chunk.usage_metadata.get("output_tokens", 0)
        text = chunk.text if isinstance(chunk.text, str) else chunk.text()
        if not text:
            return
        if self.first_token is None:
            self.first_token = time.monotonic()
        iteration = self._current_iteration(queue)
        iteration.text += text
        queue.put_nowait(TextDelta(text=text, position=iteration.position))
        # Let the consumer send it now: when the upstream's chunks arrive together, the stream would otherwise parse
        # all of them (about half a millisecond each) before the first one goes out.
        await asyncio.sleep(0)

    def _current_iteration(self, queue: asyncio.Queue) -> _Iteration:
        if self.iteration is None:
            self.position += 1
            self.iteration = _Iteration(thought_id=str(uuid.uuid4()), position=self.position)
            if self.agent:
                queue.put_nowait(ThoughtUpdate(thought_id=self.iteration.thought_id, position=self.position,
                                               phase="start", status="running"))
        return self.iteration

    async def _on_update(self, queue: asyncio.Queue, update: dict[str, Any]) -> None:
        for node, value in update.items():
            if node == "__interrupt__":
                await self._on_interrupts(queue, value)
            elif node == "model" and value:
                await self._on_model_message(queue, value["messages"][-1])
            elif node in ("tools", "limit") and value:
                await self._on_tool_results(queue, value["messages"])

    async def _on_model_message(self, queue: asyncio.Queue, message: AIMessage) -> None:
        iteration = self._current_iteration(queue)
        self.iteration = None
        text = iteration.text or (message.text if isinstance(message.text, str) else message.text())
        if text:
            self.texts.append(text)
        if not self.agent:
            return
        if not message.tool_calls:
            await Thought.objects.acreate(id=iteration.thought_id, message=self.message, position=iteration.position,
                                          thought=text, status=Thought.Status.DONE)
            queue.put_nowait(ThoughtUpdate(thought_id=iteration.thought_id, position=iteration.position,
                                           phase="answer", thought=text, status=Thought.Status.DONE))
            return
        rows = []
        for i, call in enumerate(message.tool_calls):
            if i:
                self.position += 1
            row = Thought(id=iteration.thought_id if i == 0 else uuid.uuid4(), message=self.message,
                          position=self.position, thought=text if i == 0 else "", tool=call["name"],
                          tool_call_id=call["id"] or "", tool_input=call["args"], status=Thought.Status.RUNNING)
            rows.append(row)
            self.thoughts_by_call[call["id"]] = str(row.id)
        await Thought.objects.abulk_create(rows)
        for row in rows:
            queue.put_nowait(ThoughtUpdate(thought_id=str(row.id), position=row.position, phase="tool_call",
                                           thought=row.thought, tool=row.tool, tool_input=row.tool_input,
                                           status=row.status))

    async def _on_tool_results(self, queue: asyncio.Queue, messages: list[ToolMessage]) -> None:
        if not self.agent:
            return
        for result in messages:
            thought_id = self.thoughts_by_call.get(result.tool_call_id)
            if thought_id is None:
                continue
            status = (result.artifact or {}).get("status", Thought.Status.DONE)
            observation = result.content if isinstance(result.content, str) else str(result.content)
            await Thought.objects.filter(pk=thought_id).aupdate(observation=observation, status=status)
            thought = await Thought.objects.aget(pk=thought_id)
            queue.put_nowait(ThoughtUpdate(thought_id=thought_id, position=thought.position, phase="tool_result",
                                           thought=thought.thought, tool=thought.tool, tool_input=thought.tool_input,
                                           observation=observation, status=status))

    async def _on_interrupts(self, queue: asyncio.Queue, interrupts: Any) -> None:
        for item in interrupts:
            value = dict(item.value)
            thought_id = self.thoughts_by_call.get(value["tool_call_id"])
            approval = await Approval.objects.acreate(
                session=self.session, message=self.message, thought_id=thought_id, tool=value["tool"],
                tool_call_id=value["tool_call_id"], tool_input=value["tool_input"], approver=value["approver"],
            )
            value["approval_id"] = str(approval.pk)
            self.interrupts.append(value)
            if thought_id:
                await Thought.objects.filter(pk=thought_id).aupdate(status=Thought.Status.AWAITING_APPROVAL)
                thought = await Thought.objects.aget(pk=thought_id)
                queue.put_nowait(ThoughtUpdate(thought_id=thought_id, position=thought.position,
                                               phase="awaiting_approval", thought=thought.thought, tool=thought.tool,
                                               tool_input=thought.tool_input, status=thought.status))
            queue.put_nowait(ApprovalRequired(approval_id=str(approval.pk), thought_id=thought_id or "",
                                              tool=value["tool"], tool_input=value["tool_input"],
                                              approver=value["approver"]))

    async def _load_thoughts(self) -> None:
        rows = [t async for t in Thought.objects.filter(message=self.message).order_by("position")]
        self.thoughts_by_call = {t.tool_call_id: str(t.pk) for t in rows if t.tool_call_id}
        self.position = max((t.position for t in rows), default=0)

    # -- the end --
    def _answer(self) -> str:
        parts = list(self.texts)
        if self.iteration is not None and self.iteration.text:
            parts.append(self.iteration.text)  # the iteration cut short by a stop or an error
        return "\n".join(p for p in parts if p)

    async def _save(self, status: str, *, error: str = "", category: str = "") -> Usage:
        self.finished = True
        ended = time.monotonic()
        cost = usage_cost(
            input_price_per_million=self.config.input_price_per_million,
            output_price_per_million=self.config.output_price_per_million,
            currency=self.config.currency, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
        )
        latency = ended - self.started
        ttft = self.first_token - self.started if self.first_token is not None else None
        generate = ended - self.first_token if self.first_token is not None else None
        fields = dict(
            answer=self._answer(), status=status, error=error, error_category=category, heartbeat_at=None,
            prompt_tokens=F("prompt_tokens") + self.prompt_tokens,
            completion_tokens=F("completion_tokens") + self.completion_tokens,
            total_tokens=F("total_tokens") + self.prompt_tokens + self.completion_tokens,
            prompt_price=F("prompt_price") + cost.prompt_price,
            completion_price=F("completion_price") + cost.completion_price,
            total_price=F("total_price") + cost.total_price, currency=cost.currency,
            latency=latency, time_to_first_token=ttft, time_to_generate=generate, updated_at=timezone.now(),
        )
        called = bool(self.prompt_tokens or self.completion_tokens or self.first_token is not None)
        # database_sync_to_async also closes the worker thread's connection (CONN_MAX_AGE=0) once the run is over.
        await database_sync_to_async(self._save_rows)(fields, cost.total_price if called else None)
        return Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens, cost=cost, latency=round(latency, 4),
            time_to_first_token=round(ttft, 4) if ttft is not None else None,
            time_to_generate=round(generate, 4) if generate is not None else None,
        )

    def _save_rows(self, fields: dict[str, Any], cost: Any) -> None:
        with transaction.atomic():
            Message.objects.filter(pk=self.message.pk).update(**fields)
            if cost is not None:
                llm_config_record_usage(config_id=self.config.pk, prompt_tokens=self.prompt_tokens,
                                        completion_tokens=self.completion_tokens, cost=cost)

    async def _remember_partial(self) -> None:
        """Add the answer cut short by a stop or an error to the conversation's checkpoint, so that the next turn's
        history holds what the user saw. Best effort: the turn's outcome is already decided."""
        if self.iteration is None or not self.iteration.text:
            return
        try:
            async with checkpointer() as saver:
                await agent_graph(checkpointer=saver).aupdate_state(
                    {"configurable": {"thread_id": str(self.session.pk)}},
                    # As the terminal "limit" node: the turn is over, nothing is scheduled after this write.
                    {"messages": [AIMessage(content=self.iteration.text)]}, as_node="limit",
                )
        except Exception:
            logger.exception("could not keep the partial answer of message %s in the checkpoint", self.message.pk)

    async def _save_end(self, status: str) -> list[Event]:
        if status == Message.Status.STOPPED:
            await self._remember_partial()
        usage = await self._save(status)
        return [usage, RunEnd(message_id=str(self.message.pk), status=status, answer=self._answer())]

    async def _save_paused(self) -> list[Event]:
        usage = await self._save(Message.Status.PAUSED)
        pending = [{"id": i["approval_id"], "tool": i["tool"], "tool_input": i["tool_input"]}
                   for i in self.interrupts]
        return [usage, RunEnd(message_id=str(self.message.pk), status=Message.Status.PAUSED, answer=self._answer(),
                              pending_approvals=pending)]

    async def _save_error(self, exc: BaseException) -> list[Event]:
        error = _classify(exc, api_key=self.config.api_key)
        await self._remember_partial()
        usage = await self._save(Message.Status.ERROR, error=error.message, category=error.category)
        return [usage, RunError(category=error.category, message=error.message, status_code=error.status_code)]


def _classify(exc: BaseException, *, api_key: str) -> ProviderCallError:
    """Provider faults keep their category and scrubbed message; a dependency of ours gone is `unavailable`; anything
    else is an internal error whose details go to the log only."""
    failure = dependency_down(exc)
    if failure is not None:
        logger.warning("agent run lost a dependency: %s (%r)", failure.message, exc)
        return ProviderCallError(UNAVAILABLE, failure.message, status_code=503)
    if isinstance(exc, openai.OpenAIError | httpx.HTTPError | TimeoutError | ConnectionError | ProviderCallError):
        return provider_error(exc, api_key=api_key)
    logger.exception("agent run failed", exc_info=exc)
    return ProviderCallError("internal", INTERNAL_ERROR)


__all__ = [
    "UNAVAILABLE", "ApprovalDecision", "Attachment", "SaverOpening", "Turn", "TurnOverrides", "TurnRequest", "run_stop",
    "run_turn", "stop_group", "turn_prepare", "turn_prepare_sync", "turn_run",
]
