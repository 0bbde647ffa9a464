"""The accounting of a request the OpenAI-compatible surface passed to a pool: no conversation holds it, so its
usage and cost are recorded here, as every other provider call's are."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from agentcore.limits import Meter, usage_record
from llmconfigs.completions import PoolCompletion, chunk_has_token, usage_tokens
from llmconfigs.models import LLMConfig
from llmconfigs.pricing import usage_cost
from llmconfigs.services import llm_config_record_usage
from llmconfigs.usage import CallOrigin, CallRecord, provider_calls_record
from opsagent.common.metrics import chat_request_observe


def completion_usage_record(*, meter: Meter, origin: CallOrigin, calls: Sequence[CallRecord],
                            served: LLMConfig | None, usage: dict[str, Any] | None) -> None:
    """The one place a /v1/chat/completions request through a pool is accounted, once, when it ends: every provider
    call it made (each member tried, failed or not) as a usage record, and the call `served` answered counted with
    the tokens the provider reported, on the config and against the app's and key's limits (failed members were
    counted on their configs as they failed, by the pool)."""
    prompt, completion = usage_tokens(usage)
    cost = None
    with transaction.atomic():
        provider_calls_record(calls=calls, origin=origin)
        if served is not None:
            cost = usage_cost(input_price_per_million=served.input_price_per_million,
                              output_price_per_million=served.output_price_per_million, currency=served.currency,
                              prompt_tokens=prompt, completion_tokens=completion)
            llm_config_record_usage(config_id=served.pk, prompt_tokens=prompt, completion_tokens=completion,
                                    cost=cost.total_price)
    if cost is not None:
        usage_record(meter=meter, tokens=prompt + completion, cost=cost.total_price)


@dataclass
class CompletionTiming:
    """When a pool's request started and when its first token went out (a stream's); `task_id` names it in the
    request log (the completion's id, which the client sees)."""

    task_id: str
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    observed: bool = False

    def chunk(self, chunk: dict[str, Any]) -> None:
        if self.first_token is None and chunk_has_token(chunk):
            self.first_token = time.perf_counter()


def completion_observe(*, completion: PoolCompletion, timing: CompletionTiming, status: str, app: str) -> None:
    """Count a pool's request that ended with `status` (normal, stopped, error) as a chat request of its surface
    (the metrics, and the request's log line), once, under the member that answered (else the last one called).
    A request refused before any provider call is no chat request."""
    if timing.observed:
        return
    timing.observed = True
    config = completion.served or (completion.calls[-1].config if completion.calls else None)
    if config is None:
        return
    prompt, completion_tokens = usage_tokens(completion.usage) if completion.served is not None else (0, 0)
    cost = usage_cost(input_price_per_million=config.input_price_per_million,
                      output_price_per_million=config.output_price_per_million, currency=config.currency,
                      prompt_tokens=prompt, completion_tokens=completion_tokens)
    now = time.perf_counter()
    ttft = timing.first_token - timing.started if timing.first_token is not None else None
    chat_request_observe(config_name=config.name, route=config.route_name, app=app,
                         task_id=timing.task_id, status=status, latency=now - timing.started, ttft=ttft,
                         prompt_tokens=prompt, completion_tokens=completion_tokens,
                         cost=cost.total_price if completion.served is not None else None, currency=cost.currency)
