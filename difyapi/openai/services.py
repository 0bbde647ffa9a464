"""The accounting of a request the OpenAI-compatible surface passed to a pool: no conversation holds it, so its
usage and cost are recorded here, as every other provider call's are."""
from __future__ import annotations

from typing import Any

from agentcore.limits import Meter, usage_record
from llmconfigs.models import LLMConfig
from llmconfigs.pricing import usage_cost
from llmconfigs.services import llm_config_record_usage


def completion_usage_record(*, meter: Meter, config: LLMConfig, usage: dict[str, Any] | None,
                            attempts: list[dict[str, Any]]) -> None:
    """Count the call `config` answered (failed members were counted as they failed, by the pool) with the tokens
    the provider reported, on the config and against the app's and key's limits.

    LEAD, AT MERGE: this is the one place where a /v1/chat/completions call is accounted. Hook the per-call usage
    recorder (helper "usage") here; `attempts` holds every member tried (config id and name, error category,
    latency), as Message.attempts does for a turn."""
    usage = usage or {}
    prompt = _tokens(usage.get("prompt_tokens"))
    completion = _tokens(usage.get("completion_tokens"))
    cost = usage_cost(input_price_per_million=config.input_price_per_million,
                      output_price_per_million=config.output_price_per_million, currency=config.currency,
                      prompt_tokens=prompt, completion_tokens=completion)
    llm_config_record_usage(config_id=config.pk, prompt_tokens=prompt, completion_tokens=completion,
                            cost=cost.total_price)
    usage_record(meter=meter, tokens=prompt + completion, cost=cost.total_price)


def _tokens(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
