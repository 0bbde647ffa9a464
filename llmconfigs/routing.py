"""Model routing: the order in which a pool's members are tried, their health, and the chat model that fails over
from one member to the next before the first token.

A pool is the active chat configs with the same route. Members are tried by priority (higher first); within a
priority, in a random order drawn by weight (3 vs 1 puts the first one first three times out of four). A member
that is cooling down (a 429, or LLM_COOLDOWN_FAILURES failures within LLM_COOLDOWN_WINDOW seconds) and a member whose
key the provider refused (auth_failed, until a connection test succeeds or its key changes) are not tried while the
pool has an available member; when it has none, they are tried as a last resort (so a pool of one config behaves as
that config always did). The cooldown lives in Django's cache, so every worker sees it."""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import httpx
import openai
from channels.db import database_sync_to_async
from django.conf import settings
from django.core.cache import cache
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.chat_models import agenerate_from_stream
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import Field, PrivateAttr

from llmconfigs.errors import LLMConfigError, ProviderCallError
from llmconfigs.factory import Delta, chat_deltas, generation_opens, provider_error, provider_exception_scrubbed
from llmconfigs.models import CallKind, LLMConfig
from llmconfigs.secrets import scrub
from llmconfigs.usage import CallRecord
from opsagent.common.metrics import provider_call_observe

logger = logging.getLogger(__name__)

# Provider errors after which the same request goes to the next member (before its first token).
FAILOVER_CATEGORIES = frozenset({"auth", "rate_limit", "timeout", "unreachable", "upstream_error"})
# Exceptions that are the provider's doing (anything else is a fault of ours and is not retried elsewhere).
PROVIDER_EXCEPTIONS = (openai.OpenAIError, httpx.HTTPError, TimeoutError, ConnectionError, ProviderCallError)
# The error category of a call cut off before it answered: its client left, or the run was stopped.
CANCELLED = "cancelled"

_COOL_KEY = "llmhealth:cool:{}"
_FAILURES_KEY = "llmhealth:failures:{}"


# ----- health (reads) -----

def cooling_until(config_ids: Sequence[Any]) -> dict[str, float]:
    """Members cooling down now -> until when (epoch seconds): one round trip to the cache for the whole pool."""
    if not config_ids:
        return {}
    keys = {_COOL_KEY.format(pk): str(pk) for pk in config_ids}
    now = time.time()
    return {keys[key]: until for key, until in cache.get_many(list(keys)).items() if until and until > now}


def health_of(config: LLMConfig, *, cooling: dict[str, float] | None = None) -> dict[str, Any]:
    """{"state": "ok" | "cooling_down" | "auth_failed", "until": ISO time or None, "last_error": str}."""
    if cooling is None:
        cooling = cooling_until([config.pk])
    if config.auth_failed_at is not None:
        state, until = "auth_failed", None
    elif str(config.pk) in cooling:
        state, until = "cooling_down", datetime.fromtimestamp(cooling[str(config.pk)], UTC).isoformat()
    else:
        state, until = "ok", None
    return {"state": state, "until": until, "last_error": config.last_error}


HEALTH_STATES = ("ok", "cooling_down", "auth_failed")


def pool_health_metrics() -> Iterator[Metric]:
    """The health of every active chat config, for /metrics: one series per state, 1 for the one it is in."""
    family = GaugeMetricFamily("opsagent_pool_member_health", "Health of each active chat config (pool member): 1 for "
                               "its state (ok, cooling_down, auth_failed), 0 for the others.",
                               labels=["route", "config", "state"])
    members = list(LLMConfig.objects.filter(is_active=True, is_embedding=False)
                   .only("id", "name", "route", "model_name", "auth_failed_at", "last_error"))
    cooling = cooling_until([m.pk for m in members])
    for member in members:
        state = health_of(member, cooling=cooling)["state"]
        for candidate in HEALTH_STATES:
            family.add_metric([member.route_name, member.name, candidate], 1.0 if candidate == state else 0.0)
    yield family


def pool_order(members: list[LLMConfig], *, first: LLMConfig | None = None) -> list[LLMConfig]:
    """The available `members` in the order to try them: `first` (when it is one of them), then by priority with a
    weighted random order within each priority. Members cooling down or refused (auth_failed) are left out; only when
    no member is available are they the order, as a last resort (cooling down first, the refused last). A pool with
    an available member thus never calls an unavailable one, and a pool of one config behaves as that config always
    did: it is called, and its error is the turn's."""
    if first is not None and all(m.pk != first.pk for m in members):
        members = [first, *members]
    if len(members) == 1:
        return list(members)  # available or its own last resort: no health to read
    cooling = cooling_until([m.pk for m in members])
    refused = [m for m in members if m.auth_failed_at is not None]
    cooled = [m for m in members if m.auth_failed_at is None and str(m.pk) in cooling]
    available = [m for m in members if m.auth_failed_at is None and str(m.pk) not in cooling]
    ordered: list[LLMConfig] = []
    if first is not None and any(m.pk == first.pk for m in available):
        ordered.append(first)
        available = [m for m in available if m.pk != first.pk]
    for priority in sorted({m.priority for m in available}, reverse=True):
        ordered.extend(_weighted_order([m for m in available if m.priority == priority]))
    if ordered:
        return ordered
    return sorted(cooled, key=lambda m: cooling[str(m.pk)]) + refused


def _weighted_order(members: list[LLMConfig]) -> list[LLMConfig]:
    """A random order in which each member comes first in proportion to its weight (sampling without replacement)."""
    left = list(members)
    ordered = []
    while left:
        pick = random.choices(range(len(left)), weights=[max(m.weight, 1) for m in left])[0]
        ordered.append(left.pop(pick))
    return ordered


# ----- health (writes, from a provider call) -----

def provider_failure_record(*, config: LLMConfig, error: ProviderCallError) -> None:
    """Count a failed call on `config` and update its health: a 429 cools it down at once, LLM_COOLDOWN_FAILURES
    failures within LLM_COOLDOWN_WINDOW seconds too; a 401/403 marks it auth_failed (in the database)."""
    from llmconfigs.services import llm_config_cool_down, llm_config_mark_auth_failed, llm_config_record_usage

    # Scrubbed here too, whatever the caller did: this text is shown in the admin and the API.
    error = ProviderCallError(error.category, scrub(error.message, config.api_key), status_code=error.status_code)
    llm_config_record_usage(config_id=config.pk, failed=True, last_error=f"{error.category}: {error.message}")
    if error.category == "auth":
        llm_config_mark_auth_failed(config=config, error=error)
        return
    if error.category not in FAILOVER_CATEGORIES:
        return
    if error.category != "rate_limit":
        key = _FAILURES_KEY.format(config.pk)
        cache.add(key, 0, settings.LLM_COOLDOWN_WINDOW)
        try:
            failures = cache.incr(key)
        except ValueError:  # expired between add and incr: this failure starts a new window
            cache.set(key, 1, settings.LLM_COOLDOWN_WINDOW)
            failures = 1
        if failures < settings.LLM_COOLDOWN_FAILURES:
            return
    until = time.time() + settings.LLM_COOLDOWN_SECONDS
    # add, not set: the first worker to cool the member down keeps its window and writes the one audit record.
    if cache.add(_COOL_KEY.format(config.pk), until, settings.LLM_COOLDOWN_SECONDS):
        cache.delete(_FAILURES_KEY.format(config.pk))
        llm_config_cool_down(config=config, error=error, until=until)


def health_restore(*, config: LLMConfig) -> None:
    """A refused member answered (tried as the last resort): its key works, it is back in rotation."""
    from llmconfigs.services import llm_config_health_clear

    llm_config_health_clear(config=config, source="router")


def cooldown_clear(config_id: Any) -> None:
    cache.delete_many([_COOL_KEY.format(config_id), _FAILURES_KEY.format(config_id)])


# ----- the pool's chat model -----

class PoolChatModel(BaseChatModel):
    """A chat model over the members of a pool, in their try order. A provider error before the first token (no
    text, tool call or reasoning yet) sends the same request to the next member; once a token has gone out, errors
    go out as they are. `attempts` records every call (config, error category, latency), `served` the member that
    answered, `calls` every call as a usage record (its duration, first token and tokens too: written when the turn
    ends, llmconfigs.usage). One instance serves one turn; each of its model calls is a step (a tool loop makes
    several).

    `build(config, last)` returns the member's chat model; members before the last are built without the SDK's own
    retries (the next member is the retry) and wait at most LLM_FIRST_TOKEN_TIMEOUT for their first token."""

    members: list[Any]
    build: Callable[[LLMConfig, bool], BaseChatModel]
    attempts: list[dict[str, Any]] = Field(default_factory=list)
    served: Any = None
    calls: list[Any] = Field(default_factory=list)  # CallRecord
    steps: int = 0
    streaming: bool = True
    _recording: list[asyncio.Future] = PrivateAttr(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "opsagent-pool"

    @cached_property
    def _serialized(self) -> dict[str, Any]:
        # What callbacks are told about the model: its members' names, never their configs or keys.
        return {"lc": 1, "type": "not_implemented", "id": ["llmconfigs", "PoolChatModel"],
                "repr": f"PoolChatModel({', '.join(m.name for m in self.members)})"}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"members": [str(m.pk) for m in self.members]}

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        return self.bind(tools=[convert_to_openai_tool(tool) for tool in tools], **kwargs)

    def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:
        raise NotImplementedError("PoolChatModel is asynchronous only.")

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop=stop, **kwargs))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in self._failover(lambda model: model._astream(messages, stop=stop, **kwargs),
                                          opens=generation_opens, count=_generation_count):
            yield chunk

    async def astream_deltas(self, messages: list[BaseMessage], *, merged: bool = False,
                             **request: Any) -> AsyncIterator[Delta]:
        """The answer to `messages` of a step (`request`: the `tools` it may call), with the same failover and
        records as `astream`, streamed as `Delta`s read from the provider's chunks without LangChain's per-chunk
        objects and callbacks (llmconfigs.factory.chat_deltas; `merged` for a `StreamedAnswer`)."""
        async for delta in self._failover(lambda model: chat_deltas(model, messages, merged=merged, **request),
                                          opens=_delta_opens, count=_delta_count):
            yield delta

    async def _failover(self, open_stream: Callable[[Any], AsyncIterator[Any]], *, opens: Callable[[Any], bool],
                        count: Callable[[CallRecord, Any], None]) -> AsyncIterator[Any]:
        """The chunks of the first member whose stream opens (see the class), from `open_stream(member's model)`:
        `opens(chunk)` tells a first token, `count(call, chunk)` adds a chunk's token counts to its call."""
        if not self.members:
            raise ProviderCallError("unavailable", "The model pool has no member.", status_code=503)
        failure: BaseException | None = None  # the last call's error, scrubbed
        self.steps += 1
        for index, config in enumerate(self.members):
            last = index == len(self.members) - 1
            started = time.monotonic()
            call = CallRecord(config=config, kind=CallKind.CHAT if self.steps == 1 else CallKind.TOOL_STEP)
            try:
                model = self.build(config, last)
            except (LLMConfigError, ProviderCallError) as exc:
                # Refused before any call: a parameter outside this member's provider's range, a key entered for
                # another endpoint. Nothing is wrong with the provider, so its health stays as it is.
                self._attempt(config, getattr(exc, "category", "bad_request"), started)
                if last:
                    if failure is None:  # no member was called: the turn is refused, saying why
                        if isinstance(exc, ProviderCallError):
                            raise
                        raise ProviderCallError("bad_request", exc.message, status_code=400) from None
                    break  # the turn's error is the last call's, not this refusal
                continue
            stream = open_stream(model)
            try:
                head = await _first_token(stream, timeout=None if last else settings.LLM_FIRST_TOKEN_TIMEOUT,
                                          opens=opens)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    # The client left or the run was stopped while this member was called: a call all the same.
                    self._attempt(config, CANCELLED, started, call=call)
                await stream.aclose()
                if not isinstance(exc, PROVIDER_EXCEPTIONS):
                    raise
                error = provider_error(exc, api_key=config.api_key)
                self._attempt(config, error.category, started, call=call)
                # Recorded beside the request, not before the next member is called: the request does not wait for
                # the database. `settle()` waits for it before the turn is saved.
                self._recording.append(asyncio.ensure_future(
                    database_sync_to_async(provider_failure_record)(config=config, error=error)))
                # Scrubbed with this member's key (the caller knows no single key of a pool).
                failure = provider_exception_scrubbed(exc, api_key=config.api_key)
                if last or error.category not in FAILOVER_CATEGORIES:
                    break
                continue
            self._attempt(config, "", started, call=call)
            call.ttft_ms = call.latency_ms
            self.served = config
            if config.auth_failed_at is not None:  # tried as the last resort, and the provider took the key again
                self._recording.append(asyncio.ensure_future(database_sync_to_async(health_restore)(config=config)))
            try:
                for chunk in head:
                    count(call, chunk)
                    yield chunk
                async for chunk in stream:
                    count(call, chunk)
                    yield chunk
            except PROVIDER_EXCEPTIONS as exc:
                call.error_category = provider_error(exc, api_key=config.api_key).category
                raise
            finally:
                call.latency_ms = round((time.monotonic() - started) * 1000, 1)
            return
        raise failure  # outside the except clause, so the unscrubbed original is not kept as its context

    async def settle(self) -> None:
        """Wait until every failure of this turn is recorded (counted, and its member's health updated)."""
        pending, self._recording = self._recording, []
        await failure_records_settle(pending)

    def _attempt(self, config: LLMConfig, category: str, started: float, *, call: CallRecord | None = None) -> None:
        """Note a call of `config` that failed with `category` or ("") produced its first token. A member refused
        before any request (no `call`) made no provider call: it is no usage."""
        attempt_note(attempts=self.attempts, calls=self.calls, config=config, category=category, started=started,
                     call=call)


async def failure_records_settle(pending: list[asyncio.Future]) -> None:
    """Wait for the records of a request's failed pool calls (counts, health); one that could not be written is
    logged, not raised: the request's own outcome stands."""
    for result in await asyncio.gather(*pending, return_exceptions=True):
        if isinstance(result, Exception):
            logger.error("a provider failure could not be recorded: %r", result)


def attempt_note(*, attempts: list[dict[str, Any]], calls: list[CallRecord], config: LLMConfig, category: str,
                 started: float, call: CallRecord | None) -> None:
    """One pool member tried (for a turn or a passed-through request): counted in the metrics, added to `attempts`
    (config, error category or "", latency) and, when a request was made (`call`), to the usage `calls`."""
    provider_call_observe(config_name=config.name, route=config.route_name, category=category)
    latency_ms = round((time.monotonic() - started) * 1000, 1)
    attempts.append({"config_id": str(config.pk), "config_name": config.name, "category": category,
                     "latency_ms": latency_ms})
    if call is not None:
        call.error_category, call.latency_ms = category, latency_ms
        calls.append(call)


def _generation_count(call: CallRecord, chunk: ChatGenerationChunk) -> None:
    usage = getattr(chunk.message, "usage_metadata", None)
    if usage:
        call.prompt_tokens += usage.get("input_tokens", 0)
        call.completion_tokens += usage.get("output_tokens", 0)


def _delta_count(call: CallRecord, delta: Delta) -> None:
    call.prompt_tokens += delta.prompt_tokens
    call.completion_tokens += delta.completion_tokens


def _delta_opens(delta: Delta) -> bool:
    return delta.opens


async def _first_token(stream: AsyncIterator[Any], *, timeout: float | None, opens: Callable[[Any], bool],
                       ) -> list[Any]:
    """The chunks of `stream` up to and including its first token, `opens(chunk)` (or all of them, if it ends
    without one). Raises TimeoutError when no token came within `timeout` seconds."""
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    head: list[Any] = []
    while True:
        step = anext(stream, None)
        if deadline is None:
            chunk = await step
        else:
            remaining = deadline - asyncio.get_running_loop().time()
            chunk = await asyncio.wait_for(step, max(remaining, 0))
        if chunk is None:
            return head
        head.append(chunk)
        if opens(chunk):
            return head
