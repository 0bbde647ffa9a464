"""What a run says and does, as it happens: the graph's output becomes thought rows and neutral events, and the
turn's end is saved (answer, status, token usage and cost)."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.utils import timezone
from langchain_core.messages import AIMessage, ToolMessage

from agentcore.checkpoint import checkpointer
from agentcore.events import ApprovalRequired, Event, RunEnd, RunError, TextDelta, ThoughtUpdate, Usage
from agentcore.graph import agent_graph
from agentcore.limits import usage_record
from agentcore.models import AgentApp, Approval, Message, Thought
from agentcore.runs.types import Turn
from llmconfigs.errors import ProviderCallError
from llmconfigs.factory import Delta, provider_error
from llmconfigs.pricing import usage_cost
from llmconfigs.routing import PoolChatModel
from llmconfigs.services import llm_config_record_usage
from llmconfigs.usage import CallOrigin, provider_calls_record
from opsagent.common.db.statements import instance_insert, instances_insert, row_update, statements_together
from opsagent.common.dependencies import dependency_down
from opsagent.common.metrics import chat_request_observe

logger = logging.getLogger(__name__)

INTERNAL_ERROR = "The agent failed unexpectedly; the error was logged."
# The RunError category of a run that lost a dependency of ours (the database, Redis): a 503 for the client.
UNAVAILABLE = "unavailable"


@dataclass
class _Iteration:
    thought_id: str
    position: int
    text: str = ""


class RunOutput:
    """The record of one run: the model's chunks (`on_delta`) and the graph's steps (`on_update`) go in, thought
    rows are written and events are put on `queue` as it goes, and one of the `save_*` methods writes the turn's
    end."""

    def __init__(self, turn: Turn, queue: asyncio.Queue):
        self.queue = queue
        self.session = turn.session
        self.message = turn.message
        self.config = turn.config
        self.meter = turn.meter
        self.agent = self.session.app.mode == AgentApp.Mode.AGENT_CHAT
        self.texts: list[str] = [turn.message.answer] if turn.message.answer else []
        self.iteration: _Iteration | None = None
        self.position = 0
        # The run's tool call rows by call id, as written (or loaded when a paused run resumes): what a tool's result
        # or an approval's wait changes in one of them is written to it, and its event is made from it, without
        # reading the row back.
        self.thoughts_by_call: dict[str, Thought] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.interrupts: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.finished = False
        self.model: PoolChatModel | None = None  # the run's model, once it has one: its calls and who answered
        self.partial_kept = False  # a stopped or failed answer was added to the conversation's checkpoint
        self.answer_thought: Thought | None = None  # an agent's answer, written with the turn's end

    # -- the graph's output --
    async def on_delta(self, delta: Delta) -> None:
        """A chunk of the model's answer, read without LangChain's chunk objects (llmconfigs.factory.Delta)."""
        self.prompt_tokens += delta.prompt_tokens
        self.completion_tokens += delta.completion_tokens
        await self.on_text(delta.text)

    async def on_text(self, text: str) -> None:
        if not text:
            return
        first = self.first_token is None
        if first:
            self.first_token = time.monotonic()
        iteration = self._current_iteration()
        iteration.text += text
        # Chunks that arrived together are all parsed (tens of microseconds each) before the consumer's turn, which
        # takes them as one delta (agentcore.runs.lifecycle._EventQueue): one write instead of one per chunk. The
        # first token goes out at once, before the chunks that came with it are parsed.
        self.queue.put_nowait(TextDelta(text=text, position=iteration.position))
        if first:
            await asyncio.sleep(0)

    def _current_iteration(self) -> _Iteration:
        if self.iteration is None:
            self.position += 1
            self.iteration = _Iteration(thought_id=str(uuid.uuid4()), position=self.position)
            if self.agent:
                self.queue.put_nowait(ThoughtUpdate(thought_id=self.iteration.thought_id, position=self.position,
                                                    phase="start", status="running"))
        return self.iteration

    async def on_update(self, update: dict[str, Any]) -> None:
        for node, value in update.items():
            if node == "__interrupt__":
                await self._on_interrupts(value)
            elif node == "model" and value:
                await self._on_model_message(value["messages"][-1])
            elif node in ("tools", "limit") and value:
                await self._on_tool_results(value["messages"])

    async def _on_model_message(self, message: AIMessage) -> None:
        iteration = self._current_iteration()
        self.iteration = None
        text = iteration.text or (message.text if isinstance(message.text, str) else message.text())
        if text:
            self.texts.append(text)
        if not self.agent:
            return
        if not message.tool_calls:
            # The answer ends the run (nothing is scheduled after a step without tool calls): its row is written
            # with the turn's end, in the same transaction (_save_rows), one database round trip fewer per turn.
            self.answer_thought = Thought(id=iteration.thought_id, message=self.message, position=iteration.position,
                                          thought=text, status=Thought.Status.DONE)
            self.queue.put_nowait(ThoughtUpdate(thought_id=iteration.thought_id, position=iteration.position,
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
            self.thoughts_by_call[call["id"]] = row
        # One INSERT, prepared once per shape: bulk_create would compile it on every step and wrap it in a
        # transaction of its own (BEGIN and COMMIT around a statement that is atomic by itself).
        await sync_to_async(instances_insert)(rows)
        for row in rows:
            self.queue.put_nowait(ThoughtUpdate(thought_id=str(row.id), position=row.position, phase="tool_call",
                                                thought=row.thought, tool=row.tool, tool_input=row.tool_input,
                                                status=row.status))

    async def _on_tool_results(self, messages: list[ToolMessage]) -> None:
        if not self.agent:
            return
        results = []
        for result in messages:
            thought = self.thoughts_by_call.get(result.tool_call_id)
            if thought is None:
                continue
            status = (result.artifact or {}).get("status", Thought.Status.DONE)
            observation = result.content if isinstance(result.content, str) else str(result.content)
            results.append((thought, observation, status))
        if not results:
            return
        # The step's results in one database round trip (one statement on PostgreSQL), before any of their events.
        await sync_to_async(_tool_results_write)(results)
        for thought, observation, status in results:
            thought.observation, thought.status = observation, status
            self.queue.put_nowait(ThoughtUpdate(thought_id=str(thought.pk), position=thought.position,
                                                phase="tool_result", thought=thought.thought, tool=thought.tool,
                                                tool_input=thought.tool_input, observation=observation,
                                                status=status))

    async def _on_interrupts(self, interrupts: Any) -> None:
        for item in interrupts:
            value = dict(item.value)
            thought = self.thoughts_by_call.get(value["tool_call_id"])
            thought_id = str(thought.pk) if thought is not None else None
            approval = await Approval.objects.acreate(
                session=self.session, message=self.message, thought_id=thought_id, tool=value["tool"],
                tool_call_id=value["tool_call_id"], tool_input=value["tool_input"], approver=value["approver"],
            )
            value["approval_id"] = str(approval.pk)
            self.interrupts.append(value)
            if thought is not None:
                await Thought.objects.filter(pk=thought.pk).aupdate(status=Thought.Status.AWAITING_APPROVAL)
                thought.status = Thought.Status.AWAITING_APPROVAL
                self.queue.put_nowait(ThoughtUpdate(thought_id=thought_id, position=thought.position,
                                                    phase="awaiting_approval", thought=thought.thought,
                                                    tool=thought.tool, tool_input=thought.tool_input,
                                                    status=thought.status))
            self.queue.put_nowait(ApprovalRequired(approval_id=str(approval.pk), thought_id=thought_id or "",
                                                   tool=value["tool"], tool_input=value["tool_input"],
                                                   approver=value["approver"]))

    async def load_thoughts(self) -> None:
        rows = [t async for t in Thought.objects.filter(message=self.message).order_by("position")]
        self.thoughts_by_call = {t.tool_call_id: t for t in rows if t.tool_call_id}
        self.position = max((t.position for t in rows), default=0)

    # -- the end --
    def answer(self) -> str:
        parts = list(self.texts)
        if self.iteration is not None and self.iteration.text:
            parts.append(self.iteration.text)  # the iteration cut short by a stop or an error
        return "\n".join(p for p in parts if p)

    async def _save(self, status: str, *, error: str = "", category: str = "") -> Usage:
        self.finished = True
        ended = time.monotonic()
        if self.model is not None:
            await self.model.settle()
        served = self.model.served if self.model is not None else None
        if served is not None:  # its prices make the cost, and the message names it
            self.config = served
        cost = usage_cost(
            input_price_per_million=self.config.input_price_per_million,
            output_price_per_million=self.config.output_price_per_million,
            currency=self.config.currency, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
        )
        latency = ended - self.started
        ttft = self.first_token - self.started if self.first_token is not None else None
        generate = ended - self.first_token if self.first_token is not None else None
        values = dict(
            answer=self.answer(), status=status, error=error, error_category=category, heartbeat_at=None,
            currency=cost.currency, latency=latency, time_to_first_token=ttft, time_to_generate=generate,
            updated_at=timezone.now(),
        )
        # Added to what the row holds: a turn resumed after an approval adds its calls to the paused part's.
        increments = dict(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens, prompt_price=cost.prompt_price,
            completion_price=cost.completion_price, total_price=cost.total_price,
        )
        if self.model is not None and self.model.attempts:
            values.update(attempts=[*self.message.attempts, *self.model.attempts])
            if served is not None:
                values.update(llm_config_id=served.pk, model_name=served.model_name)
        called = bool(self.prompt_tokens or self.completion_tokens or self.first_token is not None)
        # database_sync_to_async also closes the worker thread's connection (CONN_MAX_AGE=0) once the run is over.
        await database_sync_to_async(self._save_rows)(values, increments, cost.total_price if called else None)
        chat_request_observe(config_name=self.config.name, route=self.config.route_name, app=self.session.app.name,
                             task_id=str(self.message.task_id), status=status, latency=latency, ttft=ttft,
                             prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                             cost=cost.total_price if called else None, currency=cost.currency)
        return Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens, cost=cost, latency=round(latency, 4),
            time_to_first_token=round(ttft, 4) if ttft is not None else None,
            time_to_generate=round(generate, 4) if generate is not None else None,
        )

    def _save_rows(self, values: dict[str, Any], increments: dict[str, Any], cost: Any) -> None:
        # The turn's end in one round trip (one statement on PostgreSQL): its message, an agent's answer thought, its
        # calls, its config's usage. Every write in the block must be one of opsagent.common.db.statements' (a plain
        # ORM save would go out at once, outside the statement).
        with statements_together():
            row_update(Message, self.message.pk, values=values, increments=increments)
            if self.answer_thought is not None:
                instance_insert(self.answer_thought)
            if self.model is not None:
                provider_calls_record(calls=self.model.calls, origin=self._origin())
            if cost is not None:
                # Every model call that answered (an agent turn makes several); failed ones were counted as they
                # failed, on their own configs.
                answered = sum(not a["category"] for a in self.model.attempts) if self.model is not None else 1
                llm_config_record_usage(config_id=self.config.pk, prompt_tokens=self.prompt_tokens,
                                        completion_tokens=self.completion_tokens, cost=cost, calls=max(answered, 1))
        if cost is not None and self.meter is not None:
            usage_record(meter=self.meter, tokens=self.prompt_tokens + self.completion_tokens, cost=cost)

    def _origin(self) -> CallOrigin:
        app = self.session.app
        return CallOrigin(app_id=str(app.pk), app_name=app.name, key_id=self.meter.key_id if self.meter else "",
                          user_id=self.session.owner_id)

    async def _remember_partial(self) -> None:
        """Add the answer cut short by a stop or an error to the conversation's checkpoint, so that the next turn's
        history holds what the user saw. Best effort: the turn's outcome is already decided."""
        if self.iteration is None or not self.iteration.text:
            return
        self.partial_kept = True
        try:
            async with checkpointer() as saver:
                await agent_graph(checkpointer=saver).aupdate_state(
                    {"configurable": {"thread_id": str(self.session.pk)}},
                    # As the terminal "limit" node: the turn is over, nothing is scheduled after this write.
                    {"messages": [AIMessage(content=self.iteration.text)]}, as_node="limit",
                )
        except Exception:
            logger.exception("could not keep the partial answer of message %s in the checkpoint", self.message.pk)

    async def save_end(self, status: str) -> list[Event]:
        if status == Message.Status.STOPPED:
            await self._remember_partial()
        usage = await self._save(status)
        return [usage, RunEnd(message_id=str(self.message.pk), status=status, answer=self.answer())]

    async def save_paused(self) -> list[Event]:
        usage = await self._save(Message.Status.PAUSED)
        pending = [{"id": i["approval_id"], "tool": i["tool"], "tool_input": i["tool_input"]}
                   for i in self.interrupts]
        return [usage, RunEnd(message_id=str(self.message.pk), status=Message.Status.PAUSED, answer=self.answer(),
                              pending_approvals=pending)]

    async def save_error(self, exc: BaseException) -> list[Event]:
        error = _classify(exc, api_key=self.config.api_key)
        await self._remember_partial()
        usage = await self._save(Message.Status.ERROR, error=error.message, category=error.category)
        return [usage, RunError(category=error.category, message=error.message, status_code=error.status_code)]


def _tool_results_write(results: list[tuple[Thought, str, str]]) -> None:
    """Each tool call row's observation and status, as QuerySet.update() would set them, sent together."""
    with statements_together():
        for thought, observation, status in results:
            row_update(Thought, thought.pk, values={"observation": observation, "status": status})


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
