"""A turn answered without a model call (a stock answer chosen by the caller, e.g. a Dify annotation reply): the
exchange is written to the conversation's checkpoint, so the model sees it in the history of the next turns."""
from __future__ import annotations

import logging

from langchain_core.messages import AIMessage, HumanMessage

from agentcore.checkpoint import SaverOpening, checkpoint_prune, checkpointer
from agentcore.graph import agent_graph
from agentcore.runs.types import Turn

logger = logging.getLogger(__name__)


async def turn_remember_answer(turn: Turn, answer: str, *, saver: SaverOpening | None = None) -> bool:
    """Add the turn's query and `answer` to its conversation's memory (the message row already holds them). False,
    with a warning logged, when the checkpoint could not be written: the answer stands, the model will not see it."""
    thread_id = str(turn.session.pk)
    try:
        async with saver.use() if saver is not None else checkpointer() as opened:
            graph = agent_graph(checkpointer=opened)
            exchange = [HumanMessage(content=turn.message.query, id=str(turn.message.pk)), AIMessage(content=answer)]
            # Written as by the graph's "limit" node, whose only edge leads to END: the conversation is left with
            # nothing to run next, as after any answered turn ("model" would run its router, which needs a run).
            await graph.aupdate_state({"configurable": {"thread_id": thread_id}},
                                      {"messages": exchange, "iterations": 0}, as_node="limit")
    except Exception as exc:  # noqa: BLE001 - memory is a convenience here; the answer is saved and sent
        logger.warning("direct answer of message %s not added to the conversation's memory: %s",
                       turn.message.pk, type(exc).__name__)
        return False
    await checkpoint_prune(thread_id=thread_id)
    return True
