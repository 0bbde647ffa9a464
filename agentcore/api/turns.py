"""Driving a prepared turn (agentcore.runs.turn_prepare) from the REST API and the admin: drain it into one result
or encode it as server-sent events."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from asgiref.sync import async_to_sync

from agentcore.events import Event, RunEnd, RunError, RunStarted, TextDelta, Usage, event_to_dict
from agentcore.runs import UNAVAILABLE, Turn, turn_run
from opsagent.common.dependencies import dependency_down
from opsagent.common.metrics import stream_active


class TurnResult:
    """Folds a run's events into the blocking answer (`as_dict()`), and knows the closing `end` event of a run."""

    def __init__(self, turn: Turn):
        self.session_id = str(turn.session.id)
        self.message_id = str(turn.message.id)
        self.task_id = str(turn.message.task_id)
        self.deltas: list[str] = []
        self.answer: str | None = None
        self.status = "running"
        self.pending_approvals: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, str] | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.message_id, self.task_id = event.message_id, event.task_id
        elif isinstance(event, TextDelta):
            self.deltas.append(event.text)
        elif isinstance(event, Usage):
            self.usage = _payload(event)
        elif isinstance(event, RunEnd):
            self.status, self.answer, self.pending_approvals = event.status, event.answer, event.pending_approvals
        elif isinstance(event, RunError):
            self.status = "error"
            self.error = {"category": event.category, "message": event.message}

    def end_event(self) -> dict[str, Any]:
        """The `end` a client gets after an `error` event, so that every stream finishes with `end`."""
        return {"type": "end", "message_id": self.message_id, "status": self.status, "answer": self.text(),
                "pending_approvals": []}

    def text(self) -> str:
        return self.answer if self.answer is not None else "".join(self.deltas)

    def as_dict(self) -> dict[str, Any]:
        result = {
            "session_id": self.session_id,
            "message_id": self.message_id,
            "task_id": self.task_id,
            "answer": self.text(),
            "status": self.status,
            "pending_approvals": self.pending_approvals,
            "usage": self.usage,
        }
        if self.error:
            result["error"] = self.error
        return result


async def aturn_drain(turn: Turn) -> TurnResult:
    result = TurnResult(turn)
    async with aclosing(turn_run(turn)) as events:
        async for event in events:
            result.add(event)
    return result


def turn_drain(turn: Turn) -> TurnResult:
    return async_to_sync(aturn_drain)(turn)


async def turn_event_messages(turn: Turn) -> AsyncIterator[dict[str, Any]]:
    """The run's events as JSON-ready dicts, closed by an `end` event even when the run failed."""
    result = TurnResult(turn)
    try:
        # aclosing: when the client goes away, the cancellation reaches turn_run's cleanup (partial answer saved).
        async with aclosing(turn_run(turn)) as events:
            async for event in events:
                result.add(event)
                yield event_to_dict(event)
    except Exception as exc:
        # A dependency of ours lost after the answer began (its end could not be saved): an error event, as for a
        # run that failed, instead of a stream cut short.
        failure = dependency_down(exc)
        if failure is None:
            raise
        error = RunError(category=UNAVAILABLE, message=failure.message, status_code=503)
        result.add(error)
        yield event_to_dict(error)
    if result.error:
        yield result.end_event()


async def turn_sse(turn: Turn) -> AsyncIterator[str]:
    """Server-sent events: one JSON event per `data:` line."""
    with stream_active("rest"):
        async for message in turn_event_messages(turn):
            yield f"data: {json.dumps(message, ensure_ascii=False)}\n\n"


def _payload(event: Event) -> dict[str, Any]:
    data = event_to_dict(event)
    data.pop("type")
    return data
