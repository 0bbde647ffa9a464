"""Agent-chat approvals through /v1/chat-messages (`metadata.pending_approvals`, the `approval` extension) and the
background naming of new conversations."""
from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async

from agentcore.models import Approval, Message, Session, ToolPolicy
from agentcore.tools.policies import tool_policy_add_builtins
from difyapi.tests.factories import make_app_with_key
from tests.e2e.dify_servers import data_events, dify_post
from tests.fakes.upstream import Reply, ToolCall

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_worker_connections")]


@pytest.fixture
def agent_app(default_llm_config):
    tool_policy_add_builtins()
    ToolPolicy.objects.filter(name="current_time").update(requires_approval=True, approver="requester")
    ToolPolicy.objects.filter(name="run_shell").update(enabled=True)
    return make_app_with_key(name="approvals", mode="agent-chat", enabled_tools=["current_time", "run_shell"])


def body(**fields):
    return {"inputs": {}, "query": "what time is it?", "user": "alice", "response_mode": "streaming",
            "auto_generate_name": False, **fields}


async def stream(key: str, payload: dict) -> list[dict]:
    status, _, raw = await dify_post(key, "/v1/chat-messages", payload, timeout=30)
    assert status == 200, raw
    return data_events(raw)


async def test_a_tool_needing_approval_pauses_and_the_approval_field_resumes(agent_app, fake_upstream):
    _, key = agent_app
    fake_upstream.script(Reply(text="", tool_calls=[ToolCall("current_time", {"timezone": "UTC"})]))
    events = await stream(key, body())
    end = events[-1]
    assert end["event"] == "message_end"
    pending = end["metadata"]["pending_approvals"]
    assert len(pending) == 1 and set(pending[0]) == {"id", "tool", "tool_input"}
    assert pending[0]["tool"] == "current_time" and pending[0]["tool_input"] == {"timezone": "UTC"}
    thought = [e for e in events if e["event"] == "agent_thought"][-1]
    assert thought["tool"] == "current_time"
    assert json.loads(thought["tool_input"]) == {"current_time": {"timezone": "UTC"}}
    assert "approval" in json.loads(thought["observation"])["current_time"].lower()
    assert (await Message.objects.aget(pk=end["message_id"])).status == "paused"

    fake_upstream.script(Reply(text="It is noon in UTC."))
    resumed = await stream(key, body(query="", conversation_id=end["conversation_id"],
                                     approval={"id": pending[0]["id"], "decision": "approve"}))
    assert resumed[-1]["event"] == "message_end" and "pending_approvals" not in resumed[-1]["metadata"]
    assert {e["message_id"] for e in resumed} == {end["message_id"]}
    assert {e["task_id"] for e in resumed if "task_id" in e} == {end["task_id"]}
    assert "".join(e["answer"] for e in resumed if e["event"] == "agent_message") == "It is noon in UTC."
    assert (await Approval.objects.aget(pk=pending[0]["id"])).status == "approved"
    message = await Message.objects.aget(pk=end["message_id"])
    assert message.status == "normal" and message.answer.endswith("It is noon in UTC.")

    status, _, raw = await dify_post(key, "/v1/chat-messages", body(
        query="", conversation_id=end["conversation_id"], approval={"id": pending[0]["id"], "decision": "reject"}))
    assert status == 409 and json.loads(raw)["code"] == "conflict"


async def test_a_staff_only_approval_is_forbidden_to_api_users(agent_app, fake_upstream):
    _, key = agent_app
    fake_upstream.script(Reply(text="", tool_calls=[ToolCall("run_shell", {"command": "uptime"})]))
    events = await stream(key, body(query="how loaded is the box?"))
    pending = events[-1]["metadata"]["pending_approvals"]
    assert pending[0]["tool"] == "run_shell"
    status, _, raw = await dify_post(key, "/v1/chat-messages", body(
        query="", conversation_id=events[-1]["conversation_id"],
        approval={"id": pending[0]["id"], "decision": "approve"}))
    data = json.loads(raw)
    assert (status, data["code"], data["status"]) == (403, "forbidden", 403)
    assert (await Approval.objects.aget(pk=pending[0]["id"])).status == "pending"


async def test_an_unknown_approval_is_not_found(agent_app, fake_upstream):
    import uuid

    _, key = agent_app
    status, _, raw = await dify_post(key, "/v1/chat-messages", body(
        query="", approval={"id": str(uuid.uuid4()), "decision": "approve"}))
    assert status == 404 and json.loads(raw)["code"] == "not_found"


async def test_a_new_conversation_is_named_in_the_background(default_llm_config, fake_upstream):
    _, key = await sync_to_async(make_app_with_key)(name="naming", mode="chat")
    fake_upstream.script(Reply(text="Your disk is fine."), Reply(text="Disk space check"))
    status, _, raw = await dify_post(key, "/v1/chat-messages",
                                     {"inputs": {}, "query": "is my disk full? " * 6, "user": "alice"})
    assert status == 200
    conversation_id = json.loads(raw)["conversation_id"]
    for _ in range(50):
        session = await Session.objects.aget(pk=conversation_id)
        if session.name == "Disk space check":
            break
        await asyncio.sleep(0.1)
    assert session.name == "Disk space check"


async def test_without_auto_generate_name_the_name_is_the_shortened_query(default_llm_config, fake_upstream):
    _, key = await sync_to_async(make_app_with_key)(name="no-naming", mode="chat")
    query = "is my disk full? " * 6
    status, _, raw = await dify_post(key, "/v1/chat-messages",
                                     {"inputs": {}, "query": query, "user": "alice", "auto_generate_name": False})
    assert status == 200
    await asyncio.sleep(0.3)
    session = await Session.objects.aget(pk=json.loads(raw)["conversation_id"])
    assert session.name == query.strip()[:47] + "..."
    assert len(fake_upstream.chat_requests) == 1


async def test_an_approval_decided_through_v1_is_audited_with_the_end_user_and_the_client(agent_app, fake_upstream):
    from llmconfigs.models import AuditLog

    _, key = agent_app
    fake_upstream.script(Reply(text="", tool_calls=[ToolCall("current_time", {"timezone": "UTC"})]))
    end = (await stream(key, body()))[-1]
    [pending] = end["metadata"]["pending_approvals"]
    fake_upstream.script(Reply(text="Noon."))
    payload = body(query="", conversation_id=end["conversation_id"],
                   approval={"id": pending["id"], "decision": "reject", "comment": "no"})
    status, _, _ = await dify_post(key, "/v1/chat-messages", payload, timeout=30,
                                   headers={"User-Agent": "dify-client/9"})
    assert status == 200

    [row] = [row async for row in AuditLog.objects.filter(action="decide")]
    assert (row.actor, row.source, row.user_agent, row.ip_address) == (None, "api", "dify-client/9", "127.0.0.1")
    assert (row.target_id, row.changes["end_user"], row.changes["status"]["new"]) == (pending["id"], "alice",
                                                                                      "rejected")
    assert key not in json.dumps(row.changes) and key not in row.user_agent
