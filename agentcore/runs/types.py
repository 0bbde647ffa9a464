"""What the run service's callers hand it and get back: a turn's request (query, approval decision, overrides,
attachments) and the prepared turn whose rows exist."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agentcore.limits import Counted, Meter
from agentcore.models import AgentApp, Message, Session
from agentcore.tools.policies import ToolSetup
from llmconfigs.models import LLMConfig

if TYPE_CHECKING:
    from django.contrib.auth.models import User


@dataclass(frozen=True)
class TurnOverrides:
    config_id: str | None = None  # LLMConfig UUID (explicit choice, wins)
    model: str | None = None  # a config name, else a route (a pool)
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    tools: list[str] | None = None  # subset of tool names for this turn (None = the app's tools)


@dataclass(frozen=True)
class Attachment:
    """A file given to the model with the query."""

    kind: str  # "image" | "text"
    name: str
    mime_type: str = ""
    url: str = ""  # image: http(s) URL or data: URL; text: where to fetch it when the run starts (no text yet)
    text: str = ""  # text document: its (size-limited) content


@dataclass(frozen=True)
class ApprovalDecision:
    approval_id: str
    decision: str  # "approve" | "reject"
    comment: str = ""
    # Where the decision came from, for its audit row (audit_context: source, ip_address, user_agent).
    audit: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class TurnRequest:
    app: AgentApp
    query: str = ""
    session_id: str | None = None  # continue this session; None = start a new one
    owner: User | None = None  # Django user (REST/WS); staff may use any console session
    end_user: str = ""  # API end-user string (Dify `user`)
    source: str = Session.Source.CONSOLE  # "api" for the Dify API
    inputs: dict = field(default_factory=dict)
    overrides: TurnOverrides = TurnOverrides()
    attachments: tuple[Attachment, ...] = ()
    approval: ApprovalDecision | None = None  # resume a paused run instead of asking a new query
    session_name: str | None = None  # initial name for a new session (default: the query, shortened)
    meter: Meter | None = None  # whose limits apply and who is charged (None: the app's alone)
    # A new session's earlier exchange, as (role, text) pairs with role "user" or "assistant": the model sees it
    # before the query (a client that keeps its own history, such as the OpenAI-compatible surface).
    history: tuple[tuple[str, str], ...] = ()
    admitted: bool = False  # turn_admit already checked and counted it against the rate limits
    counted: Counted | None = None  # what turn_admit counted: given back if the turn is refused after all


@dataclass
class Turn:
    """A prepared turn: its rows exist."""

    session: Session
    message: Message  # status "running"; for an approval: the paused message being resumed
    config: LLMConfig
    parameters: dict  # the sampling parameters that will be sent (recorded on the message)
    session_created: bool
    # What turn_run needs beyond the rows: the resume value for an approval, the turn's tool subset, attachments.
    resume: dict[str, Any] | None = None
    tools: list[str] | None = None
    attachments: tuple[Attachment, ...] = ()
    tool_setup: ToolSetup | None = None  # agent turns: the policy rows and MCP servers, read while preparing
    # The configs that may answer, in the order to try them (llmconfigs.routing); `config` is the first.
    pool: list[LLMConfig] = field(default_factory=list)
    meter: Meter | None = None  # charged with every provider call of the turn (agentcore.limits)
    # The sampling parameters the app, conversation or request asked for, sent to every member of the pool (each
    # member keeps its own settings for the rest). None: `parameters` (a resumed turn, whose request is not kept).
    requested_parameters: dict | None = None
    history: tuple[tuple[str, str], ...] = ()  # TurnRequest.history, for a new session
