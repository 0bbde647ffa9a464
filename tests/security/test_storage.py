"""Issue 15, item 10 (quadratic storage): a long conversation must not store its whole history again at every turn.
Before the fix, 60 follow-ups of 99k characters added 189 MB. Here a conversation of a few hundred turns runs
through the engine (chat mode, the fake upstream) and the checkpoint bytes it stores are measured as it grows."""
from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from agentcore.checkpoint import checkpoint_pools_close
from agentcore.models import AgentApp, Message
from agentcore.runs import TurnRequest
from agentcore.selectors import checkpoint_storage_bytes
from agentcore.tests.factories import checkpoint_rows, run_all

pytestmark = pytest.mark.django_db(transaction=True)

TURNS = 200
QUERY = "Is the disk on web-1 filling up again? " * 12  # about 470 characters per question


@pytest.fixture
def chat_app(default_llm_config, settings):
    # A small window, so that the conversation outgrows it early and most turns run with a full one; the loop's
    # checkpoint connections are shared between its runs, as in a server.
    settings.AGENT_HISTORY_MAX_MESSAGES = 20
    settings.AGENT_CHECKPOINT_POOL_SIZE = 1
    return AgentApp.objects.create(name="Chat", mode=AgentApp.Mode.CHAT, system_prompt="Answer briefly.")


async def test_a_long_conversation_stores_checkpoints_that_grow_linearly_not_quadratically(chat_app, plain_user,
                                                                                          fake_upstream):
    stored = database_sync_to_async(checkpoint_storage_bytes)
    session_id = None
    sizes = {}
    try:
        for turn in range(1, TURNS + 1):
            events = await run_all(TurnRequest(app=chat_app, query=f"{turn}: {QUERY}", owner=plain_user,
                                               session_id=session_id))
            assert events[-1].status == "normal", events[-1]
            session_id = events[0].session_id
            if turn in (1, TURNS // 2, TURNS):
                sizes[turn] = await stored(thread_id=session_id)
    finally:
        await checkpoint_pools_close()
    first_half = sizes[TURNS // 2] - sizes[1]
    second_half = sizes[TURNS] - sizes[TURNS // 2]
    # Quadratic storage (every checkpoint holding the history up to it) makes the second hundred turns add about
    # three times what the first hundred did, and the total about four times the size at the half.
    assert second_half <= 1.5 * max(first_half, sizes[1]), sizes
    assert sizes[TURNS] <= 2 * 1.5 * sizes[TURNS // 2], sizes
    # Bounded, in fact: the conversation outgrew its window long before the half, and from there on it keeps one
    # checkpoint holding the window, however long it grows ...
    assert sizes[TURNS] <= 1.2 * sizes[TURNS // 2], sizes
    assert (await checkpoint_rows(session_id))[0] == 1
    # ... while the history clients read keeps every turn.
    assert await Message.objects.filter(session_id=session_id).acount() == TURNS
