"""Channels HTTP consumers of POST /v1/chat-messages and /v1/completion-messages (blocking, SSE streaming) and of
their stop endpoints (`/{task_id}/stop`).

The request handler validates, starts the reply as an asyncio task and returns, so the consumer keeps receiving:
`http.disconnect` cancels the task (the engine saves the partial answer as stopped). A stop request reaches the run
through the channel layer (the engine listens on its own group), from whichever worker serves it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Coroutine
from typing import Any

from asgiref.sync import sync_to_async
from channels.consumer import AsyncConsumer, get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from django.conf import settings
from django.db import transaction

from agentcore.events import RunEnd, RunError
from agentcore.runs import (
    SaverOpening,
    Turn,
    prepared_or_abandoned,
    run_stop,
    turn_abandon,
    turn_prepare,
    turn_remember_answer,
    turn_run,
)
from agentcore.tools.policies import TOOL_SETUP_VERSION_KEY
from difyapi.annotations import (
    AnnotationReply,
    ReplyPlan,
    annotation_plan_cache_key,
    annotation_reply_for,
    annotation_reply_plan,
)
from difyapi.auth import AppContext, app_guess, authenticate
from difyapi.chat import (
    CHAT_NUL_STRIPPED,
    ChatCall,
    app_mode_check,
    chat_call_build,
    conversation_auto_name,
    dify_error_from,
    message_files_record,
)
from difyapi.encoding import dify_json
from difyapi.errors import INTERNAL, METHOD_NOT_ALLOWED, DifyError, unexpected_error
from difyapi.events import STREAM_INTERNAL_MESSAGE, DifyTurn, annotation_reply_events, run_error_to_dify
from difyapi.sse import HEADERS, PING, encode_event
from difyapi.streaming import TERMINAL_EVENTS, header, in_background, turn_dify_events
from difyapi.validation import parse_json_body, user_from
from llmconfigs.selectors import llm_config_cache_keys, llm_config_snapshot
from opsagent.common.cache import cache_read_ahead
from opsagent.common.clients import USER_AGENT_LIMIT, scope_client_ip
from opsagent.common.metrics import stream_active
from opsagent.common.request_log import RequestRecord

logger = logging.getLogger(__name__)

# Channels answers these without Django's middleware, so the header SecurityMiddleware adds elsewhere is set here.
JSON_HEADERS = [(b"content-type", b"application/json"), (b"x-content-type-options", b"nosniff")]
# The status logged for a request whose client left before any response went out (nginx's convention).
CLIENT_CLOSED = 499


class DifyHttpConsumer(AsyncConsumer):
    """One Dify JSON request: collects the body, hands it to `respond` in a task, and stops on disconnect. A body
    that comes in several parts (anything over one read, so possibly large) has its key checked before the rest is
    buffered; a body in one part, which is most requests, is checked in the request's single hop instead. (The size
    of a body is bounded before it gets here: opsagent.common.limits.)"""

    # The run listens on its own stop group; the consumer itself needs no channel (and no channel-layer round trip).
    channel_layer_alias = None
    methods: tuple[str, ...] = ("POST",)
    surface = "dify"  # the request log's and the metrics' name of where the request came in

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.body: list[bytes] = []
        self.task: asyncio.Task | None = None
        self.context: AppContext | None = None  # set when the key was checked before the body had arrived
        self.record: RequestRecord | None = None  # the request log line, written when the response ends

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels' own dispatch first closes stale database connections in a thread hop of its own, for every message
        # (the request, the disconnect). Every database call here goes through database_sync_to_async, which does that
        # around the call itself: the extra hop was pure cost.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def http_request(self, message: dict[str, Any]) -> None:
        if self.record is None:
            # Begun before the answer's task starts, which inherits it: the run fills in its config and timings.
            self.record = RequestRecord(surface=self.surface, method=self.scope.get("method", ""),
                                        path=self.log_path()).begin()
        self.body.append(message.get("body", b""))
        if not message.get("more_body"):
            self.task = asyncio.create_task(self._answer_errors(self._respond(b"".join(self.body))))
            return
        if self.context is None and not await self._answer_errors(self._admit()):
            raise StopConsumer()  # answered: the rest of the body is never read

    async def http_disconnect(self, message: dict[str, Any]) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.record is not None:
            # The client left before the response ended: 499, as proxies log it, unless a status went out.
            self.record.write(self.record.status or CLIENT_CLOSED)
        raise StopConsumer()

    async def send(self, message: dict[str, Any]) -> None:
        if self.record is not None:
            if message["type"] == "http.response.start":
                self.record.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                self.record.write()  # before the last byte: a client that has it finds the line written
        await super().send(message)

    async def _admit(self) -> None:
        if self.scope.get("method") not in self.methods:
            raise METHOD_NOT_ALLOWED
        self.context = await self.authenticate()

    async def _respond(self, body: bytes) -> None:
        if self.scope.get("method") not in self.methods:
            raise METHOD_NOT_ALLOWED
        await self.respond(body)

    async def _answer_errors(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run `work`; an error it raises is answered in the Dify envelope (False). Never a traceback to the client."""
        try:
            await work
        except DifyError as exc:
            await self.send_json(exc.status, exc.payload(), headers=exc.headers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = unexpected_error(exc)
            if error is INTERNAL:
                logger.exception("Dify request failed: %s", self.log_path())
            else:
                logger.warning("Dify request failed: %s: %s", self.log_path(), error.message)
            await self.send_json(error.status, error.payload(), headers=error.headers)
        else:
            return True
        return False

    async def respond(self, body: bytes) -> None:
        raise NotImplementedError

    def log_path(self) -> str:
        """The path as logs may show it (a consumer whose path holds a secret masks it)."""
        return self.scope.get("path", "")

    async def authenticate(self) -> AppContext:
        if self.context is not None:
            return self.context
        return await database_sync_to_async(authenticate)(
            header(self.scope, b"authorization"), client_ip=scope_client_ip(self.scope)
        )

    def payload(self, body: bytes) -> dict[str, Any]:
        return parse_json_body(body, header(self.scope, b"content-type"))

    async def send_json(self, status: int, data: Any, *, headers: dict[str, str] | None = None) -> None:
        extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await self.send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS + extra})
        await self.send({"type": "http.response.body", "body": dify_json(data)})


def _chat_turn(
    header: str | None, body: bytes, content_type: str | None, client_ip: str | None, context: AppContext | None,
    user_agent: str = "", completion: bool = False,
) -> tuple[ChatCall, ReplyPlan | None, Turn]:
    """Authentication (unless done before the body arrived), validation and the turn's rows in one hop off the event
    loop: every hop costs a database connection and a turn of the shared ORM thread, which all concurrent requests
    wait for. Its config lookups share one snapshot, and the shared cache entries it reads are read together (one
    round trip with Redis for the key, its app, the config generation, the app's reply setting and the tool setup
    stamp, once this process has seen the key)."""
    app_id = str(context.app.pk) if context is not None else app_guess(header)
    ahead = [*llm_config_cache_keys(), TOOL_SETUP_VERSION_KEY] + ([annotation_plan_cache_key(app_id)] if app_id else [])
    with llm_config_snapshot(), cache_read_ahead(ahead):
        return _chat_turn_prepared(header, body, content_type, client_ip, context, user_agent, completion)


def _chat_turn_prepared(
    header: str | None, body: bytes, content_type: str | None, client_ip: str | None, context: AppContext | None,
    user_agent: str, completion: bool,
) -> tuple[ChatCall, ReplyPlan | None, Turn]:
    context = context or authenticate(header, client_ip=client_ip)
    payload = parse_json_body(body, content_type, strip_nul=CHAT_NUL_STRIPPED)
    try:
        call = chat_call_build(app=context.app, payload=payload, meter=context.meter, completion=completion,
                               audit={"source": "api", "ip_address": client_ip, "user_agent": user_agent})
        # A new query may be one an annotation answers (an approval's decision never is).
        plan = annotation_reply_plan(app=context.app) if call.request.approval is None else None
        # With files, their rows are written in the turn's transaction: a turn never exists without them.
        with transaction.atomic() if call.files else contextlib.nullcontext():
            turn = turn_prepare(call.request)
            if call.files:
                message_files_record(message_id=turn.message.pk, files=call.files)
    except DifyError:
        raise
    except Exception as exc:
        raise dify_error_from(exc, app=context.app) from exc
    return call, plan, turn


class ChatMessagesConsumer(DifyHttpConsumer):
    """POST /v1/chat-messages."""

    completion = False  # the completion-messages route: a completion app's single message, no conversation

    async def respond(self, body: bytes) -> None:
        # The run's checkpointer connects while the turn is prepared; the run closes it, or this does when the
        # request fails before the run.
        saver = SaverOpening()
        try:
            call, plan, turn = await prepared_or_abandoned(database_sync_to_async(_chat_turn)(
                header(self.scope, b"authorization"), body, header(self.scope, b"content-type"),
                scope_client_ip(self.scope), self.context,
                (header(self.scope, b"user-agent") or "")[:USER_AGENT_LIMIT], self.completion,
            ))
            try:
                reply = await annotation_reply_for(plan=plan, message=turn.message)
                if reply is not None:
                    await self.annotation_answer(turn, reply, saver, streaming=call.streaming)
                elif call.streaming:
                    await self.stream(turn, saver)
                else:
                    await self.blocking(turn, saver)
            except asyncio.CancelledError:
                # The client left, maybe before the run started (then nothing else closes its message).
                await asyncio.shield(turn_abandon(turn))
                raise
        finally:
            await asyncio.shield(saver.aclose())
        if turn.session_created and call.auto_generate_name and call.request.approval is None:
            _name_later(turn)

    async def stream(self, turn: Turn, saver: SaverOpening) -> None:
        await self.send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        with stream_active("dify"):
            await self._stream_events(turn, saver)
        await self.send({"type": "http.response.body", "body": b""})

    async def _stream_events(self, turn: Turn, saver: SaverOpening) -> None:
        dify = DifyTurn(mode=turn.session.app.mode)
        # Events and pings share the body: the lock keeps each write whole, and no ping follows the last event.
        lock = asyncio.Lock()
        ended = False
        pinger = asyncio.create_task(self._ping(lock, lambda: ended))
        try:
            async with contextlib.aclosing(turn_dify_events(turn, dify, saver=saver)) as events:
                async for data in events:
                    async with lock:
                        ended = data["event"] in TERMINAL_EVENTS
                        await self.send(
                            {"type": "http.response.body", "body": encode_event(data), "more_body": True}
                        )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The engine reports its faults as RunError; this is a dependency of ours gone (503) or a bug on our
            # side after the headers went out.
            failure = unexpected_error(exc)
            if failure is INTERNAL:
                logger.exception("Dify stream failed after it started")
                failure = DifyError(INTERNAL.code, STREAM_INTERNAL_MESSAGE, 500)
            error = {"event": "error", **dify.head, "status": failure.status, "code": failure.code,
                     "message": failure.message}
            async with lock:
                ended = True
                await self.send({"type": "http.response.body", "body": encode_event(error), "more_body": True})
        finally:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger

    async def annotation_answer(self, turn: Turn, reply: AnnotationReply, saver: SaverOpening, *,
                                streaming: bool) -> None:
        """The answer of an annotation (already recorded): no model call, so no run, pings or stop to hear."""
        await turn_remember_answer(turn, reply.answer, saver=saver)
        dify = DifyTurn(mode=turn.session.app.mode, annotation_reply=reply.metadata)
        events = annotation_reply_events(turn, reply.answer)
        if not streaming:
            for event in events[:-1]:
                dify.collect(event)
            await self.send_json(200, dify.blocking(events[-1]))
            return
        await self.send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        body = b"".join(encode_event(data) for data in map(dify.stream, events) if data is not None)
        await self.send({"type": "http.response.body", "body": body})

    async def _ping(self, lock: asyncio.Lock, ended) -> None:
        interval = settings.DIFY_PING_INTERVAL
        while True:
            await asyncio.sleep(interval)
            async with lock:
                if ended():
                    return
                await self.send({"type": "http.response.body", "body": PING, "more_body": True})

    async def blocking(self, turn: Turn, saver: SaverOpening) -> None:
        dify = DifyTurn(mode=turn.session.app.mode)
        async with contextlib.aclosing(turn_run(turn, saver=saver)) as events:
            async for event in events:
                if isinstance(event, RunError):
                    raise run_error_to_dify(event)
                if isinstance(event, RunEnd):
                    await self.send_json(200, dify.blocking(event))
                    return
                dify.collect(event)
        raise INTERNAL


def _name_later(turn: Turn) -> None:
    """Dify names a new conversation from its first exchange in the background, after the answer."""
    # Off the shared ORM thread: the generation waits on the model for up to its timeout.
    in_background(sync_to_async(conversation_auto_name, thread_sensitive=False)(session_id=turn.session.pk,
                                                                              meter=turn.meter))


class CompletionMessagesConsumer(ChatMessagesConsumer):
    """POST /v1/completion-messages: the chat pipeline for a completion app's single message."""

    completion = True


class ChatStopConsumer(DifyHttpConsumer):
    """POST /v1/chat-messages/{task_id}/stop: always `{"result": "success"}`, as Dify answers, once the route fits
    the app."""

    completion = False

    async def respond(self, body: bytes) -> None:
        context = await self.authenticate()
        user = user_from(self.payload(body).get("user"))
        app_mode_check(context.app, completion=self.completion)
        task_id = self.scope["url_route"]["kwargs"]["task_id"]
        try:
            task_uuid = uuid.UUID(task_id)
        except ValueError:
            task_uuid = None
        if task_uuid is not None:
            await run_stop(task_id=str(task_uuid), end_user=user, app_id=context.app.pk)
        await self.send_json(200, {"result": "success"})


class CompletionStopConsumer(ChatStopConsumer):
    """POST /v1/completion-messages/{task_id}/stop."""

    completion = True
