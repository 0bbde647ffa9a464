"""The Human Input endpoints as Channels consumers (SPEC.md "choices and extensions"): GET/POST
/v1/form/human_input/{form_token}, and GET /v1/workflow/{workflow_run_id}/events, which follows a run resumed by a
form. A run's workflow_run_id is its message's task id (the same id the stream and stop use).

A form's answer resumes the run in the background on the worker that took it: its events go to a channel-layer group
(live followers on any worker) and to a replay buffer in the cache (a follower that connects late, or again, gets the
resumed run from its start). A follower leaving does not stop the run; POST .../stop with the task id does."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.cache import cache

from agentcore.events import RunError
from agentcore.models import AgentApp, Message, Session
from agentcore.services import message_close_stale
from difyapi.consumers import DifyHttpConsumer
from difyapi.errors import INTERNAL, DifyError, not_found, unexpected_error
from difyapi.events import STREAM_INTERNAL_MESSAGE, DifyTurn, run_error_to_dify
from difyapi.human_input import (
    FormSubmission,
    form_answer_from,
    human_input_form_get,
    human_input_form_submit,
)
from difyapi.presenters import message_metadata, usage_to_dify
from difyapi.sse import HEADERS, PING, encode_event
from difyapi.streaming import TERMINAL_EVENTS, header, in_background, turn_dify_events
from difyapi.validation import bool_from, user_from
from opsagent.common.clients import USER_AGENT_LIMIT, scope_client_ip
from opsagent.common.dependencies import dependency_down
from opsagent.common.metrics import stream_active

logger = logging.getLogger(__name__)

RUN_NOT_FOUND = not_found("Workflow run not found")
EVENT_TYPE = "dify.workflow.event"


def events_group(task_id: Any) -> str:
    return f"dify-workflow-{uuid.UUID(str(task_id)).hex}"


# ----- the replay buffer -----

class EventBuffer:
    """The events of a run's latest resume, in the cache: `<prefix>:n` counts them (atomic increments, so event
    numbers never repeat across resumes), `<prefix>:start` is the first of the latest resume, `<prefix>:<n>` each
    event. Losing the cache (Redis gone) loses the replay only; live followers still get every event."""

    def __init__(self, task_id: Any):
        self.prefix = f"dify-workflow:{uuid.UUID(str(task_id)).hex}"
        self.ttl = settings.DIFY_WORKFLOW_EVENTS_TTL

    async def begin(self) -> None:
        await cache.aadd(f"{self.prefix}:n", 0, self.ttl)
        count = await cache.aget(f"{self.prefix}:n") or 0
        await cache.aset(f"{self.prefix}:start", count + 1, self.ttl)

    async def append(self, data: dict[str, Any]) -> int:
        try:
            seq = await cache.aincr(f"{self.prefix}:n")
        except ValueError:  # the counter expired meanwhile
            await cache.aadd(f"{self.prefix}:n", 0, self.ttl)
            seq = await cache.aincr(f"{self.prefix}:n")
        await cache.aset(f"{self.prefix}:{seq}", data, self.ttl)
        return seq

    async def read(self, *, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """The latest resume's events after number `after`, up to the first one not (yet) stored."""
        bounds = await cache.aget_many([f"{self.prefix}:start", f"{self.prefix}:n"])
        start, count = bounds.get(f"{self.prefix}:start"), bounds.get(f"{self.prefix}:n")
        if not start or not count:
            return []
        first = max(start, after + 1)
        keys = [f"{self.prefix}:{seq}" for seq in range(first, count + 1)]
        stored = await cache.aget_many(keys) if keys else {}
        events = []
        for seq in range(first, count + 1):
            data = stored.get(f"{self.prefix}:{seq}")
            if data is None:
                break  # written by the run in a moment; it reaches a follower live
            events.append((seq, data))
        return events


async def _safely(work, what: str, task_id: Any):
    try:
        return await work
    except Exception as exc:
        if dependency_down(exc) is None:
            raise
        logger.warning("%s of run %s failed: %s", what, task_id, exc)
        return None


# ----- the resumed run -----

async def resumed_run_publish(submission: FormSubmission) -> None:
    """Run the turn a form's answer resumed, publishing its Dify events (human_input_form_filled first)."""
    turn = submission.turn
    task_id = str(turn.message.task_id)
    buffer = EventBuffer(task_id)
    layer = get_channel_layer()
    group = events_group(task_id)
    dify = DifyTurn(mode=turn.session.app.mode)
    head = {"conversation_id": str(turn.session.pk), "message_id": str(turn.message.pk),
            "created_at": int(turn.message.created_at.timestamp())}

    async def publish(data: dict[str, Any]) -> None:
        seq = await _safely(buffer.append(data), "replay buffer", task_id)
        if layer is not None:
            await _safely(layer.group_send(group, {"type": EVENT_TYPE, "seq": seq or 0, "data": data}),
                          "publishing", task_id)

    await _safely(buffer.begin(), "replay buffer", task_id)
    await publish({"event": "human_input_form_filled", **head, "task_id": task_id, "workflow_run_id": task_id,
                   "data": submission.filled})
    try:
        async with contextlib.aclosing(turn_dify_events(turn, dify)) as events:
            async for data in events:
                await publish(data)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        failure = unexpected_error(exc)
        if failure is INTERNAL:
            logger.exception("resumed run %s failed", task_id)
            failure = DifyError(INTERNAL.code, STREAM_INTERNAL_MESSAGE, 500)
        await publish({"event": "error", **head, "status": failure.status, "code": failure.code,
                       "message": failure.message})


# ----- the consumers -----

def _query(scope: dict[str, Any]) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    return {name: values[-1] for name, values in parse_qs(raw, keep_blank_values=True).items()}


class HumanInputFormConsumer(DifyHttpConsumer):
    """GET /v1/form/human_input/{form_token}: the form; POST: its answer (`{}`), which resumes the run."""

    methods = ("GET", "POST")

    def log_path(self) -> str:
        return "/v1/form/human_input/<form_token>"  # the token answers the form: never in a log

    async def respond(self, body: bytes) -> None:
        context = await self.authenticate()
        token = self.scope["url_route"]["kwargs"]["form_token"]
        if self.scope.get("method") == "GET":
            form = await database_sync_to_async(human_input_form_get)(app=context.app, token=token)
            await self.send_json(200, form)
            return
        answer = form_answer_from(self.payload(body))
        audit = {"source": "api", "ip_address": scope_client_ip(self.scope),
                 "user_agent": (header(self.scope, b"user-agent") or "")[:USER_AGENT_LIMIT]}
        submission = await database_sync_to_async(human_input_form_submit)(
            app=context.app, token=token, answer=answer, audit=audit)
        # The run goes on without this request: whoever follows GET /v1/workflow/{id}/events sees it.
        in_background(resumed_run_publish(submission))
        await self.send_json(200, {})


def workflow_run_get(*, app: AgentApp, user: str, workflow_run_id: Any) -> Message:
    """The message whose task id is `workflow_run_id`, in a conversation of this app and end user."""
    try:
        task_id = uuid.UUID(str(workflow_run_id))
    except ValueError:
        raise RUN_NOT_FOUND from None
    message = (Message.objects.select_related("session")
               .filter(task_id=task_id, session__app=app, session__end_user=user, session__source=Session.Source.API,
                       session__is_deleted=False).first())
    if message is None:
        raise RUN_NOT_FOUND
    return message


def _message_end(message: Message) -> dict[str, Any]:
    """A finished run's `message_end`, from its row (what a follower gets when there is nothing to replay)."""
    usage = usage_to_dify(prompt_tokens=message.prompt_tokens, completion_tokens=message.completion_tokens,
                          latency=message.latency)
    return {"event": "message_end", "conversation_id": str(message.session_id), "message_id": str(message.pk),
            "created_at": int(message.created_at.timestamp()), "task_id": str(message.task_id),
            "id": str(message.pk), "metadata": message_metadata(usage), "files": None}


def _final_event(message: Message) -> dict[str, Any]:
    """How a finished run ends a stream, from its row: `message_end`, or the `error` of a run that failed."""
    if message.status != Message.Status.ERROR:
        return _message_end(message)
    error = run_error_to_dify(RunError(category=message.error_category or "internal", message=message.error))
    return {"event": "error", "conversation_id": str(message.session_id), "message_id": str(message.pk),
            "created_at": int(message.created_at.timestamp()), "status": error.status, "code": error.code,
            "message": error.message}


@database_sync_to_async
def _current(message: Message) -> Message | None:
    """The run's row now; a run whose process died (no heartbeat) is closed first, as the stale-run sweep would."""
    message_close_stale(session=message.session)
    return Message.objects.filter(pk=message.pk).first()


FINISHED = frozenset({Message.Status.NORMAL, Message.Status.STOPPED, Message.Status.ERROR})


class WorkflowEventsConsumer(DifyHttpConsumer):
    """GET /v1/workflow/{workflow_run_id}/events?user=...[&continue_on_pause=true] (SSE)."""

    methods = ("GET",)

    async def respond(self, body: bytes) -> None:
        context = await self.authenticate()
        query = _query(self.scope)
        user = user_from(query.get("user"))
        self.continue_on_pause = bool_from(query.get("continue_on_pause"), field="continue_on_pause", default=False)
        message = await database_sync_to_async(workflow_run_get)(
            app=context.app, user=user, workflow_run_id=self.scope["url_route"]["kwargs"]["workflow_run_id"])
        task_id = message.task_id
        layer = get_channel_layer()
        channel = await layer.new_channel()
        # Subscribed before the replay is read: an event is then either replayed or received (or both: numbered).
        await layer.group_add(events_group(task_id), channel)
        try:
            await self.send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            # A server may hold the headers back until the body starts (daphne does), and the next event may be a
            # form's answer away: a ping now tells the client the stream is open.
            await self.send({"type": "http.response.body", "body": PING, "more_body": True})
            try:
                with stream_active(self.surface):  # a follower is a stream too (until its run ends or it leaves)
                    await self._follow(layer, channel, message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # after the headers: one error event ends the stream
                failure = unexpected_error(exc)
                if failure is INTERNAL:
                    logger.exception("following run %s failed", task_id)
                    failure = DifyError(INTERNAL.code, STREAM_INTERNAL_MESSAGE, 500)
                await self._emit({"event": "error", "status": failure.status, "code": failure.code,
                                  "message": failure.message})
        finally:
            await asyncio.shield(_safely(layer.group_discard(events_group(task_id), channel), "leaving",
                                         task_id))
        await self.send({"type": "http.response.body", "body": b""})

    def _ends(self, data: dict[str, Any]) -> bool:
        if data.get("event") not in TERMINAL_EVENTS:
            return False
        paused = data["event"] == "message_end" and "pending_approvals" in (data.get("metadata") or {})
        return not (paused and self.continue_on_pause)

    async def _emit(self, data: dict[str, Any]) -> bool:
        await self.send({"type": "http.response.body", "body": encode_event(data), "more_body": True})
        return self._ends(data)

    async def _follow(self, layer, channel: str, message: Message) -> None:
        buffer = EventBuffer(message.task_id)
        last = 0
        for seq, data in await _safely(buffer.read(), "replay", message.task_id) or []:
            last = seq
            if await self._emit(data):
                return
        if not last and message.status in FINISHED:
            await self._emit(_final_event(message))
            return
        # Running or paused: what comes next arrives live. A run that ends without publishing (resumed through the
        # `approval` field, or its worker gone) is noticed between pings.
        while True:
            try:
                received = await asyncio.wait_for(layer.receive(channel), timeout=settings.DIFY_PING_INTERVAL)
            except TimeoutError:
                if await self._ended_quietly(buffer, message, last):
                    return
                await self.send({"type": "http.response.body", "body": PING, "more_body": True})
                continue
            seq = received.get("seq") or 0
            if received.get("type") != EVENT_TYPE or (seq and seq <= last):
                continue
            if seq > last + 1:
                # Events this channel did not get (a full channel drops them) or that came before it joined: from
                # the buffer, in order.
                for missed, data in await _safely(buffer.read(after=last), "replay", message.task_id) or []:
                    if missed >= seq:
                        break
                    last = missed
                    if await self._emit(data):
                        return
            last = seq or last
            if await self._emit(received["data"]):
                return

    async def _ended_quietly(self, buffer: EventBuffer, message: Message, last: int) -> bool:
        current = await _current(message)
        if current is None:
            await self._emit(RUN_NOT_FOUND.payload() | {"event": "error"})
            return True
        if current.status not in FINISHED:
            return False
        for _seq, data in await _safely(buffer.read(after=last), "replay", message.task_id) or []:
            if await self._emit(data):
                return True
        await self._emit(_final_event(current))
        return True
