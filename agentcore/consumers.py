"""The agent's WebSocket: one session's live turns (chat, approval decisions, stop) streamed as JSON messages."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from agentcore import selectors
from agentcore.api.serializers import TurnSerializer
from agentcore.api.turns import turn_event_messages
from agentcore.errors import SessionNotFound
from agentcore.runs import ApprovalDecision, TurnRequest, aturn_prepare, run_stop, turn_abandon
from opsagent.common.api_errors import client_field
from opsagent.common.client_input import ClientInputError, json_loads
from opsagent.common.clients import USER_AGENT_LIMIT, scope_client_ip
from opsagent.common.dependencies import dependency_down
from opsagent.common.errors import ServiceError
from opsagent.common.metrics import stream_active
from opsagent.common.request_log import RequestRecord

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_SESSION_NOT_FOUND = 4404
SWITCHING_PROTOCOLS = 101


class SessionConsumer(AsyncJsonWebsocketConsumer):
    """Runs each turn in its own asyncio task so that `stop` and a disconnect are seen while the answer streams."""

    # A run listens on its own stop group; the socket needs no channel of its own, so it keeps working (and says
    # why a turn cannot start) while Redis is down.
    channel_layer_alias = None

    async def connect(self):
        self.user = self.scope.get("user")
        self.session = None
        self.run_task: asyncio.Task | None = None
        self.task_id: str | None = None
        self.run_started = asyncio.Event()
        self.run_ended = False  # the run's end went out; its task may still be finishing
        # Accept before closing: a close sent during the handshake reaches the client as a bare HTTP 403, without
        # the code that tells it why.
        await self.accept()
        if not (self.user and self.user.is_authenticated):
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        try:
            # The socket is for chatting: someone else's session needs agentcore.change_session.
            self.session = await database_sync_to_async(selectors.session_get_for)(
                session_id=self.scope["url_route"]["kwargs"]["session_id"], owner=self.user)
        except SessionNotFound:
            await self.close(code=CLOSE_SESSION_NOT_FOUND)

    async def disconnect(self, code):
        if self.run_task and not self.run_task.done():
            # Cancelling reaches turn_run's cleanup, which saves the partial answer as "stopped".
            self.run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.run_task

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        try:
            content = json_loads(text_data or bytes_data or "")
        except ClientInputError as exc:
            fields = {exc.field: [exc.message]} if exc.field else None
            await self._error("invalid_input", exc.message, fields=fields)
            return
        except ValueError:
            await self._error("invalid_json", "Messages must be JSON objects.")
            return
        if not isinstance(content, dict):
            await self._error("invalid_json", "Messages must be JSON objects.")
            return
        await self.receive_json(content)

    async def receive_json(self, content: dict[str, Any], **kwargs):
        if self.session is None:  # refused in connect; the close is on its way
            return
        handler = {"chat": self._chat, "approval": self._approval, "stop": self._stop}.get(content.get("type"))
        if handler is None:
            await self._error("unknown_type", 'Send "chat", "approval" or "stop" as the message type.')
            return
        await handler(content)

    async def _chat(self, content: dict[str, Any]) -> None:
        serializer = TurnSerializer(data=content)
        if not serializer.is_valid():
            await self._error("invalid_input", "The chat message is invalid.", fields=serializer.errors)
            return
        await self._start(self._request(query=serializer.validated_data["message"],
                                        inputs=serializer.validated_data["inputs"],
                                        overrides=serializer.overrides()))

    async def _approval(self, content: dict[str, Any]) -> None:
        approval_id, decision = content.get("id"), content.get("decision")
        if not isinstance(approval_id, str) or decision not in ("approve", "reject"):
            await self._error("invalid_input", 'An approval needs "id" and "decision": "approve" or "reject".')
            return
        comment = content.get("comment") or ""
        if not isinstance(comment, str):
            await self._error("invalid_input", '"comment" must be a string.')
            return
        await self._start(self._request(
            approval=ApprovalDecision(approval_id=approval_id, decision=decision, comment=comment,
                                      audit=self._audit_context())
        ))

    def _audit_context(self) -> dict:
        agent = next((value.decode("latin-1") for name, value in self.scope.get("headers", [])
                      if name.lower() == b"user-agent"), "")
        return {"source": "websocket", "ip_address": scope_client_ip(self.scope),
                "user_agent": agent[:USER_AGENT_LIMIT]}

    async def _stop(self, content: dict[str, Any]) -> None:
        if not (self.run_task and not self.run_task.done()):
            await self._error("not_running", "No answer is being generated.")
            return
        # A run being prepared has no task id yet (that takes milliseconds): wait for it rather than cancel the
        # preparation, which would leave its message "running" until the stale-run sweep.
        started = asyncio.create_task(self.run_started.wait())
        await asyncio.wait([started, self.run_task], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        # Through the run service, so the engine ends the run with its own "stopped" end event.
        if self.task_id and await run_stop(task_id=self.task_id, user=self.user):
            return
        if not self.run_task.done():
            self.run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.run_task
            await self.send_json({"type": "end", "status": "stopped"})

    def _request(self, **fields) -> TurnRequest:
        return TurnRequest(app=self.session.app, session_id=str(self.session.id), owner=self.user,
                           source=self.session.source, end_user=self.session.end_user, **fields)

    async def _start(self, request: TurnRequest) -> None:
        if self.run_task and not self.run_task.done():
            if not self.run_ended:
                await self._error("run_in_progress", "Wait for the current answer to end, or stop it.")
                return
            await asyncio.wait([self.run_task])  # only its last steps are left: the client saw the end
        self.run_started.clear()
        self.run_ended = False
        self.run_task = asyncio.create_task(self._run(request))

    async def _run(self, request: TurnRequest) -> None:
        # Each turn has its own request log line (the socket's status, 101, and the turn's outcome); this task's
        # context carries it to the run, which fills in its config and timings.
        record = RequestRecord(surface="websocket", method="WEBSOCKET", path=self.scope.get("path", ""),
                               status=SWITCHING_PROTOCOLS).begin()
        try:
            await self._run_turn(request, record)
        finally:
            record.write()

    async def _run_turn(self, request: TurnRequest, record: RequestRecord) -> None:
        try:
            turn = await aturn_prepare(request)
        except ServiceError as exc:
            field = client_field(exc)
            fields = {field: [exc.message]} if field else None
            record.outcome = exc.code
            await self._error(exc.code, exc.message, fields=fields)
            return
        except Exception as exc:
            # The socket outlives a fault in one turn: the client is told, the details go to the log only.
            failure = dependency_down(exc)
            if failure is not None:
                record.outcome = "service_unavailable"
                await self._error("service_unavailable", failure.message)
                return
            logger.exception("agent turn could not start (session %s)", self.session.id)
            record.outcome = "internal"
            await self._error("internal", "The answer could not be started.")
            return
        try:
            # aclosing: a cancel that lands while a message is being sent still closes the run here and now, so its
            # partial answer is saved before the disconnect handler returns.
            with stream_active("websocket"):
                async with contextlib.aclosing(turn_event_messages(turn)) as messages:
                    async for message in messages:
                        if message["type"] == "run_started":
                            self.task_id = message["task_id"]
                            self.run_started.set()
                        await self.send_json(_ws_message(message))
                        if message["type"] == "end":
                            self.run_ended = True
        except asyncio.CancelledError:
            # The socket closed, maybe before the run started (then nothing else closes its message).
            await asyncio.shield(turn_abandon(turn))
            raise
        finally:
            self.task_id = None

    async def _error(self, code: str, message: str, *, fields: dict | None = None) -> None:
        payload = {"type": "error", "code": code, "message": message}
        if fields:
            payload["fields"] = fields
        await self.send_json(payload)


def _ws_message(message: dict[str, Any]) -> dict[str, Any]:
    """The WebSocket's names for run events: `delta` carries `delta`, a tool's observation is a `tool_result`."""
    if message["type"] == "delta":
        return {"type": "delta", "delta": message["text"], "position": message["position"]}
    if message["type"] == "thought" and message["phase"] == "tool_result":
        return {**message, "type": "tool_result"}
    return message
