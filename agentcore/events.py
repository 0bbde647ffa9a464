"""Neutral events a run yields; the Dify adapter, REST streaming and the WebSocket consumer each encode them.

A run yields, in order: `RunStarted` once; then any of `TextDelta`, `ThoughtUpdate`, `ApprovalRequired`; then
`Usage` once; then exactly one of `RunEnd` or `RunError` last. A stopped run ends with `RunEnd(status="stopped")`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

from llmconfigs.pricing import Cost


@dataclass(frozen=True)
class RunStarted:
    session_id: str
    message_id: str
    task_id: str
    created_at: int  # unix seconds of the message
    llm_config_id: str
    model_name: str


@dataclass(frozen=True)
class TextDelta:
    text: str
    position: int = 1  # the agent iteration the text belongs to (1-based)


@dataclass(frozen=True)
class ThoughtUpdate:
    """A thought (one agent iteration) was created or changed; consumers upsert by `thought_id`.

    `phase`: "start" (iteration began, empty), "tool_call" (model chose `tool` with `tool_input`), "tool_result"
    (`observation` is set), "awaiting_approval", "answer" (final iteration, `thought` is the answer text)."""

    thought_id: str
    position: int
    phase: str
    thought: str = ""
    tool: str = ""
    tool_input: dict[str, Any] = field(default_factory=dict)
    observation: str = ""
    status: str = ""


@dataclass(frozen=True)
class ApprovalRequired:
    approval_id: str
    thought_id: str
    tool: str
    tool_input: dict[str, Any]
    approver: str  # "requester" or "staff"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: Cost
    latency: float
    time_to_first_token: float | None
    time_to_generate: float | None


@dataclass(frozen=True)
class RunEnd:
    message_id: str
    status: str  # normal | stopped | paused
    answer: str
    pending_approvals: list[dict[str, Any]] = field(default_factory=list)  # [{id, tool, tool_input}]


@dataclass(frozen=True)
class RunError:
    """The run failed after it started. `category`: auth, rate_limit, upstream_error, timeout, unreachable,
    bad_request, internal. `message` is safe to show (no secrets)."""

    category: str
    message: str
    status_code: int | None = None


Event = RunStarted | TextDelta | ThoughtUpdate | ApprovalRequired | Usage | RunEnd | RunError


def event_to_dict(event: Event) -> dict[str, Any]:
    """Plain JSON-ready dict with a `type` key (snake_case event name); Decimals become strings. A usage's cost is
    spread into the usage's own keys (the REST and WebSocket wire shape predates the Cost type)."""
    data = asdict(event)
    if isinstance(event, Usage):
        data = {key: item for name, value in data.items()
                for key, item in (value.items() if name == "cost" else [(name, value)])}
    for key, value in data.items():
        if isinstance(value, Decimal):
            data[key] = str(value)
    return {"type": _TYPE_NAMES[type(event)], **data}


_TYPE_NAMES = {
    RunStarted: "run_started",
    TextDelta: "delta",
    ThoughtUpdate: "thought",
    ApprovalRequired: "approval_required",
    Usage: "usage",
    RunEnd: "end",
    RunError: "error",
}
