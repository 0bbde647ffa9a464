"""The Channels HTTP consumer of POST /v1/chat/completions (blocking, and streamed as Chat Completions chunks).

As the Dify consumer does, it keeps receiving while it answers: `http.disconnect` cancels the answer, which closes
the provider's connection (the provider stops generating). The key, the request, the pool and the app's limits are
checked in one hop off the event loop; a stream's headers go out with the provider's first chunk, so that whatever
fails before it (every member of the pool refusing, a parameter out of range) is an HTTP error with OpenAI's status,
and whatever fails after it is an error chunk, the stream's last line."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async

from agentcore.events import ApprovalRequired, RunEnd, RunError, TextDelta, ThoughtUpdate, Usage
from agentcore.limits import Counted, usage_check, usage_uncount
from agentcore.models import Session
from agentcore.runs import (
    SaverOpening,
    Turn,
    TurnOverrides,
    TurnRequest,
    provider_client,
    turn_abandon,
    turn_prepare,
    turn_run,
)
from agentcore.selectors import app_pool_resolve
from agentcore.tools.policies import TOOL_SETUP_VERSION_KEY
from difyapi.auth import AppContext, authenticate
from difyapi.consumers import DifyHttpConsumer
from difyapi.encoding import dify_json
from difyapi.openai.chunks import ChunkStream, completion_body
from difyapi.openai.errors import INTERNAL, OpenAIError, model_not_found, openai_error_from
from difyapi.openai.services import CompletionTiming, completion_observe, completion_usage_record
from difyapi.openai.validation import CompletionRequest, completion_request_parse, message_text
from difyapi.sse import HEADERS
from difyapi.streaming import header
from llmconfigs.completions import PoolCompletion, chunk_ends_head
from llmconfigs.errors import ProviderCallError
from llmconfigs.models import LLMConfig
from llmconfigs.selectors import llm_config_cache_keys, llm_config_snapshot
from llmconfigs.usage import CallOrigin
from opsagent.common.cache import cache_read_ahead
from opsagent.common.clients import scope_client_ip
from opsagent.common.metrics import stream_active

logger = logging.getLogger(__name__)

AGENT_MODEL = "opsagent"
AGENT_PREFIX = "app:"
_AGENT_MARKS = (f'"{AGENT_MODEL}'.encode(), f'"{AGENT_PREFIX}'.encode())
# The end user of an agent turn asked for without `user`.
DEFAULT_END_USER = "openai-client"
# How much of a tool's result an agent answer shows in its reasoning (the whole result is in the app's history).
OBSERVATION_PREVIEW = 500


@dataclass
class CompletionCall:
    context: AppContext
    request: CompletionRequest
    pool: list[LLMConfig] | None = None  # a pool's request; None: the app's agent
    turn: Turn | None = None
    counted: Counted | None = None  # what the request counts against the requests-per-minute limits


def _completion_call(header: str | None, body: bytes, content_type: str | None, client_ip: str | None,
                     context: AppContext | None) -> CompletionCall:
    """The key, the request, the model (a pool within the app's allow-list, or the app's agent with the turn's rows)
    and the app's and key's limits, in one hop off the event loop. Its config lookups share one snapshot, and the
    config generation and the tool setup stamp come in the key's cache round trip."""
    with llm_config_snapshot(), cache_read_ahead([*llm_config_cache_keys(), TOOL_SETUP_VERSION_KEY]):
        return _completion_call_checked(header, body, content_type, client_ip, context)


def _completion_call_checked(header: str | None, body: bytes, content_type: str | None, client_ip: str | None,
                             context: AppContext | None) -> CompletionCall:
    context = context or authenticate(header, client_ip=client_ip)
    request = completion_request_parse(body, content_type)
    model = request.model
    if model == AGENT_MODEL or model.startswith(AGENT_PREFIX):
        if model != AGENT_MODEL and model[len(AGENT_PREFIX):] != context.app.name:
            raise model_not_found(model)  # a key reaches its own app's agent only
        return CompletionCall(context=context, request=request, turn=turn_prepare(_turn_request(context, request)))
    try:
        config_id = uuid.UUID(model)  # the `id` of an item of GET /v1/models
    except ValueError:
        config_id = None
    try:
        pool = app_pool_resolve(app=context.app, config_id=config_id, model=None if config_id else model)
    except Exception as exc:
        raise openai_error_from(exc, model=model) or exc from None
    counted = usage_check(meter=context.meter)
    return CompletionCall(context=context, request=request, pool=pool, counted=counted)


def _turn_request(context: AppContext, request: CompletionRequest) -> TurnRequest:
    """The agent's turn: the last message (a user's) is the query, the user and assistant messages before it the
    history; system messages are the app's to give (its system prompt), and tool messages the agent's own."""
    *earlier, last = request.messages
    if last.get("role") != "user" or not message_text(last).strip():
        raise OpenAIError("The last message must be a user message with text.", param="messages")
    history = tuple((m["role"], message_text(m)) for m in earlier
                    if m.get("role") in ("user", "assistant") and message_text(m))
    params = request.body
    if params.get("tools") or params.get("tool_choice") or params.get("response_format"):
        name = next(n for n in ("tools", "tool_choice", "response_format") if params.get(n))
        raise OpenAIError(f"{name} is for a pool's model: the agent brings its own tools and answers in text.",
                          param=name)
    overrides = TurnOverrides(temperature=params.get("temperature"), top_p=params.get("top_p"),
                              max_tokens=params.get("max_tokens", params.get("max_completion_tokens")))
    return TurnRequest(app=context.app, query=message_text(last), end_user=params.get("user") or DEFAULT_END_USER,
                       source=Session.Source.API, meter=context.meter, overrides=overrides, history=history)


def _may_name_agent(body: bytes) -> bool:
    """Whether the body may ask for an agent (a cheap look before it is parsed: a false yes costs a checkpointer
    opening, a false no, such as an escaped name, opens it when the run starts)."""
    return any(mark in body for mark in _AGENT_MARKS)


async def _prepared(prepare: Coroutine[Any, Any, CompletionCall]) -> CompletionCall:
    """Await `prepare`; a client that leaves meanwhile leaves no running agent message behind (as
    agentcore.runs.prepared_or_abandoned does for a turn)."""
    future = asyncio.ensure_future(prepare)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            call = await future
            if call.turn is not None:
                await turn_abandon(call.turn)
        raise


class ChatCompletionsConsumer(DifyHttpConsumer):
    """POST /v1/chat/completions."""

    surface = "openai"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model = ""
        self.started = False  # the response's headers went out

    async def _answer_errors(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run `work`; an error it raises is answered in OpenAI's envelope (False): an HTTP error before the
        response started, an error chunk after. Never a traceback to the client."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = openai_error_from(exc, model=self.model)
            if error is None:
                logger.exception("chat completion failed: %s", self.scope.get("path"))
                error = INTERNAL
            if self.started:
                await self.send({"type": "http.response.body", "body": ChunkStream.error(error.payload())})
            else:
                await self.send_json(error.status, error.payload(), headers=error.headers)
        else:
            return True
        return False

    async def respond(self, body: bytes) -> None:
        # An agent's checkpointer is opened while the request is checked; a pool's request (most) needs none.
        saver = SaverOpening() if _may_name_agent(body) else None
        try:
            call = await _prepared(database_sync_to_async(_completion_call)(
                header(self.scope, b"authorization"), body, header(self.scope, b"content-type"),
                scope_client_ip(self.scope), self.context,
            ))
        except BaseException:
            if saver is not None:
                await asyncio.shield(saver.aclose())
            raise
        self.model = call.request.model
        if call.turn is None:
            if saver is not None:
                await asyncio.shield(saver.aclose())
            await self.pool(call)
            return
        saver = saver or SaverOpening()
        try:
            await self.agent(call, saver)
        except asyncio.CancelledError:
            await asyncio.shield(turn_abandon(call.turn))
            raise
        finally:
            await asyncio.shield(saver.aclose())

    async def start_stream(self) -> None:
        if not self.started:
            self.started = True
            await self.send({"type": "http.response.start", "status": 200, "headers": HEADERS})

    async def write(self, data: bytes) -> None:
        if data:
            await self.send({"type": "http.response.body", "body": data, "more_body": True})

    # ----- a pool's model: the request as the client sent it -----

    async def pool(self, call: CompletionCall) -> None:
        request = call.request
        completion = PoolCompletion(members=call.pool,
                                    client=lambda config, last: provider_client(config, retries=last))
        chunks = ChunkStream(model=request.model, include_usage=request.include_usage)
        timing = CompletionTiming(task_id=chunks.id)
        observe = functools.partial(completion_observe, completion=completion, timing=timing,
                                    app=call.context.app.name)
        try:
            if request.stream:
                with stream_active(self.surface):
                    # The chunks before the first token (the role) reach us together with it: they go out with it,
                    # in one write.
                    held = b""
                    async with contextlib.aclosing(completion.stream(request.body)) as upstream:
                        async for chunk in upstream:
                            timing.chunk(chunk)
                            held += chunks.relay(chunk)
                            if not self.started and not chunk_ends_head(chunk):
                                continue
                            await self.start_stream()
                            await self.write(held)
                            held = b""
                observe(status="normal")
                await self.start_stream()
                await self.send({"type": "http.response.body", "body": held + chunks.end()})
            else:
                answer = await completion.create(request.body)
                answer.update(id=chunks.id, object="chat.completion", model=request.model)
                observe(status="normal")
                await self.send_json(200, answer)
        except asyncio.CancelledError:
            observe(status="stopped")
            raise
        except Exception:
            observe(status="error")  # before the error's answer
            raise
        finally:
            await asyncio.shield(self._account(call, completion))

    async def _account(self, call: CompletionCall, completion: PoolCompletion) -> None:
        await completion.settle()
        if not completion.calls and completion.served is None:
            # Refused before any provider call (a parameter outside every member's range): only requests let
            # through use the requests-per-minute quota, as on the Dify surface.
            if call.counted is not None and call.counted.keys:
                await sync_to_async(usage_uncount, thread_sensitive=False)(call.counted)
            return
        context = call.context
        origin = CallOrigin(app_id=str(context.app.pk), app_name=context.app.name, key_id=context.api_key_id)
        try:
            await database_sync_to_async(completion_usage_record)(
                meter=context.meter, origin=origin, calls=completion.calls, served=completion.served,
                usage=completion.usage)
        except Exception:
            logger.exception("the usage of a chat completion could not be recorded")

    # ----- the app's agent -----

    async def agent(self, call: CompletionCall, saver: SaverOpening) -> None:
        with stream_active(self.surface) if call.request.stream else contextlib.nullcontext():
            await self._agent_answer(call, saver)

    async def _agent_answer(self, call: CompletionCall, saver: SaverOpening) -> None:
        request = call.request
        chunks = ChunkStream(model=request.model, include_usage=request.include_usage)
        text: list[str] = []
        reasoning: list[str] = []
        usage: dict[str, Any] | None = None
        async with contextlib.aclosing(turn_run(call.turn, saver=saver)) as events:
            async for event in events:
                if isinstance(event, RunError):
                    raise ProviderCallError(event.category, event.message, status_code=event.status_code)
                if isinstance(event, TextDelta):
                    delta = {"content": event.text}
                    text.append(event.text)
                elif isinstance(event, ThoughtUpdate | ApprovalRequired):
                    step = _reasoning(event)
                    if not step:
                        continue
                    delta = {"reasoning_content": step}
                    reasoning.append(step)
                elif isinstance(event, Usage):
                    usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                             "total_tokens": event.total_tokens}
                    chunks.usage = usage
                    continue
                elif isinstance(event, RunEnd):
                    finish = "stop"
                    if not request.stream:
                        message = {"role": "assistant", "content": "".join(text) or event.answer}
                        if reasoning:
                            message["reasoning_content"] = "".join(reasoning)
                        await self.send_json(200, completion_body(stream=chunks, message=message,
                                                                  finish_reason=finish, usage=usage))
                        return
                    await self.start_stream()
                    await self.write(chunks.delta({}, finish))
                    await self.send({"type": "http.response.body", "body": chunks.end()})
                    return
                else:
                    continue
                if request.stream:
                    await self.start_stream()
                    await self.write(chunks.delta(delta))
        raise INTERNAL


def _reasoning(event: ThoughtUpdate | ApprovalRequired) -> str:
    """A tool step as a line of reasoning (the `reasoning_content` deltas some providers send): OpenAI's chunks have
    no place for a server-side tool call, and clients that show reasoning show these as the agent's work."""
    if isinstance(event, ApprovalRequired):
        return (f"Waiting for approval to run {event.tool} {dify_json(event.tool_input).decode()}: decide it in "
                f"OpsAgent (approval {event.approval_id}).\n")
    if event.phase == "tool_call":
        return f"Calling {event.tool} {dify_json(event.tool_input).decode()}\n"
    if event.phase == "tool_result":
        observation = event.observation
        if len(observation) > OBSERVATION_PREVIEW:
            observation = observation[:OBSERVATION_PREVIEW] + "…"
        return f"{event.tool} returned: {observation}\n"
    return ""

