"""Approvals through Dify's Human Input protocol: `human_input_required` and `workflow_paused` in the paused stream,
GET/POST /v1/form/human_input/{form_token}, and GET /v1/workflow/{workflow_run_id}/events following the resumed run.
Events are parsed strictly (tests.e2e.dify_servers.parse_sse) and validated against Dify's schemas
(dify_human_input_schemas.json: the structure of the document's schemas)."""
from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from agentcore.models import Approval, Message, ToolPolicy
from agentcore.tools.policies import tool_policy_add_builtins
from difyapi.models import HumanInputForm
from difyapi.tests.factories import make_app_with_key
from tests.e2e.dify_servers import data_events, dify_call, dify_post, parse_sse
from tests.fakes.upstream import Reply, ToolCall

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_worker_connections")]

SCHEMAS = json.loads((Path(__file__).parent / "dify_human_input_schemas.json").read_text())
EVENT_SCHEMAS = {
    "human_input_required": "StreamEventHumanInputRequired",
    "workflow_paused": "StreamEventWorkflowPaused",
    "human_input_form_filled": "StreamEventHumanInputFormFilled",
    "message_end": "StreamEventChatMessageEnd",
    "agent_message": "StreamEventChatAgentMessage",
    "agent_thought": "StreamEventChatAgentThought",
    "error": "StreamEventChatError",
}
HEAD = {"event", "task_id", "message_id", "conversation_id", "created_at", "workflow_run_id", "data"}
FORM_DATA = {"form_id", "node_id", "node_title", "form_content", "inputs", "actions", "display_in_ui", "form_token",
             "resolved_default_values", "expiration_time"}


def _openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` as JSON Schema's null type; `$ref`s into the schemas kept in the file."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _openapi_to_jsonschema(value) for key, value in node.items() if key != "discriminator"}
    if node.pop("nullable", False):
        if "type" in node:
            node["type"] = [node["type"], "null"]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    if "$ref" in node:
        node["$ref"] = node["$ref"].replace("#/components/schemas/", "#/$defs/")
    return node


DEFS = _openapi_to_jsonschema(SCHEMAS["schemas"])


def validate(instance: Any, schema: dict[str, Any]) -> None:
    full = {**_openapi_to_jsonschema(copy.deepcopy(schema)), "$defs": DEFS}
    jsonschema.Draft202012Validator(full, format_checker=jsonschema.FormatChecker()).validate(instance)


def validate_event(event: dict[str, Any]) -> None:
    validate(event, {"$ref": f"#/components/schemas/{EVENT_SCHEMAS[event['event']]}"})


@pytest.fixture
def agent_app(default_llm_config):
    tool_policy_add_builtins()
    ToolPolicy.objects.filter(name="current_time").update(requires_approval=True, approver="requester")
    ToolPolicy.objects.filter(name="run_shell").update(enabled=True)
    return make_app_with_key(name="forms", mode="agent-chat", enabled_tools=["current_time", "run_shell"])


def body(**fields):
    return {"inputs": {}, "query": "what time is it?", "user": "alice", "response_mode": "streaming",
            "auto_generate_name": False, **fields}


async def paused(key: str, fake_upstream, tool: str = "current_time", arguments: dict | None = None) -> list[dict]:
    fake_upstream.script(Reply(text="", tool_calls=[ToolCall(tool, arguments or {"timezone": "UTC"})]))
    status, _, raw = await dify_post(key, "/v1/chat-messages", body(), timeout=30)
    assert status == 200, raw
    return data_events(raw)


def form_of(events: list[dict]) -> dict:
    [required] = [e for e in events if e["event"] == "human_input_required"]
    return required


async def get(key: str, path: str, *, timeout: float = 20) -> tuple[int, bytes]:
    async with dify_call(key, path) as call:
        raw = await call.read(timeout)
        return call.status, raw


async def answer(key: str, token: str, **fields) -> tuple[int, dict]:
    payload = {"inputs": {}, "action": "approve", "user": "alice", **fields}
    status, _, raw = await dify_post(key, f"/v1/form/human_input/{token}", payload)
    return status, json.loads(raw)


async def follow(key: str, run_id: str, query: str = "user=alice", timeout: float = 30) -> list[dict]:
    status, raw = await get(key, f"/v1/workflow/{run_id}/events?{query}", timeout=timeout)
    assert status == 200, raw
    return data_events(raw)


def assert_error(status: int, data: dict, expected: tuple[int, str]) -> None:
    assert set(data) == {"code", "message", "status"}, data
    assert (status, data["status"], data["code"]) == (expected[0], expected[0], expected[1]), data


async def test_a_paused_run_streams_the_form_and_the_pause_before_message_end(agent_app, fake_upstream):
    _, key = agent_app
    events = await paused(key, fake_upstream, arguments={"timezone": "Europe/Paris"})
    names = [e["event"] for e in events]
    assert names[-3:] == ["human_input_required", "workflow_paused", "message_end"]
    for event in events:
        if event["event"] in EVENT_SCHEMAS:
            validate_event(event)
    required, paused_event, end = events[-3:]
    assert set(required) == HEAD and set(required["data"]) == FORM_DATA
    assert required["workflow_run_id"] == required["task_id"] == end["task_id"]
    assert (required["message_id"], required["conversation_id"]) == (end["message_id"], end["conversation_id"])
    data = required["data"]
    [pending] = end["metadata"]["pending_approvals"]  # the `approval` extension is unchanged
    assert data["node_id"] == pending["id"] and data["node_title"] == "Approve current_time"
    assert "`current_time`" in data["form_content"] and '"timezone": "Europe/Paris"' in data["form_content"]
    assert "Target: the OpsAgent server" in data["form_content"]
    assert data["inputs"] == [{"type": "paragraph", "output_variable_name": "comment", "default": None}]
    assert [a["id"] for a in data["actions"]] == ["approve", "reject"]
    assert isinstance(data["form_token"], str) and len(data["form_token"]) >= 40
    assert data["expiration_time"] > timezone.now().timestamp()
    assert set(paused_event) == HEAD
    assert paused_event["data"]["workflow_run_id"] == end["task_id"]
    assert paused_event["data"]["paused_nodes"] == [pending["id"]] and paused_event["data"]["status"] == "paused"
    assert paused_event["data"]["reasons"] == [{"type": "human_input_required", "form_id": data["form_id"],
                                                "node_id": pending["id"]}]
    # Only the token's hash is stored.
    form = await HumanInputForm.objects.aget(pk=data["form_id"])
    assert form.token_hash == hashlib.sha256(data["form_token"].encode()).hexdigest()
    assert data["form_token"] not in json.dumps([form.token_hash, form.end_user, str(form.approval_id)])


async def test_the_form_reads_as_dify_defines_it(agent_app, fake_upstream):
    _, key = agent_app
    token = form_of(await paused(key, fake_upstream))["data"]["form_token"]
    status, raw = await get(key, f"/v1/form/human_input/{token}")
    assert status == 200, raw
    form = json.loads(raw)
    validate(form, SCHEMAS["form_get_200"])
    assert set(form) == {"form_content", "inputs", "resolved_default_values", "user_actions", "expiration_time"}
    assert [a["id"] for a in form["user_actions"]] == ["approve", "reject"]
    assert "`current_time`" in form["form_content"]


async def test_answering_the_form_resumes_the_run_for_whoever_follows_it(agent_app, fake_upstream):
    from llmconfigs.models import AuditLog

    _, key = agent_app
    events = await paused(key, fake_upstream)
    required, end = form_of(events), events[-1]
    fake_upstream.script(Reply(text="It is noon in UTC."))
    payload = {"inputs": {"comment": "go ahead"}, "action": "approve", "user": "alice"}
    validate(payload, SCHEMAS["form_post_body"])
    status, data = await answer(key, required["data"]["form_token"], inputs={"comment": "go ahead"})
    assert (status, data) == (200, {})
    validate(data, SCHEMAS["form_post_200"])

    resumed = await follow(key, required["workflow_run_id"])
    for event in resumed:
        validate_event(event)
    assert resumed[0]["event"] == "human_input_form_filled" and resumed[-1]["event"] == "message_end"
    filled = resumed[0]
    assert set(filled) == HEAD
    assert filled["data"]["action_id"] == "approve" and filled["data"]["action_text"] == "Approve"
    assert filled["data"]["submitted_data"] == {"comment": "go ahead"}
    assert filled["data"]["node_id"] == required["data"]["node_id"]
    assert "go ahead" in filled["data"]["rendered_content"]
    assert "".join(e["answer"] for e in resumed if e["event"] == "agent_message") == "It is noon in UTC."
    assert {e["message_id"] for e in resumed} == {end["message_id"]}
    assert "pending_approvals" not in resumed[-1]["metadata"]
    approval = await Approval.objects.aget(pk=required["data"]["node_id"])
    assert (approval.status, approval.comment, approval.decided_by_end_user) == ("approved", "go ahead", "alice")
    assert (await Message.objects.aget(pk=end["message_id"])).status == "normal"
    [row] = [row async for row in AuditLog.objects.filter(action="decide")]
    assert row.source == "api" and required["data"]["form_token"] not in json.dumps(row.changes)

    # Following again replays the resumed run from its start.
    again = await follow(key, required["workflow_run_id"])
    assert [e["event"] for e in again] == [e["event"] for e in resumed]


async def test_a_follower_waiting_before_the_answer_gets_the_run_live(agent_app, fake_upstream):
    _, key = agent_app
    required = form_of(await paused(key, fake_upstream))
    fake_upstream.script(Reply(text="Rejected, so I will not check the time."))
    path = f"/v1/workflow/{required['workflow_run_id']}/events?user=alice"
    async with dify_call(key, path) as call:
        assert await call.start() == 200
        await asyncio.sleep(0.2)  # subscribed and waiting
        status, data = await answer(key, required["data"]["form_token"], action="reject")
        assert (status, data) == (200, {})
        events = data_events(await call.read(30))
    assert events[0]["event"] == "human_input_form_filled" and events[0]["data"]["action_id"] == "reject"
    assert events[-1]["event"] == "message_end"
    assert (await Approval.objects.aget(pk=required["data"]["node_id"])).status == "rejected"


async def test_a_form_is_answered_once(agent_app, fake_upstream):
    _, key = agent_app
    token = form_of(await paused(key, fake_upstream))["data"]["form_token"]
    fake_upstream.script(Reply(text="Noon."))
    assert (await answer(key, token))[0] == 200
    status, data = await answer(key, token, action="reject")
    assert_error(status, data, (412, "human_input_form_submitted"))
    # Another end user learns nothing about the form, not even that it was answered.
    status, data = await answer(key, token, user="mallory")
    assert_error(status, data, (404, "not_found"))
    status, raw = await get(key, f"/v1/form/human_input/{token}")
    assert_error(status, json.loads(raw), (412, "human_input_form_submitted"))


async def test_a_form_decided_through_the_approval_field_is_submitted(agent_app, fake_upstream):
    _, key = agent_app
    events = await paused(key, fake_upstream)
    required = form_of(events)
    fake_upstream.script(Reply(text="Noon."))
    status, _, _ = await dify_post(key, "/v1/chat-messages", body(
        query="", conversation_id=events[-1]["conversation_id"],
        approval={"id": required["data"]["node_id"], "decision": "approve"}), timeout=30)
    assert status == 200
    status, data = await answer(key, required["data"]["form_token"])
    assert_error(status, data, (412, "human_input_form_submitted"))
    # The run resumed through the chat stream: following it gives its end.
    resumed = await follow(key, required["workflow_run_id"])
    assert [e["event"] for e in resumed] == ["message_end"]
    validate_event(resumed[0])


async def test_a_superseded_or_late_form_has_expired(agent_app, fake_upstream):
    _, key = agent_app
    events = await paused(key, fake_upstream)
    token = form_of(events)["data"]["form_token"]
    late = form_of(await paused(key, fake_upstream))
    await HumanInputForm.objects.filter(pk=late["data"]["form_id"]).aupdate(
        expires_at=timezone.now() - timedelta(seconds=1))
    status, data = await answer(key, late["data"]["form_token"])
    assert_error(status, data, (412, "human_input_form_expired"))

    fake_upstream.script(Reply(text="Something else."))
    status, _, _ = await dify_post(key, "/v1/chat-messages", body(
        query="never mind", conversation_id=events[-1]["conversation_id"]), timeout=30)
    assert status == 200
    status, data = await answer(key, token)
    assert_error(status, data, (412, "human_input_form_expired"))
    assert await Approval.objects.filter(status="approved").acount() == 0


async def test_the_token_works_only_with_its_app_and_its_user(agent_app, default_llm_config, fake_upstream):
    _, key = agent_app
    _, other_key = await sync_to_async(make_app_with_key)(name="other", mode="agent-chat",
                                                          enabled_tools=["current_time"])
    required = form_of(await paused(key, fake_upstream))
    token = required["data"]["form_token"]
    status, raw = await get(other_key, f"/v1/form/human_input/{token}")
    assert_error(status, json.loads(raw), (404, "not_found"))
    status, data = await answer(other_key, token)
    assert_error(status, data, (404, "not_found"))
    status, data = await answer(key, token, user="mallory")
    assert_error(status, data, (404, "not_found"))
    status, data = await answer(key, token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert_error(status, data, (404, "not_found"))
    status, data = await answer(key, "x" * 500)
    assert_error(status, data, (404, "not_found"))
    assert (await Approval.objects.aget(pk=required["data"]["node_id"])).status == "pending"
    assert (await HumanInputForm.objects.aget(pk=required["data"]["form_id"])).submitted_at is None

    run = required["workflow_run_id"]
    for caller, query in ((other_key, "user=alice"), (key, "user=mallory")):
        status, raw = await get(caller, f"/v1/workflow/{run}/events?{query}")
        assert_error(status, json.loads(raw), (404, "not_found"))
    status, raw = await get(key, f"/v1/workflow/{uuid.uuid4()}/events?user=alice")
    assert_error(status, json.loads(raw), (404, "not_found"))
    status, raw = await get(key, f"/v1/workflow/{run}/events")
    assert_error(status, json.loads(raw), (400, "invalid_param"))


async def test_a_staff_only_approval_shows_no_actions_and_refuses_an_answer(agent_app, fake_upstream):
    _, key = agent_app
    events = await paused(key, fake_upstream, tool="run_shell", arguments={"command": "uptime"})
    required = form_of(events)
    validate_event(required)
    assert required["data"]["actions"] == []
    assert "admin" in required["data"]["form_content"] and "uptime" in required["data"]["form_content"]
    status, raw = await get(key, f"/v1/form/human_input/{required['data']['form_token']}")
    form = json.loads(raw)
    assert status == 200 and form["user_actions"] == [] and "admin" in form["form_content"]
    status, data = await answer(key, required["data"]["form_token"])
    assert_error(status, data, (400, "bad_request"))
    assert (await Approval.objects.aget(pk=required["data"]["node_id"])).status == "pending"
    assert (await Message.objects.aget(pk=events[-1]["message_id"])).status == "paused"


@pytest.mark.parametrize(("fields", "expected"), [
    ({"action": None}, (400, "invalid_param")),
    ({"inputs": None}, (400, "invalid_param")),
    ({"user": None}, (400, "invalid_param")),
    ({"action": "maybe"}, (400, "invalid_form_data")),
    ({"inputs": {"comment": 3}}, (400, "invalid_form_data")),
    ({"inputs": {"comment": "x" * 2001}}, (400, "invalid_form_data")),
    ({"inputs": {"priority": "high"}}, (400, "invalid_form_data")),
])
async def test_a_bad_answer_is_refused_and_changes_nothing(agent_app, fake_upstream, fields, expected):
    _, key = agent_app
    required = form_of(await paused(key, fake_upstream))
    payload = {"inputs": {}, "action": "approve", "user": "alice", **fields}
    payload = {k: v for k, v in payload.items() if v is not None}
    status, _, raw = await dify_post(key, f"/v1/form/human_input/{required['data']['form_token']}", payload)
    assert_error(status, json.loads(raw), expected)
    assert (await Approval.objects.aget(pk=required["data"]["node_id"])).status == "pending"
    assert (await HumanInputForm.objects.aget(pk=required["data"]["form_id"])).submitted_at is None


async def test_a_finished_run_is_one_message_end_and_a_disconnect_leaves_the_run_alone(agent_app, fake_upstream):
    _, key = agent_app
    required = form_of(await paused(key, fake_upstream))
    run = required["workflow_run_id"]
    # A follower that leaves while the run waits changes nothing.
    async with dify_call(key, f"/v1/workflow/{run}/events?user=alice") as call:
        assert await call.start() == 200
    assert (await Message.objects.aget(task_id=run)).status == "paused"
    fake_upstream.script(Reply(text="Noon."))
    assert (await answer(key, required["data"]["form_token"]))[0] == 200
    events = await follow(key, run)
    assert events[-1]["event"] == "message_end"
    assert (await Message.objects.aget(task_id=run)).status == "normal"


async def test_continue_on_pause_follows_a_second_pause(agent_app, fake_upstream):
    _, key = agent_app
    required = form_of(await paused(key, fake_upstream))
    run = required["workflow_run_id"]
    # The resumed run asks for the tool again: a second form in the same run.
    fake_upstream.script(Reply(text="", tool_calls=[ToolCall("current_time", {"timezone": "Asia/Tokyo"})]))
    assert (await answer(key, required["data"]["form_token"]))[0] == 200
    first = await follow(key, run)
    assert [e["event"] for e in first][-3:] == ["human_input_required", "workflow_paused", "message_end"]
    second = form_of(first)
    assert second["data"]["form_token"] != required["data"]["form_token"]
    assert "Asia/Tokyo" in second["data"]["form_content"]

    fake_upstream.script(Reply(text="It is evening in Tokyo."))
    async with dify_call(key, f"/v1/workflow/{run}/events?user=alice&continue_on_pause=1") as call:
        assert await call.start() == 200
        replayed = []
        while not any(isinstance(e, dict) and e["event"] == "message_end" for e in replayed):
            replayed += parse_sse(await call.chunk(10))
        # The paused replay did not end the stream: the second answer's run follows on it.
        assert not call.finished
        assert (await answer(key, second["data"]["form_token"]))[0] == 200
        rest = data_events(await call.read(30))
    assert rest[0]["event"] == "human_input_form_filled" and rest[-1]["event"] == "message_end"
    assert "".join(e["answer"] for e in rest if e["event"] == "agent_message") == "It is evening in Tokyo."


async def test_a_failing_form_request_logs_no_token(agent_app, fake_upstream, caplog, monkeypatch):
    from difyapi import workflow_events

    _, key = agent_app
    token = form_of(await paused(key, fake_upstream))["data"]["form_token"]

    def broken(**kwargs):
        raise RuntimeError("the form store broke")

    monkeypatch.setattr(workflow_events, "human_input_form_get", broken)
    # Attached to the logger itself: Django's logging setup may have replaced the root handlers pytest added.
    consumer_log = logging.getLogger("difyapi.consumers")
    consumer_log.addHandler(caplog.handler)
    try:
        status, raw = await get(key, f"/v1/form/human_input/{token}")
    finally:
        consumer_log.removeHandler(caplog.handler)
    assert_error(status, json.loads(raw), (500, "internal_server_error"))
    assert "the form store broke" in caplog.text and "<form_token>" in caplog.text
    assert token not in caplog.text and token not in raw.decode()


async def test_a_follower_of_a_run_whose_server_died_gets_its_error(agent_app, fake_upstream, settings):
    settings.DIFY_PING_INTERVAL = 0.1
    _, key = agent_app
    required = form_of(await paused(key, fake_upstream))
    # As if a form's answer had resumed the run on a server that then died: running, its heartbeat long gone.
    await Message.objects.filter(task_id=required["workflow_run_id"]).aupdate(
        status="running", heartbeat_at=timezone.now() - timedelta(hours=1))
    events = await follow(key, required["workflow_run_id"], timeout=10)
    assert [e["event"] for e in events] == ["error"]
    validate_event(events[0])
    assert events[0]["status"] == 500 and events[0]["code"] == "internal_server_error"
    assert (await Message.objects.aget(task_id=required["workflow_run_id"])).status == "error"


async def test_an_event_the_channel_dropped_is_taken_from_the_replay(agent_app, fake_upstream):
    from channels.layers import get_channel_layer

    from difyapi.workflow_events import EVENT_TYPE, EventBuffer, events_group

    _, key = agent_app
    required = form_of(await paused(key, fake_upstream))
    run = required["workflow_run_id"]
    head = {"task_id": run, "message_id": required["message_id"], "conversation_id": required["conversation_id"],
            "created_at": required["created_at"]}
    async with dify_call(key, f"/v1/workflow/{run}/events?user=alice") as call:
        assert await call.start() == 200
        await asyncio.sleep(0.2)
        buffer = EventBuffer(run)
        await buffer.begin()
        await buffer.append({"event": "agent_message", **head, "id": head["message_id"], "answer": "lost "})
        end = {"event": "message_end", **head, "id": head["message_id"], "metadata": {}, "files": None}
        seq = await buffer.append(end)
        await get_channel_layer().group_send(events_group(run), {"type": EVENT_TYPE, "seq": seq, "data": end})
        events = data_events(await call.read(10))
    assert [e["event"] for e in events] == ["agent_message", "message_end"]
    assert events[0]["answer"] == "lost "


async def test_a_waiting_follower_is_an_active_stream_until_it_leaves(agent_app, fake_upstream):
    from tests.test_metrics import scrape, value

    _, key = agent_app
    required = form_of(await paused(key, fake_upstream))
    before = value(await sync_to_async(scrape)(), "opsagent_active_streams", surface="dify")
    async with dify_call(key, f"/v1/workflow/{required['workflow_run_id']}/events?user=alice") as call:
        assert await call.start() == 200
        await asyncio.sleep(0.2)  # subscribed and waiting
        during = value(await sync_to_async(scrape)(), "opsagent_active_streams", surface="dify")
        await call.disconnect()
    after = value(await sync_to_async(scrape)(), "opsagent_active_streams", surface="dify")
    assert (during - before, after - before) == (1, 0)
