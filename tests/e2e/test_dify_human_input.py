"""Approvals through Dify's Human Input protocol over real HTTP: daphne, httpx, strict SSE. The form is answered on
one server while the run is followed on another, through Redis and a shared PostgreSQL."""
from __future__ import annotations

import os
import time

import httpx
import pytest
from django.db import connection

from agentcore.models import Approval, Message, ToolPolicy
from agentcore.tools.policies import tool_policy_add_builtins
from difyapi.tests.factories import make_app_with_key
from tests.e2e.dify_servers import data_events, parse_sse
from tests.fakes.upstream import Reply, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def agent_key(default_llm_config) -> str:
    tool_policy_add_builtins()
    ToolPolicy.objects.filter(name="current_time").update(requires_approval=True, approver="requester")
    _, key = make_app_with_key(name="e2e-forms", mode="agent-chat", enabled_tools=["current_time"])
    return key


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def pause(client: httpx.Client, base_url: str, key: str, fake_upstream) -> dict:
    fake_upstream.script(Reply(text="", tool_calls=[ToolCall("current_time", {"timezone": "UTC"})]))
    response = client.post(f"{base_url}/v1/chat-messages", headers=headers(key), json={
        "inputs": {}, "query": "what time is it?", "user": "alice", "response_mode": "streaming",
        "auto_generate_name": False})
    assert response.status_code == 200
    events = data_events(response.content)
    assert [e["event"] for e in events][-3:] == ["human_input_required", "workflow_paused", "message_end"]
    return events[-3]


def follow_and_answer(client: httpx.Client, *, follow_url: str, answer_url: str, key: str) -> list:
    """Open the events stream, answer the form while it waits, and read the stream to its end."""
    with client.stream("GET", follow_url, params={"user": "alice"}, headers=headers(key)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        time.sleep(0.5)  # waiting: the stream keeps itself alive until the answer comes
        answered = client.post(answer_url, headers=headers(key),
                               json={"inputs": {"comment": "ok"}, "action": "approve", "user": "alice"})
        assert (answered.status_code, answered.json()) == (200, {})
        return parse_sse(b"".join(response.iter_raw()))


def test_a_form_answered_over_http_resumes_the_run_for_its_follower(start_daphne, agent_key, fake_upstream):
    server = start_daphne(DIFY_PING_INTERVAL="0.2")
    with httpx.Client(timeout=30) as client:
        required = pause(client, server.base_url, agent_key, fake_upstream)
        token = required["data"]["form_token"]
        form = client.get(f"{server.base_url}/v1/form/human_input/{token}", headers=headers(agent_key))
        assert form.status_code == 200 and [a["id"] for a in form.json()["user_actions"]] == ["approve", "reject"]
        fake_upstream.script(Reply(text="It is noon.", delay=0.3))
        parsed = follow_and_answer(
            client, key=agent_key, follow_url=f"{server.base_url}/v1/workflow/{required['workflow_run_id']}/events",
            answer_url=f"{server.base_url}/v1/form/human_input/{token}")
        again = client.post(f"{server.base_url}/v1/form/human_input/{token}", headers=headers(agent_key),
                            json={"inputs": {}, "action": "reject", "user": "alice"})
    assert parsed[0] == "ping"  # at once: the stream is open before anything happens
    assert parsed.count("ping") >= 3  # and kept alive while it waited for the answer
    events = [e for e in parsed if isinstance(e, dict)]
    assert events[0]["event"] == "human_input_form_filled" and events[-1]["event"] == "message_end"
    assert "".join(e["answer"] for e in events if e["event"] == "agent_message") == "It is noon."
    assert (again.status_code, again.json()["code"]) == (412, "human_input_form_submitted")
    assert Approval.objects.get(pk=required["data"]["node_id"]).status == "approved"
    assert Message.objects.get(task_id=required["workflow_run_id"]).status == "normal"


def test_the_run_answered_on_one_worker_streams_on_another(start_daphne, agent_key, fake_upstream):
    if connection.vendor != "postgresql" or not os.environ.get("REDIS_URL"):
        pytest.skip("two workers need a shared PostgreSQL database and Redis (REDIS_URL)")
    answering = start_daphne()
    # Pings (and the follower's look at the database for a run that ended without it) only every minute: the run
    # can only reach this follower in time live, through Redis.
    following = start_daphne(DIFY_PING_INTERVAL="60")
    with httpx.Client(timeout=30) as client:
        required = pause(client, answering.base_url, agent_key, fake_upstream)
        fake_upstream.script(Reply(text="Noon, from the other worker.", delay=0.2))
        run = required["workflow_run_id"]
        started = time.monotonic()
        events = data_events_of(follow_and_answer(
            client, key=agent_key, follow_url=f"{following.base_url}/v1/workflow/{run}/events",
            answer_url=f"{answering.base_url}/v1/form/human_input/{required['data']['form_token']}"))
        assert time.monotonic() - started < 15
        # A client that comes back later, to either worker, gets the resumed run replayed.
        replayed = client.get(f"{following.base_url}/v1/workflow/{run}/events", params={"user": "alice"},
                              headers=headers(agent_key))
    assert events[0]["event"] == "human_input_form_filled" and events[-1]["event"] == "message_end"
    assert "".join(e["answer"] for e in events if e["event"] == "agent_message") == "Noon, from the other worker."
    assert data_events(replayed.content) == events


def data_events_of(parsed: list) -> list[dict]:
    return [e for e in parsed if isinstance(e, dict)]
