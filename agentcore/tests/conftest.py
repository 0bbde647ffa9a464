"""Fixtures for agentcore's tests: an agent app and a chat app, a hit-counting HTTP target, scripted DNS answers and
a record of outbound connections. Helpers that are not fixtures live in factories.py."""
from __future__ import annotations

import pytest

from agentcore.models import AgentApp
from agentcore.tests.factories import CountingTarget, ScriptedDNS


@pytest.fixture
def agent_app(default_llm_config):
    # The tests' HTTP targets listen on loopback, which an app reaches only through its network allow-list.
    return AgentApp.objects.create(name="Agent", mode=AgentApp.Mode.AGENT_CHAT,
                                   system_prompt="You are an operations assistant.",
                                   network_allow_networks=["127.0.0.1/32"])


@pytest.fixture
def chat_app(default_llm_config):
    return AgentApp.objects.create(name="Chat", mode=AgentApp.Mode.CHAT, system_prompt="Answer briefly.")


@pytest.fixture
def http_check_needs_approval(db):
    from agentcore.tools.policies import tool_policy_update

    tool_policy_update(name="http_check", requires_approval=True, approver="requester")


@pytest.fixture
def counting_target():
    target = CountingTarget()
    yield target
    target.close()


@pytest.fixture
def scripted_dns(monkeypatch):
    from agentcore import network

    dns = ScriptedDNS(network.resolve)
    monkeypatch.setattr(network, "resolve", dns.resolve)
    return dns


@pytest.fixture
def outbound_connections(monkeypatch):
    """Every TCP connection httpx opens, as (host, port). Connections to addresses off this machine are refused
    here, like a firewall would: a test proves a request was never attempted without sending one anywhere."""
    import ipaddress

    import httpcore
    from httpcore._backends.anyio import AnyIOBackend

    attempts: list[tuple[str, int]] = []
    connect = AnyIOBackend.connect_tcp

    async def guarded(self, host, port, *args, **kwargs):
        attempts.append((host, port))
        try:
            local = ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            local = host == "localhost"
        if not local:
            raise httpcore.ConnectError(f"test firewall: no connection to {host}")
        return await connect(self, host, port, *args, **kwargs)

    monkeypatch.setattr(AnyIOBackend, "connect_tcp", guarded)
    return attempts
