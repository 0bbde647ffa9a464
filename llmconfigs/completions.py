"""A client's own chat completion request sent through a pool as it is (the OpenAI-compatible surface): the body
each member gets, its sampling parameters checked against the member's provider, failover before the first token as
in llmconfigs.routing, and the usage the answer reports.

Unlike PoolChatModel, nothing is translated to LangChain messages and back: the client's messages, tools,
response_format and the rest reach the provider byte for byte (only `model` and the parameters the provider names
differently change), and the provider's chunks come back as the JSON objects it sent."""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import openai
import orjson
from channels.db import database_sync_to_async
from django.conf import settings
from openai._base_client import get_platform
from openai._httpx2 import request_exceptions, status_exceptions, timeout_exceptions
from openai._models import FinalRequestOptions
from openai._streaming_cleanup import drain_response_async
from openai._utils import asyncify

from llmconfigs.errors import InvalidParameter, LLMConfigError, ProviderCallError
from llmconfigs.factory import provider_error
from llmconfigs.models import CallKind, LLMConfig
from llmconfigs.providers import parameter_errors, provider_spec
from llmconfigs.routing import (
    CANCELLED,
    FAILOVER_CATEGORIES,
    PROVIDER_EXCEPTIONS,
    attempt_note,
    failure_records_settle,
    health_restore,
    provider_failure_record,
)
from llmconfigs.usage import CallRecord

logger = logging.getLogger(__name__)

MAX_TOKENS_NAMES = ("max_tokens", "max_completion_tokens")
# What a delta carries once the model has said something (the first token, in routing's sense).
TOKEN_FIELDS = ("content", "tool_calls", "function_call", "reasoning_content", "refusal")


def member_body(config: LLMConfig, body: dict[str, Any], *, streaming: bool) -> dict[str, Any]:
    """The request `config` is sent: the client's `body` with the member's model name, the config's sampling
    parameters where the client gave none, the maximum under the name the provider knows, and the provider's
    required extra body. Raises InvalidParameter (naming the field) for a parameter outside the provider's range."""
    spec = provider_spec(config.provider)
    sent = dict(body)
    asked_max = next((sent.pop(name) for name in MAX_TOKENS_NAMES if sent.get(name) is not None), None)
    for name in MAX_TOKENS_NAMES:
        sent.pop(name, None)
    errors = parameter_errors(config.provider, temperature=sent.get("temperature"), top_p=sent.get("top_p"),
                              max_tokens=asked_max, frequency_penalty=sent.get("frequency_penalty"),
                              presence_penalty=sent.get("presence_penalty"))
    for name, message in errors.items():
        field = name
        if name == "max_tokens":
            field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise InvalidParameter(message, field=field)
    sent["model"] = config.model_name
    sent.setdefault("temperature", config.temperature)
    sent.setdefault("top_p", config.top_p)
    maximum = asked_max if asked_max is not None else config.max_tokens
    if maximum is not None:
        sent[spec.max_tokens_param] = maximum
    if spec.penalties:
        for name in ("frequency_penalty", "presence_penalty"):
            if name not in sent and getattr(config, name):
                sent[name] = getattr(config, name)
    extra = dict(spec.extra_body_for(config.model_name, streaming=streaming))
    extra.update((config.extra_config or {}).get("extra_body", {}))
    for name, value in extra.items():
        sent.setdefault(name, value)
    if streaming:
        sent["stream"] = True
        if spec.stream_usage:
            # Always asked for, so that the call is accounted; the client sees the usage only when it asked.
            sent["stream_options"] = {"include_usage": True}
    else:
        sent.pop("stream", None)
    return sent


def usage_tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    """The prompt and completion tokens a provider's `usage` reports (0 for a missing or nonsensical count)."""
    usage = usage or {}
    return _tokens(usage.get("prompt_tokens")), _tokens(usage.get("completion_tokens"))


def _tokens(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def chunk_has_token(chunk: dict[str, Any]) -> bool:
    """Whether the chunk carries something of the answer (not only the role, an empty text or the usage)."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if any(delta.get(name) for name in TOKEN_FIELDS):
            return True
    return False


def chunk_ends_head(chunk: dict[str, Any]) -> bool:
    """Whether a stream's chunks up to this one are all PoolCompletion waits for before passing the answer on (it
    fails over until then): the first chunk with a token, or one that finishes a choice."""
    return chunk_has_token(chunk) or any(choice.get("finish_reason") for choice in chunk.get("choices") or ())


class PoolCompletion:
    """One client request through the members of a pool, in their try order. A provider error before the first token
    (or, blocking, any provider error) sends the same request to the next member; once a token has gone out, errors
    go out as they are. `attempts` records every call, `served` the member that answered and `usage` what it reported;
    `calls` holds every provider call as a usage record (latency, first token, tokens, error category), written once
    when the request ends (llmconfigs.usage).

    `client(config, last)` returns the member's AsyncOpenAI client; members before the last get no SDK retries (the
    next member is the retry) and LLM_FIRST_TOKEN_TIMEOUT seconds to start answering."""

    def __init__(self, *, members: list[LLMConfig], client: Callable[[LLMConfig, bool], openai.AsyncOpenAI]):
        self.members = members
        self.client = client
        self.attempts: list[dict[str, Any]] = []
        self.served: LLMConfig | None = None
        self.usage: dict[str, Any] | None = None
        self.calls: list[CallRecord] = []
        self._served_started = 0.0  # time.monotonic() when the served member's call started
        self._recording: list[asyncio.Future] = []

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """The provider's whole answer (a `chat.completion` object) to a blocking request."""
        async def call(client: openai.AsyncOpenAI, sent: dict[str, Any]) -> dict[str, Any]:
            answer = await client.post("/chat/completions", body=sent, cast_to=object)
            if not isinstance(answer, dict):
                raise ProviderCallError("upstream_error", "The model provider's answer is not a JSON object.")
            return answer

        answer = await self._first_answer(body, call, streaming=False)
        self._note_usage(answer)
        return answer

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The provider's chunks (JSON objects) of a streaming request, from the member that answered."""
        opened: list[ChunkReader] = []

        async def call(client: openai.AsyncOpenAI, sent: dict[str, Any]) -> list[dict[str, Any]]:
            response = await stream_request_send(client, sent)
            stream = ChunkReader(response)
            opened.append(stream)
            head = []
            try:
                async for chunk in stream:
                    head.append(chunk)
                    if chunk_ends_head(chunk):
                        break
            except BaseException:
                await asyncio.shield(_close([stream]))  # a member given up on stops generating at once
                raise
            return head

        try:
            head = await self._first_answer(body, call, streaming=True)
            served = self.calls[-1]
            served.ttft_ms = served.latency_ms  # the head ends with the first token
            stream = opened[-1]
            for chunk in head:
                self._note_usage(chunk)
                yield chunk
            try:
                async for chunk in stream:
                    self._note_usage(chunk)
                    yield chunk
            except PROVIDER_EXCEPTIONS as exc:
                failure = provider_error(exc, api_key=self.served.api_key)
            else:
                return
            served.error_category = failure.category
            raise failure  # outside the except clause: the unscrubbed original is not kept as its context
        finally:
            if self.served is not None:  # the served call lasted until its stream ended (or the client left)
                self.calls[-1].latency_ms = round((time.monotonic() - self._served_started) * 1000, 1)
            # Closing the response closes the connection: a client that left stops the provider's generation.
            await asyncio.shield(_close(opened))

    def _note_usage(self, chunk: dict[str, Any]) -> None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
            if self.served is not None:
                served = self.calls[-1]
                served.prompt_tokens, served.completion_tokens = usage_tokens(self.usage)

    async def _first_answer(self, body: dict[str, Any], call: Callable[[openai.AsyncOpenAI, dict[str, Any]], Any],
                            *, streaming: bool) -> Any:
        """`call` on each member in turn until one answers (see the class)."""
        if not self.members:
            raise ProviderCallError("unavailable", "The model pool has no member.", status_code=503)
        failure: BaseException | None = None  # the last call's error
        for index, config in enumerate(self.members):
            last = index == len(self.members) - 1
            started = time.monotonic()
            record = CallRecord(config=config, kind=CallKind.COMPLETION)
            try:
                client = self.client(config, last)
                sent = member_body(config, body, streaming=streaming)
            except (LLMConfigError, ProviderCallError) as exc:
                # Refused before any call (a parameter outside this member's range, a key entered for another
                # endpoint): nothing is wrong with the provider, so its health stays as it is.
                self._attempt(config, getattr(exc, "category", "bad_request"), started)
                if last and failure is None:
                    raise  # no member was called: the request is refused, saying why (the parameter it names)
                if last:
                    break  # the request's error is the last call's, not this refusal
                continue
            try:
                result = await (call(client, sent) if last
                                else asyncio.wait_for(call(client, sent), settings.LLM_FIRST_TOKEN_TIMEOUT))
            except PROVIDER_EXCEPTIONS as exc:
                error = provider_error(exc, api_key=config.api_key)
            except asyncio.CancelledError:
                self._attempt(config, CANCELLED, started, call=record)  # the client left while it ran
                raise
            else:
                self._attempt(config, "", started, call=record)
                self.served, self._served_started = config, started
                if config.auth_failed_at is not None:  # the last resort took the key again
                    self._record(health_restore, config=config)
                return result
            self._attempt(config, error.category, started, call=record)
            # Recorded beside the request: the next member is called without waiting for the database.
            self._record(provider_failure_record, config=config, error=error)
            failure = error
            if last or error.category not in FAILOVER_CATEGORIES:
                break
        raise failure

    def _record(self, function: Callable[..., None], **kwargs: Any) -> None:
        self._recording.append(asyncio.ensure_future(database_sync_to_async(function)(**kwargs)))

    async def settle(self) -> None:
        """Wait until every failure of this request is recorded (counted, and its member's health updated)."""
        pending, self._recording = self._recording, []
        await failure_records_settle(pending)

    def _attempt(self, config: LLMConfig, category: str, started: float, *, call: CallRecord | None = None) -> None:
        """Note a call of `config` that failed with `category` or ("") answered. A member refused before any request
        (no `call`) made no provider call: it is counted as an attempt (as routing counts it), not as usage."""
        attempt_note(attempts=self.attempts, calls=self.calls, config=config, category=category, started=started,
                     call=call)


class _RequestTemplate:
    """What the SDK sends to a client's POST /chat/completions, built by the SDK once per client: its options (for
    its retry delays) and the URL, headers and timeout every such request of that client shares."""

    def __init__(self, client: openai.AsyncOpenAI):
        self.options = FinalRequestOptions.construct(method="post", url="/chat/completions", json_data={})
        request = client._build_request(self.options)
        self.url = request.url
        self.headers = [(name, value) for name, value in request.headers.multi_items()
                        if name.lower() not in ("content-length", "transfer-encoding")]
        self.extensions = request.extensions

    def request(self, content: bytes, *, retries_taken: int) -> httpx2.Request:
        headers = httpx2.Headers(self.headers)
        headers["x-stainless-retry-count"] = str(retries_taken)
        return httpx2.Request("POST", self.url, headers=headers, content=content, extensions=dict(self.extensions))


_templates: weakref.WeakKeyDictionary[openai.AsyncOpenAI, _RequestTemplate] = weakref.WeakKeyDictionary()


async def stream_request_send(client: openai.AsyncOpenAI, body: dict[str, Any]) -> httpx2.Response:
    """POST `body` to the client's /chat/completions and return the response, its body unread, as
    `client.post("/chat/completions", body=body, cast_to=httpx2.Response, stream=True)` does: the same URL, headers
    and timeout, the SDK's retries (its own decision whether to retry and how long to wait first) and its errors
    (APIStatusError for a refusing status, APITimeoutError, APIConnectionError). Without its per-request copies of
    the options and its request building, which cost more than half a millisecond before the first byte goes out."""
    template = _templates.get(client)
    if template is None:
        if client._platform is None:  # its headers name the platform, which may take blocking reads to learn
            client._platform = await asyncify(get_platform)()
        template = _templates[client] = _RequestTemplate(client)
    content = orjson.dumps(body)
    max_retries = client.max_retries
    for retries_taken in range(max_retries + 1):
        retry = retries_taken < max_retries
        request = template.request(content, retries_taken=retries_taken)
        try:
            response = await client._client.send(request, stream=True)
        except timeout_exceptions() as exc:
            if retry:
                await client._sleep_for_retry(retries_taken=retries_taken, max_retries=max_retries,
                                              options=template.options, response=None)
                continue
            raise openai.APITimeoutError(request=request) from exc
        except openai.OpenAIError:
            raise
        except request_exceptions() as exc:
            if retry:
                await client._sleep_for_retry(retries_taken=retries_taken, max_retries=max_retries,
                                              options=template.options, response=None)
                continue
            raise openai.APIConnectionError(request=request) from exc
        try:
            response.raise_for_status()
        except status_exceptions():
            if retry and client._should_retry(response):
                await response.aclose()
                await client._sleep_for_retry(retries_taken=retries_taken, max_retries=max_retries,
                                              options=template.options, response=response)
                continue
            if not response.is_closed:
                await response.aread()
            raise client._make_status_error_from_response(response) from None
        return response
    raise AssertionError("unreachable: the last attempt returns or raises")


class ChunkReader:
    """The chunks of a provider's streamed answer, each parsed once (orjson) into the dict passed on, read as the
    SDK's AsyncStream reads them without its per-event layers: the server-sent events' `data` (CR, LF or CRLF line
    ends, comments, multi-line data), up to `[DONE]` (the rest of the body drained, so the connection is reused); a
    chunk holding an `error` raises openai.APIError with it as the body, and a transport failure APITimeoutError or
    APIConnectionError, as the SDK does."""

    def __init__(self, response: httpx2.Response):
        self.response = response
        self._chunks = self._read()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._chunks  # one iterator: a loop that stops early leaves the rest to the next

    async def close(self) -> None:
        await self._chunks.aclose()
        await self.response.aclose()

    async def _read(self) -> AsyncIterator[Any]:
        response = self.response
        try:
            async for data in self._data():
                if data.startswith(b"[DONE]"):
                    if response.http_version == "HTTP/1.1":
                        await drain_response_async(response)
                    break
                chunk = orjson.loads(data)
                if isinstance(chunk, dict) and chunk.get("error"):
                    error = chunk["error"]
                    message = error.get("message") if isinstance(error, dict) else None
                    if not message or not isinstance(message, str):
                        message = "An error occurred during streaming"
                    raise openai.APIError(message, request=response.request, body=error)
                yield chunk
        finally:
            await response.aclose()

    async def _data(self) -> AsyncIterator[bytes]:
        """The `data` of each event (its data lines joined by LF)."""
        data: list[bytes] = []
        event = last_id = False  # an `event` field in the event being read; an `id` field seen in any event
        retry = False
        pending = b""
        try:
            async for received in self.response.aiter_bytes():
                pending += received
                if b"\r" in pending:
                    # A CR at the end may be the first half of a CRLF: it waits for the next bytes.
                    cut = len(pending) - 1 if pending.endswith(b"\r") else len(pending)
                    text, rest = pending[:cut].replace(b"\r\n", b"\n").replace(b"\r", b"\n"), pending[cut:]
                else:
                    text, rest = pending, b""
                *lines, tail = text.split(b"\n")
                pending = tail + rest
                for line in lines:
                    if not line:
                        if data or event or last_id or retry:
                            yield b"\n".join(data)
                        data, event, retry = [], False, False
                    elif line[0] == 58:  # b":", a comment
                        continue
                    else:
                        name, _, value = line.partition(b":")
                        if value[:1] == b" ":
                            value = value[1:]
                        if name == b"data":
                            data.append(value)
                        elif name == b"event":
                            event = bool(value)
                        elif name == b"id":
                            last_id = last_id if b"\0" in value else bool(value)
                        elif name == b"retry":
                            retry = retry or _is_int(value)
        except timeout_exceptions() as exc:
            raise openai.APITimeoutError(request=self.response.request) from exc
        except request_exceptions() as exc:
            raise openai.APIConnectionError(request=self.response.request) from exc


def _is_int(value: bytes) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


async def _close(opened: list[ChunkReader]) -> None:
    for stream in opened:
        try:
            await stream.close()
        except Exception:  # noqa: BLE001 - a connection already gone has nothing left to close
            logger.debug("closing a provider stream failed", exc_info=True)

