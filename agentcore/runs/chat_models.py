"""The chat models runs stream from: a pool model per run over one chat model per config and parameters, shared by
concurrent runs, built on HTTP clients that belong to the running event loop."""
from __future__ import annotations

import asyncio
import weakref
from typing import Any

from django.conf import settings
from langchain_openai import ChatOpenAI
from langchain_openai.chat_models._client_utils import _cached_async_httpx_client

from llmconfigs.factory import chat_model
from llmconfigs.models import LLMConfig
from llmconfigs.routing import PoolChatModel

_http_client_loop: weakref.ref | None = None
# Chat models of this loop by what they are built from. Building one costs about a millisecond (client setup,
# validation, its serialized form for callbacks) and a model is safe to share between concurrent runs.
_models: dict[tuple, ChatOpenAI] = {}
MODEL_CACHE_SIZE = 64


def _http_clients_for_this_loop() -> None:
    """langchain-openai keeps one pooled httpx client per base URL for the whole process, and pooled connections
    belong to the event loop that opened them. When runs move to another loop (tests, `asyncio.run` in commands) the
    cache is dropped so that the next model builds a client on the running loop; under daphne (one loop) this runs
    once."""
    global _http_client_loop
    loop = asyncio.get_running_loop()
    if _http_client_loop is not None and _http_client_loop() is loop:
        return
    _cached_async_httpx_client.cache_clear()
    _models.clear()
    _http_client_loop = weakref.ref(loop)


def _chat_model_for(config: LLMConfig, overrides: dict[str, Any], *, retries: bool = True) -> ChatOpenAI:
    """The streaming chat model of `config` with `overrides`, reused while every editable field of the config (and
    the request settings) stay the same: an edited config or a rotated key builds a new one on its next run.
    Without `retries` the SDK does not retry (a pool member with another member after it: that one is the retry)."""
    fields = tuple((f.attname, getattr(config, f.attname)) for f in config._meta.concrete_fields if f.editable)
    max_retries = settings.LLM_MAX_RETRIES if retries else 0
    key = (config.pk, repr(fields), tuple(sorted(overrides.items())), settings.LLM_REQUEST_TIMEOUT, max_retries)
    model = _models.get(key)
    if model is None:
        if len(_models) >= MODEL_CACHE_SIZE:
            _models.clear()
        model = _models[key] = chat_model(config, streaming=True, max_retries=max_retries, **overrides)
    return model


def run_chat_model(pool: list[LLMConfig], overrides: dict[str, Any]) -> PoolChatModel:
    """The model a run on the running event loop streams from: the configs of `pool` in their try order (see
    llmconfigs.routing), each with the sampling `overrides`, failing over before the first token. One per run: it
    records the run's model calls."""
    _http_clients_for_this_loop()
    return PoolChatModel(members=pool, build=lambda config, last: _chat_model_for(config, overrides, retries=last))


def provider_client(config: LLMConfig, *, retries: bool = True) -> Any:
    """The AsyncOpenAI client of `config` on the running event loop (the one its chat model sends with: same key,
    base URL, timeout and pooled connections), for a request passed to the provider as the client sent it. Without
    `retries` the SDK does not retry."""
    _http_clients_for_this_loop()
    return _chat_model_for(config, {}, retries=retries).root_async_client
