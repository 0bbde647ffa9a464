"""Fixtures and helpers shared by the agent's interface tests (REST, WebSocket, admin, e2e)."""
from __future__ import annotations

import json

import pytest

from agentcore.models import AgentApp
from agentcore.tests.factories import CountingTarget


@pytest.fixture
def agent_app(default_llm_config):
    # The tests' HTTP targets listen on loopback, which an app reaches only through its network allow-list.
    return AgentApp.objects.create(name="OpsAgent", mode=AgentApp.Mode.AGENT_CHAT,
                                   system_prompt="You are an operations assistant.",
                                   network_allow_networks=["127.0.0.1/32"])


@pytest.fixture
def chat_app(default_llm_config):
    return AgentApp.objects.create(name="Plain chat", mode=AgentApp.Mode.CHAT, system_prompt="Answer briefly.")


@pytest.fixture
def http_check_needs_approval(db):
    from agentcore.tools.policies import tool_policy_update

    tool_policy_update(name="http_check", requires_approval=True, approver="requester")


@pytest.fixture
def hit_target():
    target = CountingTarget()
    yield target
    target.close()


def sse_events(body: bytes | str) -> list[dict]:
    """The JSON events of a `text/event-stream` body, in order."""
    text = body.decode() if isinstance(body, bytes) else body
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
