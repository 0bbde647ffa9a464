"""OpenAI's envelope for the refusals made before the consumer runs (the surface registered for the path) and for the
apps' typed errors: statuses, types and Retry-After as OpenAI's SDKs expect them."""
from __future__ import annotations

import json

from agentcore.limits import OverLimit
from difyapi.openai.errors import OpenAISurface, openai_error_from
from llmconfigs.errors import ProviderCallError
from opsagent.common.dependencies import DependencyUnavailable
from opsagent.common.surfaces import surface_for


def _error(refusal):
    body = json.loads(refusal.body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_the_path_answers_in_openai_format_and_the_rest_of_v1_in_difys():
    surface = surface_for("/v1/chat/completions")
    assert isinstance(surface, OpenAISurface)
    assert not isinstance(surface_for("/v1/chat-messages"), OpenAISurface)
    too_large = surface.too_large("/v1/chat/completions", 100)
    assert too_large.status == 413 and _error(too_large)["code"] == "request_too_large"
    down = surface.unavailable(DependencyUnavailable("database"))
    assert down.status == 503 and dict(down.headers)["Retry-After"] and _error(down)["type"] == "server_error"
    assert _error(surface.bad_text("user", "must not contain NUL characters"))["param"] == "user"


def test_limits_and_provider_failures_map_to_openai_statuses():
    rate = openai_error_from(OverLimit("slow down", retry_after=12, budget=False))
    assert (rate.status, rate.type, rate.headers) == (429, "rate_limit_error", {"Retry-After": "12"})
    budget = openai_error_from(OverLimit("spent", retry_after=3600, budget=True))
    assert (budget.status, budget.code, budget.headers["Retry-After"]) == (429, "insufficient_quota", "3600")
    cases = {"timeout": 504, "unreachable": 502, "upstream_error": 502, "auth": 502, "bad_request": 400,
             "rate_limit": 429}
    for category, status in cases.items():
        error = openai_error_from(ProviderCallError(category, "it failed", status_code=None))
        assert error.status == status, category
        assert ("Retry-After" in error.headers) is (status == 429)
    assert openai_error_from(ValueError("a bug of ours")) is None  # logged and answered as a 500 by the consumer
