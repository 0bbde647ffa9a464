"""Chat Completions chunks as OpsAgent sends them: `data: <chunk>\\n\\n` lines, one id and one created time for every
chunk of an answer, the role in the first chunk, the finish reason in the last choice chunk, the usage in a chunk of
its own when the client asked for it, an error chunk when the answer fails after it started, and `data: [DONE]`."""
from __future__ import annotations

import time
import uuid
from typing import Any

from difyapi.sse import encode_event as sse

DONE = b"data: [DONE]\n\n"


class ChunkStream:
    """The chunks of one answer, as the client named the model."""

    def __init__(self, *, model: str, include_usage: bool = False):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.started = False
        self.usage: dict[str, Any] | None = None

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        """A choice chunk of our own (the agent's answer): the first one carries the role."""
        if not self.started:
            delta = {"role": "assistant", **delta}
            self.started = True
        return sse(self.chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]))

    def relay(self, upstream: dict[str, Any]) -> bytes:
        """A provider's chunk under this answer's id, time and model name; its usage is held back for `end`. Empty
        when nothing is left to send (a usage-only chunk)."""
        if upstream.get("usage"):
            self.usage = upstream["usage"]
        choices = upstream.get("choices") or []
        if not choices:
            return b""
        if not self.started:
            delta = choices[0].get("delta")
            if isinstance(delta, dict) and "role" not in delta:
                choices[0]["delta"] = {"role": "assistant", **delta}
            self.started = True
        chunk = {**upstream, "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model}
        chunk.pop("usage", None)
        return sse(chunk)

    def end(self) -> bytes:
        """The usage chunk (when asked for and known), then [DONE]."""
        if self.include_usage and self.usage is not None:
            return sse(self.chunk([], usage=self.usage)) + DONE
        return DONE

    @staticmethod
    def error(payload: dict[str, Any]) -> bytes:
        """The last line of an answer that failed after it started: OpenAI's error envelope as a chunk."""
        return sse(payload)


def completion_body(*, stream: ChunkStream, message: dict[str, Any], finish_reason: str,
                    usage: dict[str, Any] | None) -> dict[str, Any]:
    """A blocking answer of our own (the agent's) as a `chat.completion` object."""
    body = {"id": stream.id, "object": "chat.completion", "created": stream.created, "model": stream.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}]}
    if usage is not None:
        body["usage"] = usage
    return body
