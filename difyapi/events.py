"""POST /v1/chat-messages and /v1/completion-messages, the answer side: the neutral events of a run
(agentcore.events) as Dify's stream events or its blocking answer, and a failed run as Dify's error (SPEC.md §2-§4).
The request side is difyapi.chat."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from agentcore.events import (
    ApprovalRequired,
    Event,
    RunEnd,
    RunError,
    RunStarted,
    TextDelta,
    ThoughtUpdate,
    Usage,
)
from agentcore.models import AgentApp
from agentcore.runs import UNAVAILABLE, Turn
from difyapi.errors import DifyError
from difyapi.presenters import (
    message_metadata,
    thought_observation,
    thought_tool_input,
    thought_tool_labels,
    usage_to_dify,
)

COMPLETION_REQUEST_ERROR = "completion_request_error"
STREAM_INTERNAL_MESSAGE = "Internal Server Error, please contact support."
AWAITING_APPROVAL = "Awaiting approval: answer with the `approval` field of the next message."


def run_error_to_dify(error: RunError) -> DifyError:
    """A failed run: a provider fault is `completion_request_error` with its (scrubbed) text, anything else 500."""
    if error.category == "internal":
        return DifyError("internal_server_error", STREAM_INTERNAL_MESSAGE, 500)
    if error.category == UNAVAILABLE:
        return DifyError("service_unavailable", error.message, 503)
    return DifyError(COMPLETION_REQUEST_ERROR, error.message or "Completion request failed.", 400)


def _usage(usage: Usage | None) -> dict[str, Any]:
    if usage is None:
        return usage_to_dify(prompt_tokens=0, completion_tokens=0)
    return usage_to_dify(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost=usage.cost,
        latency=usage.latency,
        time_to_first_token=usage.time_to_first_token,
        time_to_generate=usage.time_to_generate,
    )


class DifyTurn:
    """Turns the neutral events of one run into Dify's stream events (`stream`) or blocking answer (`blocking`)."""

    def __init__(self, *, mode: str, annotation_reply: dict[str, Any] | None = None):
        self.mode = mode
        # An annotation's answer is Dify's direct output: `message` events in every mode (SPEC.md §3).
        self.annotation_reply = annotation_reply
        chat = mode != AgentApp.Mode.AGENT_CHAT or annotation_reply is not None
        self.answer_event = "message" if chat else "agent_message"
        self.head: dict[str, Any] = {}
        self.task_id = ""
        self.message_id = ""
        self.conversation_id = ""
        self.created_at = 0
        self.usage: Usage | None = None
        self.answer_parts: list[str] = []

    def _event(self, name: str, **fields: Any) -> dict[str, Any]:
        return {"event": name, **self.head, "task_id": self.task_id, **fields}

    def stream(self, event: Any) -> dict[str, Any] | None:
        """The Dify event for a run event, or None when it has none of its own."""
        if isinstance(event, TextDelta):
            if self.answer_event == "message":
                return self._event("message", id=self.message_id, answer=event.text, from_variable_selector=None)
            return self._event("agent_message", id=self.message_id, answer=event.text)
        if isinstance(event, ThoughtUpdate):
            return self._event("agent_thought", **self._thought(event))
        if isinstance(event, RunStarted):
            self._start(event)
            return None
        if isinstance(event, Usage):
            self.usage = event
            return None
        if isinstance(event, RunEnd):
            metadata = self._metadata()
            if event.status == "paused" or event.pending_approvals:
                metadata["pending_approvals"] = [
                    {"id": str(p.get("id")), "tool": p.get("tool"), "tool_input": p.get("tool_input")}
                    for p in event.pending_approvals
                ]
            return self._event("message_end", id=self.message_id, metadata=metadata, files=None)
        if isinstance(event, RunError):
            error = run_error_to_dify(event)
            return {"event": "error", **self.head, "status": error.status, "code": error.code,
                    "message": error.message}
        if isinstance(event, ApprovalRequired):
            return None  # shown by its agent_thought; listed in message_end's pending_approvals
        return None

    def _metadata(self) -> dict[str, Any]:
        metadata = message_metadata(_usage(self.usage))
        metadata["annotation_reply"] = self.annotation_reply
        return metadata

    def _start(self, event: RunStarted) -> None:
        self.task_id = str(event.task_id)
        self.message_id = str(event.message_id)
        self.conversation_id = str(event.session_id)
        self.created_at = int(event.created_at)
        self.head = {"conversation_id": self.conversation_id, "message_id": self.message_id,
                     "created_at": self.created_at}
        if self.mode == AgentApp.Mode.COMPLETION:  # a completion shows no conversation (its row is internal)
            del self.head["conversation_id"]

    @staticmethod
    def _thought(event: ThoughtUpdate) -> dict[str, Any]:
        # The Thought presenters give the wire shape, read from the update itself.
        if event.phase == "awaiting_approval" and not event.observation:
            event = replace(event, observation=AWAITING_APPROVAL)
        return {
            "id": str(event.thought_id),
            "position": event.position,
            "thought": event.thought,
            "observation": thought_observation(event),
            "tool": event.tool,
            "tool_labels": thought_tool_labels(event),
            "tool_input": thought_tool_input(event),
            "message_files": [],
        }

    def collect(self, event: Any) -> None:
        """Blocking mode: remember what the answer needs."""
        if isinstance(event, RunStarted):
            self._start(event)
        elif isinstance(event, TextDelta):
            self.answer_parts.append(event.text)
        elif isinstance(event, Usage):
            self.usage = event

    def blocking(self, end: RunEnd) -> dict[str, Any]:
        answer = end.answer if end.answer or not self.answer_parts else "".join(self.answer_parts)
        body = {
            "event": "message",
            "task_id": self.task_id,
            "id": self.message_id,
            "message_id": self.message_id,
            "conversation_id": self.conversation_id,
            "mode": self.mode,
            "answer": answer,
            "metadata": self._metadata(),
            "created_at": self.created_at,
        }
        if self.mode == AgentApp.Mode.COMPLETION:
            del body["conversation_id"]
        return body


def annotation_reply_events(turn: Turn, answer: str) -> list[Event]:
    """The run events of a turn an annotation answered: Dify streams its answer character by character."""
    message = turn.message
    started = RunStarted(session_id=str(turn.session.pk), message_id=str(message.pk), task_id=str(message.task_id),
                         created_at=int(message.created_at.timestamp()), llm_config_id=str(turn.config.pk),
                         model_name=turn.config.model_name)
    return [started, *(TextDelta(text=character) for character in answer),
            RunEnd(message_id=str(message.pk), status="normal", answer=answer)]
