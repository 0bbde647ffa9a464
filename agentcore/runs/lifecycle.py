"""A turn's run: the agent graph streams in a producer task while its events flow to the caller, a heartbeat tells
other processes the run is alive, and a stop request (from any worker, through the channel layer) or a client that
leaves cancels the upstream call at once."""
from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone
from langchain_core.messages import AIMessage, HumanMessage, RemoveMessage
from langgraph.graph.message import REMOVE_ALL_MESSAGES, add_messages
from langgraph.types import Command

from agentcore.checkpoint import SaverOpening, checkpoint_prune, checkpointer, own_writes_read_back
from agentcore.events import Event, RunStarted, TextDelta
from agentcore.graph import ANSWERED, AgentContext, agent_graph, approval_needed, tool_calls_run, truncate
from agentcore.models import AgentApp, Message, Session
from agentcore.network import allow_list_for
from agentcore.permissions import CHANGE_SESSIONS, has_perms
from agentcore.prompts import prompt_fill
from agentcore.remote_files import RemoteFileError, remote_file_fetch
from agentcore.runs.chat_models import run_chat_model
from agentcore.runs.output import RunOutput
from agentcore.runs.prepare import aturn_prepare
from agentcore.runs.types import Attachment, Turn, TurnRequest
from agentcore.tools.registry import tools_for_run
from llmconfigs.factory import OVERRIDABLE, chat_model_key, provider_exception_scrubbed
from opsagent.common.dependencies import dependency_down

logger = logging.getLogger(__name__)

ATTACHMENT_TEXT_LIMIT = 100_000


def stop_group(task_id: uuid.UUID | str) -> str:
    return f"agent-run-{uuid.UUID(str(task_id)).hex}"


async def turn_run(turn: Turn, *, saver: SaverOpening | None = None) -> AsyncIterator[Event]:
    """Run a prepared turn and yield its events (see agentcore.events for the order). `saver`: the checkpointer
    opened while the turn was prepared (the run closes it); without it the run opens its own."""
    async for event in _Run(turn, saver=saver).events():
        yield event


async def turn_prepare_and_run(request: TurnRequest) -> AsyncIterator[Event]:
    """Prepare and run, for callers that need no access to the turn's rows before it runs."""
    turn = await aturn_prepare(request)
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
# What _Run._answer says of the turn: over, or to go on in the graph from the checkpoint the run left.
_TURN_OVER = object()
_IN_GRAPH = object()


class _EventQueue(asyncio.Queue):
    """A run's events on their way to its consumer. Text deltas of one iteration waiting one after another (the
    provider's chunks that arrived in one network read, parsed before the consumer's turn) are handed out as one
    delta, so that they go out in one write. Nothing waits for a batch: it is only what had already arrived."""

    def _init(self, maxsize: int) -> None:
        self._queue: collections.deque = collections.deque()

    def _get(self) -> Any:
        queue = self._queue
        item = queue.popleft()
        if type(item) is TextDelta and queue and type(queue[0]) is TextDelta and queue[0].position == item.position:
            texts = [item.text]
            while queue and type(queue[0]) is TextDelta and queue[0].position == item.position:
                texts.append(queue.popleft().text)
            item = TextDelta(text="".join(texts), position=item.position)
        return item


class _Stopped(Exception):
    """The producer was cancelled by a stop request."""


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
        self.completion = self.session.app.mode == AgentApp.Mode.COMPLETION
        self.queue: asyncio.Queue = _EventQueue()
        self.output = RunOutput(turn, self.queue)
        self.stop_requested = False
        self.graph_stepped = False  # the turn wrote a checkpoint per step (graph steps or its own tool steps): _answer

    # -- the consumer side --
    async def events(self) -> AsyncIterator[Event]:
        # The producer starts first, so the upstream call does not wait for the channel layer's round trips (Redis):
        # a stop needs the task id, which the caller learns only from RunStarted, after the group is joined.
        producer = asyncio.create_task(self._produce())
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
            while (item := await self.queue.get()) is not _DONE:
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
            if self._superseded_checkpoints():
                await checkpoint_prune(thread_id=str(self.session.pk))

    def _superseded_checkpoints(self) -> bool:
        """Whether this run may have left checkpoints older than its conversation's latest. Not when a turn that
        opened its conversation (a new conversation is never a resumed one) was answered without the graph's steps
        (a chat turn, an agent turn answered without a tool): it wrote the conversation's one checkpoint, or none,
        and nothing after it unless a stopped or failed answer was added to it."""
        return self.graph_stepped or not self.turn.session_created or self.output.partial_kept

    async def _finish(self, producer: asyncio.Task) -> list[Event]:
        await asyncio.wait([producer])
        if producer.cancelled() or isinstance(producer.exception(), _Stopped):
            return await self.output.save_end(Message.Status.STOPPED)
        exc = producer.exception()
        if exc is not None:
            return await self.output.save_error(exc)
        if self.output.interrupts:
            return await self.output.save_paused()
        return await self.output.save_end(Message.Status.NORMAL)

    async def _abandon(self, producer: asyncio.Task) -> None:
        if self.output.finished:
            return
        producer.cancel()
        await asyncio.wait([producer])
        await self.output.save_end(Message.Status.STOPPED)

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
            answer = self.output.answer()
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
    async def _produce(self) -> None:
        try:
            await self._stream()
        except asyncio.CancelledError:
            if self.stop_requested:
                raise _Stopped() from None
            raise
        finally:
            if self.saver is not None:  # a run cancelled before it reached its checkpointer still releases it
                await asyncio.shield(self.saver.aclose())
            self.queue.put_nowait(_DONE)

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

    def _prompts(self) -> tuple[str, str]:
        """(system prompt, the human message's text). A completion app's prompt is a template of its inputs; with no
        query it is itself what the model answers."""
        app, query = self.session.app, self.message.query
        if not self.completion:
            return app.system_prompt, query
        prompt = prompt_fill(app.system_prompt, inputs=self.message.inputs or {}, query=query)
        return (prompt, query) if query else ("", prompt)

    def _graph_input(self, attachments: list[Attachment], asked: str) -> Any:
        if self.turn.resume is not None:
            return Command(resume=self.turn.resume)
        content: Any = asked
        documents = [a for a in attachments if a.kind == "text"]
        images = [a for a in attachments if a.kind == "image"]
        if documents:
            content += "".join(f"\n\n<file name={a.name!r}>\n{truncate(a.text, ATTACHMENT_TEXT_LIMIT)}\n</file>"
                               for a in documents)
        if images:
            content = [{"type": "text", "text": content}] + [
                {"type": "image_url", "image_url": {"url": a.url}} for a in images
            ]
        earlier = [HumanMessage(content=text) if role == "user" else AIMessage(content=text)
                   for role, text in self.turn.history]
        return {"messages": [*earlier, HumanMessage(content=content, id=str(self.message.pk))], "iterations": 0}

    async def _stream(self) -> None:
        app = self.session.app
        if self.agent:
            tools, rules = await tools_for_run(app=app, session_id=str(self.session.pk), subset=self.turn.tools,
                                               setup=self.turn.tool_setup)
        else:
            tools, rules = {}, {}
        overrides = self.turn.requested_parameters
        if overrides is None:
            overrides = {k: self.turn.parameters.get(k) for k in OVERRIDABLE}
        model = self.output.model = run_chat_model(self.turn.pool or [self.config], overrides)
        if self.turn.resume is not None:
            await self.output.load_thoughts()
        system_prompt, asked = self._prompts()
        graph_input = self._graph_input(await self._attachments() if self.turn.attachments else [], asked)
        context = AgentContext(model=model, on_delta=self.output.on_delta, tools=tools, rules=rules,
                               system_prompt=system_prompt, max_iterations=app.max_iterations,
                               max_history_messages=settings.AGENT_HISTORY_MAX_MESSAGES,
                               max_history_chars=settings.AGENT_HISTORY_MAX_CHARS)
        async with self.saver.use() if self.saver is not None else checkpointer() as saver:
            saver = own_writes_read_back(saver, thread_id=str(self.session.pk), known_empty=self.turn.session_created)
            graph = agent_graph(checkpointer=saver)
            if self.turn.resume is None:
                saved = await self._saved_history(graph, saver)
                if saved is not None:
                    goes_on = await self._answer(graph, context, saved, graph_input["messages"])
                    if goes_on is _TURN_OVER:
                        return
                    if goes_on is _IN_GRAPH:
                        graph_input = None  # the graph goes on from the checkpoint the run's last write left
                    else:
                        context.answered.append(goes_on)
            config = {"configurable": {"thread_id": str(self.session.pk)},
                      "recursion_limit": 2 * app.max_iterations + 10}
            # When checkpoints are written. Agent-chat: after every step, while the next one runs, so that a tool
            # that ran (and may have changed something) is remembered even if the server dies in the next model
            # call. Chat: one model step and nothing else, so its question and answer are written together when the
            # run ends, however it ends (an answer, an error, a stop, a client gone): one write instead of three,
            # none of them on the way to the first token. Only a server dying mid-answer loses that turn from the
            # model's memory; its message stays in the history, marked as an error.
            durability = "async" if self.agent else "exit"
            # The model's chunks reach the output from the model node itself (AgentContext.on_delta); the graph
            # streams only what each step did.
            self.graph_stepped = True
            async for update in graph.astream(graph_input, config, context=context, stream_mode="updates",
                                              durability=durability):
                await self.output.on_update(update)

    async def _saved_history(self, graph: Any, saver: Any) -> list[Any] | None:
        """The conversation as its checkpoint holds it, or None when the graph left a step to run in it (an agent
        turn paused for an approval that this new message supersedes): such a turn is the graph's from the start."""
        if self.turn.session_created:
            return []
        thread = {"configurable": {"thread_id": str(self.session.pk)}}
        if not self.agent:
            saved = await saver.aget_tuple(thread)
            return saved.checkpoint["channel_values"].get("messages", []) if saved else []
        state = await graph.aget_state(thread)
        return None if state.next else state.values.get("messages", [])

    async def _answer(self, graph: Any, context: AgentContext, saved: list[Any], asked: list[Any]) -> Any:
        """A turn's model calls and tool steps, run here without the graph's step machinery (per step and per
        streamed chunk, most of the graph's cost), on the conversation `saved` in its checkpoint, for as long as the
        graph would add nothing: the model's stream goes straight to the output, and each answer is handled as the
        graph would handle it, its state written as the graph would leave it:
        - no tool call (a chat or completion turn always): the turn is over (_TURN_OVER), the exchange written as one
          update of the graph's state, as its terminal "limit" node (nothing scheduled after it);
        - tool calls that need no approval, below the iteration limit: the tools run here (graph.tool_calls_run, the
          graph's tool step's own code), their results go out as that step's update, and the state is written as
          the "tools" node leaves it (its edge schedules the model step), in the background while the next model
          call streams (the graph's "async" durability: a tool that ran is remembered even if the server dies in
          the next model call); then the next answer. The question and the answer that called the tools are written
          with the tools' results, not before they run: the graph's model step is written while the tool step
          runs, which no more guarantees it is saved before the tools run;
        - a call that needs an approval: the answer is written as the graph's ANSWERED node, whose edge schedules the
          tool step, and the graph goes on from there (_IN_GRAPH): its tool step interrupts for the approval;
        - tool calls at the iteration limit: the graph takes the answer over (AgentContext.answered): after a tool
          step written here, its model step goes on from that checkpoint (_IN_GRAPH); on the turn's first answer,
          unwritten, the graph runs the turn from its input (the answer is returned).

        A turn ended by a stop, a client gone or a failed model call leaves what the graph leaves: the last tool
        step written (awaited, even while being cancelled), then what is not yet written of the turn as the graph's
        step in progress would have left it (the question alone before the first answer, as "limit"; an answer
        whose tools had not finished, as ANSWERED: its calls pending), and the output adds a partial answer."""
        thread = {"configurable": {"thread_id": str(self.session.pk)}}
        history = add_messages(saved, asked)
        # What is not yet written, and as which node: the question alone until there is an answer (as "limit": a
        # stopped or failed run's partial answer is added by the output, as after the graph).
        update: dict[str, Any] | None = {"messages": asked, "iterations": 0}
        as_node = "limit"
        tool_step: asyncio.Future | None = None  # the write of the last tool step, while the next model call runs
        iterations = 0
        try:
            while True:
                window = context.window(history)
                error = None
                try:
                    response = await context.answer(context.prompt(window), merged=self.agent)
                    # What the answer's last network read brought goes out before the checkpoint is written.
                    await asyncio.sleep(0)
                except Exception as exc:
                    error = provider_exception_scrubbed(exc, api_key=chat_model_key(context.model))
                if error is not None:
                    raise error  # outside the except clause, so the unscrubbed original is not kept as its context
                iterations += 1
                calls = response.tool_calls
                if calls and iterations >= context.max_iterations:
                    if iterations == 1:
                        update = None
                        return response
                    context.answered.append(response)
                    return _IN_GRAPH
                # What the graph's model node writes: the answer, and the history cut to the window when it was cut.
                trimmed = len(window) < len(history)
                pending = update["messages"] if update is not None else []
                written = [RemoveMessage(id=REMOVE_ALL_MESSAGES), *window, response] if trimmed else [*pending,
                                                                                                   response]
                history = [*window, response] if trimmed else [*history, response]
                update = {"messages": written, "iterations": iterations}
                await self.output.on_update({"model": {"messages": [response]}})
                if not calls:
                    return _TURN_OVER
                as_node = ANSWERED
                if approval_needed(context, calls):
                    return _IN_GRAPH
                results = await tool_calls_run(context, calls)
                if tool_step is not None:
                    await tool_step
                # As the graph's "tools" node: the model step is scheduled after this write.
                tool_step = asyncio.ensure_future(graph.aupdate_state(
                    thread, {"messages": [*written, *results], "iterations": iterations}, as_node="tools"))
                update, as_node = None, "limit"
                self.graph_stepped = True
                await self.output.on_update({"tools": {"messages": results}})
                history.extend(results)
        finally:
            if tool_step is not None or update is not None:
                # Shielded: a stopped run still remembers its question and its tool steps before the output adds the
                # partial answer.
                write = asyncio.ensure_future(self._written(graph, thread, tool_step, update, as_node))
                try:
                    await asyncio.shield(write)
                except asyncio.CancelledError:
                    await write
                    raise

    @staticmethod
    async def _written(graph: Any, thread: dict[str, Any], tool_step: asyncio.Future | None,
                       update: dict[str, Any] | None, as_node: str) -> None:
        """The last tool step's write finished, then `update` written as `as_node` after it (each write reads the
        checkpoint the one before it left)."""
        if tool_step is not None:
            await tool_step
        if update is not None:
            await graph.aupdate_state(thread, update, as_node=as_node)
