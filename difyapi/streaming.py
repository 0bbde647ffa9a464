"""What the Dify surface's ASGI consumers share (the chat stream, the followers of a resumed run, the OpenAI
surface): reading a request header from the scope, background work that outlives its request, and a turn's run as
Dify stream events, the pause of a waiting run included."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from agentcore.events import RunEnd
from agentcore.runs import SaverOpening, Turn, turn_run
from difyapi.events import DifyTurn
from difyapi.human_input import human_input_pause_events

# The events after which a Dify stream sends nothing more (a paused run's message_end included).
TERMINAL_EVENTS = frozenset({"message_end", "error"})
# Background work that outlives its request (conversation names, resumed runs); referenced so it is not
# garbage-collected.
_background: set[asyncio.Task] = set()


def header(scope: dict[str, Any], name: bytes) -> str | None:
    """The first value of request header `name` (lower case) in an ASGI scope."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def in_background(work: Coroutine[Any, Any, Any]) -> None:
    """Run `work` as its own task, past the end of the request that started it."""
    task = asyncio.create_task(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


async def turn_dify_events(turn: Turn, dify: DifyTurn, *, saver: SaverOpening | None = None
                           ) -> AsyncIterator[dict[str, Any]]:
    """Run `turn` and yield its events as the Dify stream shows them (`dify` keeps the stream's state). A run that
    pauses for approvals sends its Human Input events (human_input_required per form, then workflow_paused) before
    the message_end that lists them. Close it (contextlib.aclosing) to stop the run."""
    async with contextlib.aclosing(turn_run(turn, saver=saver)) as events:
        async for event in events:
            data = dify.stream(event)
            if data is None:
                continue
            if isinstance(event, RunEnd) and event.pending_approvals:
                for extra in await human_input_pause_events(dify=dify, end=event, app=turn.session.app,
                                                            end_user=turn.session.end_user):
                    yield extra
            yield data
