"""The agent's LangGraph: model -> (approval gate + tools) -> model, until an answer or the iteration limit."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, RemoveMessage, SystemMessage, ToolMessage
from langchain_core.messages.tool import ToolCall
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import REMOVE_ALL_MESSAGES, add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import interrupt

from llmconfigs.factory import Delta, StreamedAnswer, chat_model_key, provider_exception_scrubbed
from llmconfigs.routing import PoolChatModel

TOOL_TIMEOUT_SECONDS = 120.0
OBSERVATION_LIMIT = 8000
NOT_RUN = "Not run: the turn ended before this tool could run."
LIMIT_REACHED = "Not run: the agent reached its iteration limit for this turn."


@dataclass(frozen=True)
class ToolRule:
    requires_approval: bool = False
    approver: str = "requester"


class AgentState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    iterations: int  # model calls in the current turn; every new query resets it


def close_dangling_tool_calls(messages: list[AnyMessage]) -> list[AnyMessage]:
    """History with an answer for every tool call: a stopped or superseded turn can leave calls that never ran,
    and providers refuse a conversation whose tool calls have no tool message."""
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    result: list[AnyMessage] = []
    for message in messages:
        result.append(message)
        if isinstance(message, AIMessage):
            for call in message.tool_calls:
                if call["id"] not in answered:
                    result.append(ToolMessage(content=NOT_RUN, tool_call_id=call["id"], name=call["name"]))
    return result


def history_window(messages: list[AnyMessage], *, max_messages: int, max_chars: int) -> list[AnyMessage]:
    """The part of the conversation the model is given: the latest turns (a turn starts at a human message) that
    fit in `max_messages` messages and `max_chars` characters, counted together with the current turn, which is
    always kept whole. Cutting only where a turn starts keeps every tool call with its result and gives the model a
    history that opens with the user."""
    start = None
    count = chars = 0
    for i in range(len(messages) - 1, -1, -1):
        count += 1
        chars += message_chars(messages[i])
        if isinstance(messages[i], HumanMessage):
            if start is not None and (count > max_messages or chars > max_chars):
                break
            start = i
    return messages if start is None else messages[start:]


def message_chars(message: AnyMessage) -> int:
    """A message's size in characters, as a stand-in for its tokens: its text, its content blocks (an image's
    data URL too, which is what it costs to store) and its tool calls' arguments."""
    content = message.content
    size = len(content) if isinstance(content, str) else len(json.dumps(content, default=str))
    if isinstance(message, AIMessage):
        size += sum(len(call["name"]) + len(json.dumps(call["args"], default=str)) for call in message.tool_calls)
    return size


def truncate(text: str, limit: int = OBSERVATION_LIMIT) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... truncated {len(text) - limit} characters]"


async def _invoke_tool(tool: BaseTool | None, name: str, args: dict[str, Any]) -> tuple[str, str]:
    """(observation, status): failures become observations the model can read, never a crashed turn."""
    if tool is None:
        return f"Error: the tool {name!r} is not available.", "error"
    try:
        output = await asyncio.wait_for(tool.ainvoke(args), timeout=TOOL_TIMEOUT_SECONDS)
    except TimeoutError:
        return f"Error: {name} did not finish within {TOOL_TIMEOUT_SECONDS:.0f} s.", "error"
    except Exception as exc:  # noqa: BLE001 - any tool fault is reported to the model
        return f"Error: {type(exc).__name__}: {exc}", "error"
    return truncate(_as_text(output)), "done"


def _as_text(output: Any) -> str:
    """Tool output as text: MCP tools answer with content blocks ([{"type": "text", "text": ...}, ...])."""
    output = getattr(output, "content", output)
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "\n".join(
            b["text"] if isinstance(b, dict) and isinstance(b.get("text"), str) else json.dumps(b, default=str)
            for b in output
        )
    return json.dumps(output, default=str) if isinstance(output, dict) else str(output)


@dataclass(frozen=True)
class AgentContext:
    """What one run brings to the shared graph: its model, tools, rules and prompt (never checkpointed), and where
    the model's streamed chunks go as they arrive (`on_delta`: the run's output)."""

    model: PoolChatModel
    on_delta: Callable[[Delta], Awaitable[None]] = field(kw_only=True)
    tools: dict[str, BaseTool] = field(default_factory=dict)
    rules: dict[str, ToolRule] = field(default_factory=dict)
    system_prompt: str = ""
    max_iterations: int = 8
    # The history window (see history_window): AGENT_HISTORY_MAX_MESSAGES and AGENT_HISTORY_MAX_CHARS.
    max_history_messages: int = field(kw_only=True)
    max_history_chars: int = field(kw_only=True)
    # The answer of a model call the run made itself (agentcore.runs.lifecycle: a turn's model calls and tool steps
    # run in the run while no approval or limit needs the graph) when it calls tools at the iteration limit: the
    # graph's next model step (the turn's first, from its input, or the one the run's last tool step scheduled)
    # takes it instead of calling the model again, and its router sends it to the limit. Mutable in a frozen
    # context on purpose: taken once, by that model step.
    answered: list[AIMessage] = field(default_factory=list, kw_only=True)

    def window(self, history: list[AnyMessage]) -> list[AnyMessage]:
        return history_window(history, max_messages=self.max_history_messages, max_chars=self.max_history_chars)

    def prompt(self, window: list[AnyMessage]) -> list[AnyMessage]:
        """What the model is given: the system prompt, added at call time (so the checkpoint keeps only the
        conversation and an edited prompt applies to old sessions too), and the window with every tool call
        answered."""
        system = [SystemMessage(self.system_prompt)] if self.system_prompt else []
        return system + close_dangling_tool_calls(window)

    async def answer(self, messages: list[AnyMessage], *, merged: bool = True) -> AIMessage:
        """The model's answer to `messages`, with the run's tools bound: each chunk goes to `on_delta` as it arrives,
        and the answer comes back as the message LangChain's `ainvoke` would have merged (StreamedAnswer), without
        LangChain's chunk objects and callbacks per chunk, or LangGraph's messages stream behind them. Without
        `merged` (a chat turn: no tools), the message holds the text, usage and finish reason the Deltas read, and
        no chunk is read by LangChain at all."""
        request = {"tools": [tool_schema(t) for t in self.tools.values()]} if self.tools else {}
        answer = StreamedAnswer(merged=merged)
        async for delta in self.model.astream_deltas(messages, merged=merged, **request):
            answer.add(delta)
            await self.on_delta(delta)
        return answer.message()


# Tools are shared between runs (built-in ones per process, MCP ones per listing; a run's own update_plan copies
# the shared schema), and converting one to the provider's JSON schema costs about a millisecond: the conversion is
# kept per (name, description, argument schema object). The entry holds the schema object, so its id stays unique.
_schemas: dict[tuple[str, str, int], tuple[Any, dict[str, Any]]] = {}
SCHEMA_CACHE_SIZE = 512


def tool_schema(tool: BaseTool) -> dict[str, Any]:
    """The OpenAI function-tool schema of `tool`, converted once per tool definition."""
    key = (tool.name, tool.description or "", id(tool.args_schema))
    hit = _schemas.get(key)
    if hit is not None and hit[0] is tool.args_schema:
        return hit[1]
    if len(_schemas) >= SCHEMA_CACHE_SIZE:
        _schemas.clear()
    schema = convert_to_openai_tool(tool)
    _schemas[key] = (tool.args_schema, schema)
    return schema


async def call_model(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    agent = runtime.context
    history = state["messages"]
    window = agent.window(history)
    try:
        response = agent.answered.pop() if agent.answered else await agent.answer(agent.prompt(window))
    except Exception as exc:
        # LangGraph writes the node's exception into the checkpoint (`__error__`): it must hold no key, whichever
        # path inside the provider client raised it.
        error = provider_exception_scrubbed(exc, api_key=chat_model_key(agent.model))
    else:
        # The state keeps what a later call can be given, no more: turns that left the window leave the checkpoint
        # too (the Message table keeps the whole conversation), so that what each step stores and loads stays
        # bounded however long the conversation grows.
        trimmed = len(window) < len(history)
        messages = [RemoveMessage(id=REMOVE_ALL_MESSAGES), *window, response] if trimmed else [response]
        return {"messages": messages, "iterations": state.get("iterations", 0) + 1}
    raise error  # outside the except clause, so the unscrubbed original is not kept as its context


async def route(state: AgentState, runtime: Runtime[AgentContext]) -> str:
    last = state["messages"][-1]
    if not isinstance(last, AIMessage) or not last.tool_calls:
        return END
    return "limit" if state.get("iterations", 0) >= runtime.context.max_iterations else "tools"


async def run_tools(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    agent = runtime.context
    calls = state["messages"][-1].tool_calls
    # Every approval is collected before any tool runs: on resume this node starts again from the top, and
    # interrupt() returns the recorded decisions in order, so nothing runs twice or without its decision.
    decisions: dict[str, dict[str, Any]] = {}
    for call in calls:
        rule = agent.rules.get(call["name"])
        if rule is not None and rule.requires_approval:
            decisions[call["id"]] = interrupt({
                "tool": call["name"],
                "tool_input": call["args"],
                "tool_call_id": call["id"],
                "approver": rule.approver,
            })
    return {"messages": await tool_calls_run(agent, calls, decisions)}


def approval_needed(agent: AgentContext, calls: list[ToolCall]) -> bool:
    """Whether any of `calls` waits for an approval before it runs (the tool step interrupts for it)."""
    rules = agent.rules
    return any((rule := rules.get(call["name"])) is not None and rule.requires_approval for call in calls)


async def tool_calls_run(agent: AgentContext, calls: list[ToolCall],
                         decisions: dict[str, dict[str, Any]] | None = None) -> list[ToolMessage]:
    """The tool step's results, one message per call in order: a call rejected in `decisions` is not run, every other
    one is (timeouts, faults and unknown tools become observations: _invoke_tool). The graph's tool step and a run's
    own tool loop (agentcore.runs.lifecycle) both run their calls here."""
    results = []
    for call in calls:
        decision = decisions.get(call["id"]) if decisions else None
        if decision is not None and decision.get("decision") != "approve":
            comment = decision.get("comment") or "no comment"
            observation, status = f"The user rejected this tool call. Comment: {comment}", "rejected"
        else:
            observation, status = await _invoke_tool(agent.tools.get(call["name"]), call["name"], call["args"])
        results.append(ToolMessage(content=observation, tool_call_id=call["id"], name=call["name"],
                                   artifact={"status": status}))
    return results


async def refuse_over_limit(state: AgentState) -> dict[str, Any]:
    calls = state["messages"][-1].tool_calls
    return {"messages": [
        ToolMessage(content=LIMIT_REACHED, tool_call_id=c["id"], name=c["name"], artifact={"status": "error"})
        for c in calls
    ]}


async def first_answer(state: AgentState) -> dict[str, Any]:
    """Never run: the node a run writes its turn's first answer as (`aupdate_state(..., as_node=ANSWERED)`) when that
    answer, made before the graph started, calls tools within the iteration limit. Its one edge schedules the tool
    step, so the graph goes on from that checkpoint at its tools, without its input's step and a model step."""
    return {}


ANSWERED = "answered"


@lru_cache(maxsize=1)
def _compiled() -> CompiledStateGraph:
    graph = StateGraph(AgentState, context_schema=AgentContext)
    graph.add_node("model", call_model)
    graph.add_node("tools", run_tools)
    graph.add_node("limit", refuse_over_limit)
    graph.add_node(ANSWERED, first_answer)
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", route, ["tools", "limit", END])
    graph.add_edge(ANSWERED, "tools")
    graph.add_edge("tools", "model")
    graph.add_edge("limit", END)
    return graph.compile()


def agent_graph(*, checkpointer: BaseCheckpointSaver) -> CompiledStateGraph:
    """The agent graph on a run's checkpointer; run it with `context=AgentContext(...)`. The structure is compiled
    once per process (a few ms saved on every turn); only the saver differs between runs."""
    return _compiled().copy(update={"checkpointer": checkpointer})
