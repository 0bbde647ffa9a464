"""A real HTTP fake of an OpenAI-compatible upstream, scripted per test.

It listens on 127.0.0.1 in a background thread (aiohttp), so the production client code (langchain-openai -> openai ->
httpx) runs unchanged against it. Tests queue `Reply` scripts (text, tool calls, usage, HTTP errors, slow or cut
streams, hangs) and read back what the server received in `requests`. With `tool_first` set, every request that offers
that tool and does not end with a tool result is answered with a call to it (an agent's turn: a tool call, then the
answer), so that an unscripted run, a benchmark's, calls a tool at each turn.

Run it by hand: `python -m tests.fakes.upstream --port 9100` (for `make run` demos and the benchmarks).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)  # a str is sent as it is (invalid JSON too)
    id: str = ""
    fragments: int = 1  # streaming: the arguments in this many chunks, the first with the id and name (as providers do)


@dataclass
class Reply:
    """One scripted upstream answer. `error_message` may contain `{api_key}` (the key the client sent) and
    `{authorization}` (its whole Authorization header): the worst case of a provider that echoes them, so tests can
    prove OpsAgent scrubs them."""

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    status: int = 200
    error_message: str = ""
    error_type: str = "invalid_request_error"
    chunks: list[str] | None = None  # explicit stream chunks; default: the text split after each space
    delay: float = 0.0  # seconds between stream chunks
    first_delay: float = 0.0  # seconds before the first byte of the body (and before a non-stream answer)
    cut_after: int | None = None  # streaming: drop the connection after this many content chunks
    stream_error: str = ""  # streaming: after the content chunks, an error event with this message (placeholders too)
    hang: float = 0.0  # wait this long before answering at all (timeouts)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    role_chunk: bool = True  # streaming: open with a chunk holding only the role (some providers send none)
    reasoning: list[str] = field(default_factory=list)  # streaming: `reasoning_content` deltas before the content
    reasoning_delay: float = 0.0  # seconds after the reasoning, before the first content chunk

    def stream_chunks(self) -> list[str]:
        if self.chunks is not None:
            return list(self.chunks)
        if not self.text:
            return []
        words = self.text.split(" ")
        return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def api_key(self) -> str:
        auth = self.headers.get("Authorization", "")
        return auth.split(" ", 1)[1] if " " in auth else ""

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])


class FakeUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self.requests: list[Received] = []
        self.default = Reply(text="Hello from the fake upstream.")
        self.tool_first: ToolCall | None = None
        self._queue: deque[Reply] = deque()
        self._embedding_queue: deque[Reply] = deque()
        # The vector /embeddings gives a text: set here per text (so a test decides which texts are close), else
        # 8 numbers derived from the text's SHA-256.
        self.embedding_vectors: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self.active_streams = 0
        self.cancelled_streams = 0

    # ----- control (called from tests) -----
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    def script_embeddings(self, *replies: Reply) -> None:
        """Answers for the next /embeddings calls only (an error status, a hang); chat scripts stay untouched."""
        with self._lock:
            self._embedding_queue.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self._embedding_queue.clear()
            self.embedding_vectors.clear()
            self.requests.clear()
            self.default = Reply(text="Hello from the fake upstream.")
            self.tool_first = None
            self.cancelled_streams = 0

    @property
    def chat_requests(self) -> list[Received]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    @property
    def embedding_requests(self) -> list[Received]:
        return [r for r in self.requests if r.path.endswith("/embeddings")]

    def _next_embedding(self) -> Reply:
        """An embeddings script if there is one; else a scripted error from the shared queue (what tests of an
        embedding config's connection test queue), but never a chat answer."""
        with self._lock:
            if self._embedding_queue:
                return self._embedding_queue.popleft()
            if self._queue and self._queue[0].status != 200:
                return self._queue.popleft()
        return Reply()

    def _next(self, received: Received) -> Reply:
        """The next scripted reply; else a call to `tool_first` when the request offers it and its last message is
        not a tool result (that one gets the default answer); else the default answer."""
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            call = self.tool_first
        if call is not None and received.messages and received.messages[-1].get("role") != "tool":
            offered = {(tool.get("function") or {}).get("name") for tool in received.body.get("tools") or []}
            if call.name in offered:
                return Reply(tool_calls=[call])
        return self.default

    def start(self) -> FakeUpstream:
        self._thread = threading.Thread(target=self._serve, name="fake-openai-upstream", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fake upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._runner:
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            try:
                fut.result(5)
            except Exception:
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(5)

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/{prefix:.*}/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/{prefix:.*}/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    # ----- handlers -----
    async def _record(self, request: web.Request) -> Received:
        try:
            body = await request.json()
        except Exception:
            body = {}
        received = Received(request.method, request.path, dict(request.headers), body)
        with self._lock:
            self.requests.append(received)
        return received

    @staticmethod
    def _echo(text: str, received: Received) -> str:
        return text.replace("{api_key}", received.api_key).replace("{authorization}",
                                                                   received.headers.get("Authorization", ""))

    @classmethod
    def _error(cls, reply: Reply, received: Received) -> web.Response:
        message = cls._echo(reply.error_message, received) or f"fake upstream error {reply.status}"
        payload = {"error": {"message": message, "type": reply.error_type, "code": None, "param": None}}
        return web.json_response(payload, status=reply.status)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        received = await self._record(request)
        reply = self._next(received)
        if reply.hang:
            await asyncio.sleep(reply.hang)
        if reply.status != 200:
            return self._error(reply, received)
        model = received.body.get("model", "fake-model")
        prompt_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else _count_prompt(received.messages)
        chunks = reply.stream_chunks()
        completion_tokens = reply.completion_tokens if reply.completion_tokens is not None else max(len(chunks), 1)
        finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
        created = int(time.time())
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        tool_calls = [
            {
                "index": i,
                "id": call.id or f"call_{uuid.uuid4().hex[:12]}",
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments if isinstance(call.arguments, str)
                             else json.dumps(call.arguments)},
            }
            for i, call in enumerate(reply.tool_calls)
        ]
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if not received.body.get("stream"):
            if reply.first_delay:
                await asyncio.sleep(reply.first_delay)
            message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
            if tool_calls:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in tool_calls]
            return web.json_response(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                }
            )

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        self.active_streams += 1
        try:
            await response.prepare(request)
            if reply.first_delay:
                await asyncio.sleep(reply.first_delay)

            async def send(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> None:
                chunk = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                    **extra,
                }
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

            if reply.role_chunk:
                await send({"role": "assistant", "content": ""})
            for piece in reply.reasoning:
                await send({"reasoning_content": piece})
            if reply.reasoning_delay:
                await asyncio.sleep(reply.reasoning_delay)
            for i, piece in enumerate(chunks):
                if reply.cut_after is not None and i >= reply.cut_after:
                    request.transport.close()
                    return response
                if reply.delay and i:
                    await asyncio.sleep(reply.delay)
                await send({"content": piece})
            if reply.cut_after is not None:
                request.transport.close()
                return response
            if reply.stream_error:
                error = {"message": self._echo(reply.stream_error, received), "type": reply.error_type}
                await response.write(f"data: {json.dumps({'error': error})}\n\n".encode())
                await response.write_eof()
                return response
            for call, scripted in zip(tool_calls, reply.tool_calls, strict=True):
                arguments = call["function"]["arguments"]
                size = -(-len(arguments) // scripted.fragments) if arguments else 1
                pieces = [arguments[i:i + size] for i in range(0, len(arguments), size)] or [arguments]
                await send({"tool_calls": [{**call, "function": {**call["function"], "arguments": pieces[0]}}]})
                for piece in pieces[1:]:
                    await send({"tool_calls": [{"index": call["index"], "function": {"arguments": piece}}]})
            await send({}, finish)
            if (received.body.get("stream_options") or {}).get("include_usage"):
                usage_chunk = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                await response.write(f"data: {json.dumps(usage_chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled_streams += 1
            raise
        finally:
            self.active_streams -= 1
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        received = await self._record(request)
        reply = self._next_embedding()
        if reply.hang:
            await asyncio.sleep(reply.hang)
        if reply.status != 200:
            return self._error(reply, received)
        inputs = received.body.get("input", [])
        if isinstance(inputs, str):
            inputs = [inputs]
        data = []
        for i, text in enumerate(inputs):
            vector = self.embedding_vectors.get(str(text))
            if vector is None:
                digest = hashlib.sha256(str(text).encode()).digest()
                vector = [b / 255 for b in digest[:8]]
            data.append({"object": "embedding", "index": i, "embedding": vector})
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": received.body.get("model"),
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            }
        )

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})


def _count_prompt(messages: list[dict[str, Any]]) -> int:
    words = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            words += len(content.split())
        elif isinstance(content, list):
            words += sum(len(str(part.get("text", "")).split()) for part in content if isinstance(part, dict))
    return max(words, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--text", default="Hello from the fake upstream.")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between stream chunks")
    parser.add_argument("--tool-call", default="", metavar="NAME",
                        help="answer each request offering this tool with a call to it first (see tool_first)")
    parser.add_argument("--tool-arguments", default="{}", help="the tool call's arguments (JSON)")
    args = parser.parse_args()
    upstream = FakeUpstream(port=args.port)
    upstream.default = Reply(text=args.text, delay=args.delay)
    if args.tool_call:
        upstream.tool_first = ToolCall(args.tool_call, json.loads(args.tool_arguments))
    upstream.start()
    print(f"fake OpenAI-compatible upstream on {upstream.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        upstream.stop()


if __name__ == "__main__":
    main()
