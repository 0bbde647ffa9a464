"""Builds LangChain chat and embedding models from an LLMConfig: every provider through its OpenAI-compatible API."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import httpx2
import openai
from django.conf import settings
from langchain_core.language_models.chat_models import _gen_info_and_msg_metadata, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.utils.utils import LC_ID_PREFIX
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from openai._base_client import make_request_options

from llmconfigs.errors import InvalidParameter, ProviderCallError
from llmconfigs.models import LLMConfig
from llmconfigs.providers import parameter_errors, provider_spec
from llmconfigs.secrets import scrub

OVERRIDABLE = ("temperature", "max_tokens", "top_p")
# Providers that need no key still need a non-empty value in the OpenAI client.
PLACEHOLDER_KEY = "not-needed"


def effective_base_url(config: LLMConfig) -> str:
    return (config.base_url or provider_spec(config.provider).default_base_url).rstrip("/")


def _api_key_for_call(config: LLMConfig) -> str:
    """The key a client of `config` is built with. A key entered for another endpoint is refused before any client
    exists: whatever changed the base URL or provider without the key (the services refuse that), the key stays
    where its owner sent it."""
    refusal = config.key_origin_error()
    if refusal:
        raise ProviderCallError("auth", refusal)
    return config.api_key or PLACEHOLDER_KEY


def effective_parameters(config: LLMConfig, **overrides: Any) -> dict[str, Any]:
    """The sampling parameters a call with `overrides` sends, after per-provider validation of the overrides.

    Raises InvalidParameter naming the field for an override outside the provider's range or of the wrong type."""
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise InvalidParameter(f"Unknown parameter(s): {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
    params: dict[str, Any] = {"temperature": config.temperature, "top_p": config.top_p, "max_tokens": config.max_tokens}
    for name, value in overrides.items():
        if value is None:
            continue
        params[name] = _coerce(name, value)
    errors = parameter_errors(config.provider, temperature=params["temperature"], top_p=params["top_p"],
                              max_tokens=params["max_tokens"])
    # Only complain about what the caller asked for; a stored config was validated when it was saved.
    for name in OVERRIDABLE:
        if name in errors and overrides.get(name) is not None:
            raise InvalidParameter(errors[name], field=name)
    spec = provider_spec(config.provider)
    if spec.penalties:
        params["frequency_penalty"] = config.frequency_penalty
        params["presence_penalty"] = config.presence_penalty
    return params


def _coerce(name: str, value: Any) -> float | int:
    if isinstance(value, bool):
        raise InvalidParameter(f"{name} must be a number.", field=name)
    try:
        if name == "max_tokens":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        kind = "an integer" if name == "max_tokens" else "a number"
        raise InvalidParameter(f"{name} must be {kind}.", field=name) from None


def chat_model(
    config: LLMConfig,
    *,
    streaming: bool = True,
    timeout: float | None = None,
    max_retries: int | None = None,
    **overrides: Any,
) -> ChatOpenAI:
    """A ChatOpenAI for `config` with per-call `overrides` (temperature, max_tokens, top_p), range-checked."""
    spec = provider_spec(config.provider)
    params = effective_parameters(config, **overrides)
    extra_body = dict(spec.extra_body_for(config.model_name, streaming=streaming))
    extra_body.update((config.extra_config or {}).get("extra_body", {}))
    kwargs: dict[str, Any] = {
        "model": config.model_name,
        "api_key": _api_key_for_call(config),
        "base_url": effective_base_url(config),
        "temperature": params["temperature"],
        "top_p": params["top_p"],
        "streaming": streaming,
        "stream_usage": spec.stream_usage,
        "timeout": timeout if timeout is not None else settings.LLM_REQUEST_TIMEOUT,
        "max_retries": max_retries if max_retries is not None else settings.LLM_MAX_RETRIES,
    }
    if params["max_tokens"] is not None:
        if spec.max_tokens_param == "max_completion_tokens":
            kwargs["max_tokens"] = params["max_tokens"]  # ChatOpenAI sends it as max_completion_tokens
        else:
            extra_body["max_tokens"] = params["max_tokens"]
    if spec.penalties:
        if params["frequency_penalty"]:
            kwargs["frequency_penalty"] = params["frequency_penalty"]
        if params["presence_penalty"]:
            kwargs["presence_penalty"] = params["presence_penalty"]
    if extra_body:
        kwargs["extra_body"] = extra_body
    model = ChatOpenAI(**kwargs)
    model.async_client = ProviderCompletions(model.async_client, api_key=config.api_key)
    return model


def chat_model_key(model: Any) -> str:
    """The API key a chat model sends (empty for a model that has none), for scrubbing its errors."""
    key = getattr(model, "openai_api_key", None)
    return key.get_secret_value() if key is not None else ""


class ProviderCompletions:
    """The OpenAI SDK's async chat completions as OpsAgent calls them: errors leave it scrubbed of the key, and a
    streaming `create` posts LangChain's payload as it is.

    Errors: a provider may echo the key (or the Authorization header) in its error text, and whatever sees the
    exception next (LangChain's callbacks, LangGraph's `__error__` checkpoint write, logs) would keep it. Each error
    is replaced by a scrubbed copy of the same class (`provider_exception_scrubbed`) before it leaves this client.

    Payload: LangChain hands `create` a payload that is already the wire format (plain JSON values, only the keys it
    sets). The SDK would first walk it against its parameter types to drop omitted values and rename aliased keys,
    which the chat completion parameters do not have. That walk costs about 0.1 ms per message of the conversation,
    on the way to every first token: 10 ms for a conversation of a hundred messages. Everything else (retries, auth,
    timeouts, extra headers and body, the streamed response) is the SDK's own `post`. Other calls are the SDK's,
    unchanged."""

    def __init__(self, completions: Any, *, api_key: str):
        self._completions = completions
        self._api_key = api_key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._completions, name)

    async def create(self, *, extra_headers: Any = None, extra_query: Any = None, extra_body: Any = None,
                     timeout: Any = openai.NOT_GIVEN, **body: Any) -> Any:
        try:
            if not body.get("stream"):
                return await self._completions.create(extra_headers=extra_headers, extra_query=extra_query,
                                                      extra_body=extra_body, timeout=timeout, **body)
            # The SDK's retries and its errors for a refusing status, and the raw response; its chunks are read as
            # plain dicts, which is what LangChain makes of the SDK's chunk models anyway (model_dump): building
            # those models was half of the server's CPU per streamed chunk.
            from llmconfigs.completions import ChunkReader, stream_request_send

            if extra_headers or extra_query or timeout is not openai.NOT_GIVEN:
                options = make_request_options(extra_headers=extra_headers, extra_query=extra_query,
                                               extra_body=extra_body, timeout=timeout, security={"bearer_auth": True})
                response = await self._completions._post("/chat/completions", body=body, options=options,
                                                         cast_to=httpx2.Response, stream=True)
            else:
                # What LangChain sends: the SDK's request for this client prepared once, the extra body merged at the
                # top level as the SDK merges it (llmconfigs.completions.stream_request_send).
                response = await stream_request_send(self._completions._client, {**body, **(extra_body or {})})
            return ScrubbedStream(ChunkReader(response), api_key=self._api_key)
        except openai.OpenAIError as exc:
            error = provider_exception_scrubbed(exc, api_key=self._api_key)
        raise error  # outside the except clause, so the original is not kept as its context


class ScrubbedStream:
    """A streamed completion read as plain chunk dicts (llmconfigs.completions.ChunkReader) whose errors mid-stream (an
    `error` event, a dropped connection) leave scrubbed, like the call's own."""

    def __init__(self, reader: Any, *, api_key: str):
        self._reader = reader
        self._api_key = api_key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    async def __aenter__(self) -> ScrubbedStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._reader.close()

    async def close(self) -> None:
        await self._reader.close()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        error = None
        try:
            async for chunk in self._reader:
                for choice in (chunk.get("choices") if isinstance(chunk, dict) else None) or ():
                    # The SDK's model always has a delta (LangChain indexes it); some providers leave it out of the
                    # last choice, which carries only the finish reason.
                    if isinstance(choice, dict):
                        choice.setdefault("delta", {})
                yield chunk
        except openai.OpenAIError as exc:
            error = provider_exception_scrubbed(exc, api_key=self._api_key)
        if error is not None:
            raise error


class Delta:
    """One streamed chunk of a chat call, as a run reads it: its text, whether it opens the answer (text, a tool call
    or reasoning: what a pool calls the first token), the token counts it reports, and the finish reason and model
    name of the last choice chunk. When asked for (`chat_deltas(merged=True)`), a chunk that says more than text (a
    tool call fragment, the finish, the usage) also carries `generation`: LangChain's own reading of it, which
    `StreamedAnswer` merges into the message."""

    __slots__ = ("text", "opens", "prompt_tokens", "completion_tokens", "finish_reason", "model_name", "generation")

    def __init__(self, text: str = "", *, opens: bool = False, prompt_tokens: int = 0, completion_tokens: int = 0,
                 finish_reason: str = "", model_name: str = "", generation: Any = None):
        self.text = text
        self.opens = opens or bool(text)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.finish_reason = finish_reason
        self.model_name = model_name
        self.generation = generation

    @classmethod
    def of_chunk(cls, chunk: dict[str, Any]) -> Delta:
        """A provider's chunk (a plain dict, as `ChunkReader` reads it), read as LangChain reads a chat completion
        chunk: the first choice's delta, and the usage when the chunk has one."""
        usage = chunk.get("usage") or {}
        delta = cls(prompt_tokens=usage.get("prompt_tokens") or 0,
                    completion_tokens=usage.get("completion_tokens") or 0)
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            said = choice.get("delta") or {}
            text = said.get("content")
            if isinstance(text, str) and text:
                delta.text = text
            delta.opens = bool(delta.text or said.get("tool_calls") or said.get("function_call")
                               or said.get("reasoning_content") or said.get("reasoning"))
            if choice.get("finish_reason"):
                delta.finish_reason = choice["finish_reason"]
                delta.model_name = chunk.get("model") or ""
        return delta

    @classmethod
    def of_generation(cls, chunk: Any) -> Delta:
        """A LangChain generation chunk (`ChatGenerationChunk`) as a Delta."""
        message = chunk.message
        usage = getattr(message, "usage_metadata", None) or {}
        text = message.text if isinstance(message.text, str) else message.text()
        info = chunk.generation_info or {}
        return cls(text, opens=generation_opens(chunk),
                   prompt_tokens=usage.get("input_tokens", 0), completion_tokens=usage.get("output_tokens", 0),
                   finish_reason=info.get("finish_reason") or "", model_name=info.get("model_name") or "",
                   generation=chunk)


def _text_only(chunk: dict[str, Any]) -> bool:
    """Whether LangChain reads `chunk` as nothing but its text: an assistant delta without tool calls, function call
    or id, and no finish, log probabilities or usage. Such a chunk adds only its text to the merged message (and
    the provider name every chunk adds)."""
    if chunk.get("usage") or chunk.get("type") == "content.delta":
        return False
    choices = chunk.get("choices")
    if not choices:
        return False
    choice = choices[0]
    said = choice.get("delta")
    return (isinstance(said, dict) and not choice.get("finish_reason") and not choice.get("logprobs")
            and not said.get("tool_calls") and not said.get("function_call") and said.get("id") is None
            and said.get("role") in (None, "assistant"))


def generation_opens(chunk: Any) -> bool:
    """Whether a LangChain generation chunk opens the answer: text, a tool call or anything the provider added."""
    message = chunk.message
    return bool(message.content or message.additional_kwargs or getattr(message, "tool_call_chunks", None))


async def chat_deltas(model: Any, messages: list[Any], *, merged: bool = False, **request: Any,
                      ) -> AsyncIterator[Delta]:
    """The streamed answer of `model` (a chat model of `chat_model`) to `messages`, as Deltas read straight from the
    provider's chunk dicts. `request`: what a bound model adds to the call (`tools`). The request is the one
    LangChain sends (its payload, through `ProviderCompletions`: the SDK's retries, scrubbed errors); only LangChain's
    message chunk objects and callbacks per streamed chunk are left out, which were a third of the server's CPU for
    a streamed answer. With `merged`, the chunks that say more than text carry LangChain's reading of them, for
    `StreamedAnswer`. A model LangChain would send elsewhere than Chat Completions (the Responses API), or one that
    is not a ChatOpenAI, streams through LangChain."""
    kwargs: dict[str, Any] = {"stream": True, **request}
    if isinstance(model, ChatOpenAI) and model.stream_usage:
        kwargs["stream_options"] = {"include_usage": True}
    if not isinstance(model, ChatOpenAI) or model._use_responses_api({**kwargs, **model.model_kwargs}):
        async for chunk in model._astream(messages, **request):
            yield Delta.of_generation(chunk)
        return
    payload = model._get_request_payload(messages, **kwargs)
    stream = await model.async_client.create(**payload)
    async with stream:
        async for chunk in stream:
            if isinstance(chunk, dict):
                delta = Delta.of_chunk(chunk)
                if merged and not _text_only(chunk):
                    delta.generation = model._convert_chunk_to_generation_chunk(chunk, AIMessageChunk, {})
                yield delta


class StreamedAnswer:
    """The message LangChain's `ainvoke` returns for a streamed answer, merged from the answer's Deltas (of
    `chat_deltas(merged=True)`) by LangChain's own merge, once per answer instead of once per chunk: the text of
    the chunks that say nothing else is joined first, then merged with LangChain's readings of the other chunks in
    their order (tool call fragments by index, invalid JSON arguments as `invalid_tool_calls`, usage, finish reason
    and model name), as `BaseChatModel` merges a stream (the run's id for chunks without one, a last empty chunk).

    Without `merged` (the Deltas of `chat_deltas()`, for an answer that can call no tool: a chat turn binds none),
    the message holds what the Deltas themselves read, which is all such an answer says: the text, the usage, the
    finish reason and model name."""

    def __init__(self, *, merged: bool = True) -> None:
        self.merged = merged
        self._parts: list[Any] = []  # ChatGenerationChunks and lists of consecutive text-only chunks' texts
        self._texts: list[str] | None = None
        self._usage: dict[str, int] | None = None  # without `merged`: once a Delta reported tokens
        self._metadata: dict[str, Any] = {}  # without `merged`: the finish reason and model name

    def add(self, delta: Delta) -> None:
        if delta.generation is not None:
            self._parts.append(delta.generation)
            self._texts = None
            return
        if self._texts is None:
            self._texts = [delta.text]
            self._parts.append(self._texts)
        else:
            self._texts.append(delta.text)
        if self.merged:
            return  # what else a chunk says, LangChain's reading of it carries
        if delta.prompt_tokens or delta.completion_tokens:
            usage = self._usage or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
            usage["input_tokens"] += delta.prompt_tokens
            usage["output_tokens"] += delta.completion_tokens
            usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
            self._usage = usage
        if delta.finish_reason:
            self._metadata = {"finish_reason": delta.finish_reason, "model_name": delta.model_name}

    def message(self) -> AIMessage:
        """Raises ValueError for a merged answer without a chunk, as LangChain does."""
        if not self.merged:
            return AIMessage(content="".join(self._texts or ()), response_metadata=self._metadata,
                             usage_metadata=self._usage)
        run_id = f"{LC_ID_PREFIX}-{uuid.uuid4()}"
        chunks = []
        for part in self._parts:
            if isinstance(part, list):
                part = ChatGenerationChunk(message=AIMessageChunk(content="".join(part),
                                                                  response_metadata={"model_provider": "openai"}))
            else:
                part.message.response_metadata = _gen_info_and_msg_metadata(part)
            if part.message.id is None:
                part.message.id = run_id
            chunks.append(part)
        if chunks and isinstance(chunks[-1].message, AIMessageChunk) and not chunks[-1].message.chunk_position:
            empty = "" if isinstance(chunks[-1].message.content, str) else []
            chunks.append(ChatGenerationChunk(message=AIMessageChunk(content=empty, chunk_position="last", id=run_id)))
        generation = generate_from_stream(iter(chunks)).generations[0]
        generation.message.response_metadata = _gen_info_and_msg_metadata(generation)
        return generation.message


def embeddings(config: LLMConfig, *, timeout: float | None = None, max_retries: int | None = None,
               ) -> OpenAIEmbeddings:
    spec = provider_spec(config.provider)
    return OpenAIEmbeddings(
        model=config.model_name,
        api_key=_api_key_for_call(config),
        base_url=effective_base_url(config),
        check_embedding_ctx_length=False,
        chunk_size=int((config.extra_config or {}).get("embedding_batch_size", spec.embedding_batch_size)),
        timeout=timeout if timeout is not None else settings.LLM_REQUEST_TIMEOUT,
        max_retries=max_retries if max_retries is not None else settings.LLM_MAX_RETRIES,
    )


def provider_exception_scrubbed(exc: BaseException, *, api_key: str) -> BaseException:
    """`exc` as it may leave a provider call: for the SDK's errors a copy of the same class (so the status code,
    error type and code, and every mapping of them, stay as they were) whose message, body and response text hold no
    key and whose request has no credential headers; any other exception whose text holds the key becomes an
    `upstream_error` ProviderCallError with that text scrubbed; anything else is returned as it is."""
    if isinstance(exc, openai.APIStatusError):
        response = exc.response
        request = _keyless_request(response.request, api_key)
        try:
            text = response.text
        except Exception:  # noqa: BLE001 - a body that was never read has nothing to scrub
            text = ""
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in ("content-encoding",
                                                                                  "content-length")]
        response = type(response)(response.status_code, headers=headers, content=scrub(text, api_key).encode(),
                                  request=request)
        return type(exc)(scrub(exc.message, api_key), response=response, body=_scrubbed(exc.body, api_key))
    if isinstance(exc, openai.APITimeoutError):
        return type(exc)(request=_keyless_request(exc.request, api_key))
    if isinstance(exc, openai.APIConnectionError):
        return type(exc)(message=scrub(exc.message, api_key), request=_keyless_request(exc.request, api_key))
    if isinstance(exc, openai.APIError):
        message = scrub(exc.message, api_key)
        request = _keyless_request(exc.request, api_key)
        body = _scrubbed(exc.body, api_key)
        try:
            return type(exc)(message, request, body=body)
        except TypeError:  # a subclass with another signature: the base class keeps the category
            return openai.APIError(message, request, body=body)
    text = str(exc)
    if text != scrub(text, api_key):
        return ProviderCallError("upstream_error", scrub(text, api_key), status_code=getattr(exc, "status_code", None))
    return exc


def _keyless_request(request: Any, api_key: str) -> Any:
    """A copy of an SDK request without the headers that carry credentials (and without the body)."""
    headers = [(k, v) for k, v in request.headers.items()
               if k.lower() not in ("authorization", "api-key", "x-api-key") and scrub(v, api_key) == v]
    return type(request)(request.method, request.url, headers=headers)


def _scrubbed(value: Any, api_key: str) -> Any:
    if isinstance(value, str):
        return scrub(value, api_key)
    if isinstance(value, dict):
        return {k: _scrubbed(v, api_key) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v, api_key) for v in value]
    return value


def provider_error(exc: BaseException, *, api_key: str = "") -> ProviderCallError:
    """Classify an exception raised by a provider call into a ProviderCallError with the key scrubbed."""
    if isinstance(exc, ProviderCallError):
        return exc
    status = getattr(exc, "status_code", None)
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        category = "auth"
    elif isinstance(exc, openai.RateLimitError):
        category = "rate_limit"
    elif isinstance(exc, openai.APITimeoutError | httpx.TimeoutException | TimeoutError):
        category = "timeout"
    elif isinstance(exc, openai.APIConnectionError | httpx.ConnectError | ConnectionError):
        category = "unreachable"
    elif isinstance(exc, openai.BadRequestError | openai.NotFoundError | openai.UnprocessableEntityError):
        category = "bad_request"
    else:
        category = "upstream_error"
    message = _provider_message(exc)
    return ProviderCallError(category, scrub(message, api_key), status_code=status)


def _provider_message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException | TimeoutError):
        return "The model provider did not answer in time."
    if isinstance(exc, openai.APIConnectionError | httpx.ConnectError | ConnectionError):
        return "Could not reach the model provider."
    text = str(exc) or exc.__class__.__name__
    return text
