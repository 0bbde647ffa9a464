"""The accounting of a request the OpenAI-compatible surface passed to a pool: no conversation holds it, so its
usage and cost are recorded here, as every other provider call's are."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import transaction

from agentcore.limits import Meter, usage_record
from llmconfigs.completions import usage_tokens
from llmconfigs.models import LLMConfig
from llmconfigs.pricing import usage_cost
from llmconfigs.services import llm_config_record_usage
from llmconfigs.usage import CallOrigin, CallRecord, provider_calls_record


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
