"""Approvals: a tool needing one interrupts before it runs; approve runs it, reject tells the model; one decision."""
from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from agentcore.errors import ApprovalAlreadyDecided, ApprovalForbidden, ApprovalNotFound
from agentcore.events import ApprovalRequired, RunEnd
from agentcore.models import Approval, Message, Thought
from agentcore.runs import ApprovalDecision, TurnOverrides, TurnRequest, aturn_prepare, turn_prepare_and_run, turn_run
from agentcore.services import approval_decide
from agentcore.tests.factories import checkpoint_rows, run_all, types
from agentcore.tools.policies import tool_policy_update
from tests.fakes.upstream import Reply, ToolCall

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def http_check_needs_approval(transactional_db):
    tool_policy_update(name="http_check", requires_approval=True)


async def _paused_http_check(app, user, fake_upstream, url, **request):
    fake_upstream.script(Reply(tool_calls=[ToolCall("http_check", {"url": url}, id="call_1")]))
    events = await run_all(TurnRequest(app=app, query="is it up?", owner=user, **request))
    return events


async def test_tool_needing_approval_pauses_before_it_runs(agent_app, plain_user, fake_upstream, counting_target,
                                                          http_check_needs_approval):
    events = await _paused_http_check(agent_app, plain_user, fake_upstream, counting_target.url)
    end = events[-1]
    assert isinstance(end, RunEnd) and end.status == "paused"
    required = [e for e in events if isinstance(e, ApprovalRequired)]
    assert len(required) == 1 and required[0].tool == "http_check" and required[0].approver == "requester"
    assert end.pending_approvals == [{"id": required[0].approval_id, "tool": "http_check",
                                      "tool_input": {"url": counting_target.url}}]
    assert counting_target.hits == 0
    approval = await Approval.objects.aget(pk=required[0].approval_id)
    assert (approval.status, approval.tool_call_id, approval.tool_input) == ("pending", "call_1",
                                                                             {"url": counting_target.url})
    message = await Message.objects.aget(pk=end.message_id)
    assert message.status == "paused"
    thought = await Thought.objects.aget(pk=required[0].thought_id)
    assert thought.status == "awaiting_approval"


async def test_approve_runs_the_tool_and_finishes_the_same_message(agent_app, plain_user, fake_upstream,
                                                                  counting_target, http_check_needs_approval):
    paused = await _paused_http_check(agent_app, plain_user, fake_upstream, counting_target.url)
    approval_id = paused[-1].pending_approvals[0]["id"]
    fake_upstream.script(Reply(text="It answered 200."))
    assert counting_target.hits == 0
    turn = await aturn_prepare(TurnRequest(app=agent_app, owner=plain_user, session_id=paused[0].session_id,
                                          approval=ApprovalDecision(approval_id=approval_id, decision="approve")))
    assert str(turn.message.pk) == paused[0].message_id and str(turn.message.task_id) == paused[0].task_id
    events = [e async for e in turn_run(turn)]
    assert counting_target.hits == 1
    assert events[-1].status == "normal" and events[-1].answer == "It answered 200."
    assert "thought" in types(events)
    tool_message = fake_upstream.chat_requests[-1].messages[-1]
    assert tool_message["role"] == "tool" and '"status": 200' in tool_message["content"]
    approval = await Approval.objects.aget(pk=approval_id)
    assert approval.status == "approved" and approval.decided_by_id == plain_user.pk
    thought = await Thought.objects.aget(message_id=paused[0].message_id, tool="http_check")
    assert thought.status == "done" and '"status": 200' in thought.observation


async def test_reject_tells_the_model_with_the_comment(agent_app, plain_user, fake_upstream, counting_target,
                                                      http_check_needs_approval):
    paused = await _paused_http_check(agent_app, plain_user, fake_upstream, counting_target.url)
    approval_id = paused[-1].pending_approvals[0]["id"]
    fake_upstream.script(Reply(text="OK, I will not check it."))
    events = await run_all(TurnRequest(app=agent_app, owner=plain_user, approval=ApprovalDecision(
        approval_id=approval_id, decision="reject", comment="not during the freeze")))
    assert events[-1].status == "normal"
    assert counting_target.hits == 0
    tool_message = fake_upstream.chat_requests[-1].messages[-1]
    assert tool_message["role"] == "tool" and "rejected" in tool_message["content"]
    assert "not during the freeze" in tool_message["content"]
    thought = await Thought.objects.aget(message_id=paused[0].message_id, tool="http_check")
    assert thought.status == "rejected"


async def test_second_decision_is_refused(agent_app, plain_user, fake_upstream, counting_target,
                                          http_check_needs_approval):
    paused = await _paused_http_check(agent_app, plain_user, fake_upstream, counting_target.url)
    approval_id = paused[-1].pending_approvals[0]["id"]
    await run_all(TurnRequest(app=agent_app, owner=plain_user,
                              approval=ApprovalDecision(approval_id=approval_id, decision="approve")))
    with pytest.raises(ApprovalAlreadyDecided):
        await aturn_prepare(TurnRequest(app=agent_app, owner=plain_user,
                                       approval=ApprovalDecision(approval_id=approval_id, decision="reject")))
    with pytest.raises(ApprovalAlreadyDecided):
        await database_sync_to_async(approval_decide)(approval_id=approval_id, decision="reject")
    assert counting_target.hits == 1


async def test_someone_elses_approval_is_not_found(agent_app, plain_user, django_user_model, fake_upstream,
                                                   counting_target, http_check_needs_approval):
    paused = await _paused_http_check(agent_app, plain_user, fake_upstream, counting_target.url)
    approval_id = paused[-1].pending_approvals[0]["id"]
    bob = await django_user_model.objects.acreate(username="bob")
    with pytest.raises(ApprovalNotFound):
        await aturn_prepare(TurnRequest(app=agent_app, owner=bob,
                                       approval=ApprovalDecision(approval_id=approval_id, decision="approve")))
    assert (await Approval.objects.aget(pk=approval_id)).status == "pending"


@pytest.fixture
def shell_enabled(transactional_db):
    tool_policy_update(name="run_shell", enabled=True)


async def test_run_shell_needs_a_staff_approval_and_never_runs_before(agent_app, plain_user, staff_user,
                                                                     fake_upstream, shell_enabled, tmp_path):
    marker = tmp_path / "ran.txt"
    fake_upstream.script(Reply(tool_calls=[ToolCall("run_shell", {"command": f"echo hi > {marker}"})]))
    paused = await run_all(TurnRequest(app=agent_app, query="touch it", end_user="api-user", source="api"))
    pending = paused[-1].pending_approvals
    assert paused[-1].status == "paused" and pending[0]["tool"] == "run_shell"
    assert not marker.exists()
    with pytest.raises(ApprovalForbidden):  # the API end user may not approve their own shell command
        await aturn_prepare(TurnRequest(app=agent_app, end_user="api-user", source="api",
                                       approval=ApprovalDecision(approval_id=pending[0]["id"], decision="approve")))
    with pytest.raises(ApprovalForbidden):
        await database_sync_to_async(approval_decide)(approval_id=pending[0]["id"], decision="approve",
                                                      user=plain_user)
    assert not marker.exists()
    assert (await Approval.objects.aget(pk=pending[0]["id"])).status == "pending"
    fake_upstream.script(Reply(text="Done."))
    # Staff decide from the console (admin/REST), where they see every session.
    events = [e async for e in turn_prepare_and_run(TurnRequest(
        app=agent_app, owner=staff_user, approval=ApprovalDecision(approval_id=pending[0]["id"], decision="approve")))]
    assert events[-1].status == "normal"
    assert marker.read_text().strip() == "hi"


async def test_run_shell_stays_approval_only(transactional_db):
    from agentcore.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"^run_shell always requires an approval\.$") as caught:
        await database_sync_to_async(tool_policy_update)(name="run_shell", requires_approval=False)
    assert caught.value.field == "requires_approval"
    with pytest.raises(InvalidInput, match=r"^Only staff may approve run_shell\.$") as caught:
        await database_sync_to_async(tool_policy_update)(name="run_shell", approver="requester")
    assert caught.value.field == "approver"


async def test_a_new_query_supersedes_a_paused_turn(agent_app, plain_user, fake_upstream, counting_target,
                                                   http_check_needs_approval):
    paused = await _paused_http_check(agent_app, plain_user, fake_upstream, counting_target.url)
    approval_id = paused[-1].pending_approvals[0]["id"]
    fake_upstream.script(Reply(text="Something else."))
    events = await run_all(TurnRequest(app=agent_app, query="never mind", owner=plain_user,
                                       session_id=paused[0].session_id))
    assert events[-1].status == "normal"
    sent = fake_upstream.chat_requests[-1].messages
    # The abandoned call is answered in the history, so the provider accepts the conversation.
    assert sent[-2]["role"] == "tool" and sent[-2]["tool_call_id"] == "call_1"
    assert (await Approval.objects.aget(pk=approval_id)).status == "rejected"
    with pytest.raises(ApprovalAlreadyDecided):
        await aturn_prepare(TurnRequest(app=agent_app, owner=plain_user,
                                       approval=ApprovalDecision(approval_id=approval_id, decision="approve")))
    assert counting_target.hits == 0


async def test_two_calls_needing_approval_are_asked_one_by_one_and_each_runs_once(
        agent_app, plain_user, fake_upstream, counting_target, http_check_needs_approval):
    fake_upstream.script(Reply(tool_calls=[ToolCall("http_check", {"url": counting_target.url}, id="a"),
                                           ToolCall("http_check", {"url": counting_target.url + "?2"}, id="b")]))
    first = await run_all(TurnRequest(app=agent_app, query="check both", owner=plain_user))
    assert [p["tool_input"]["url"] for p in first[-1].pending_approvals] == [counting_target.url]
    second = await run_all(TurnRequest(app=agent_app, owner=plain_user, approval=ApprovalDecision(
        approval_id=first[-1].pending_approvals[0]["id"], decision="approve")))
    assert second[-1].status == "paused" and counting_target.hits == 0  # nothing runs until every call is decided
    assert second[-1].pending_approvals[0]["tool_input"]["url"] == counting_target.url + "?2"
    fake_upstream.script(Reply(text="Both fine."))
    third = await run_all(TurnRequest(app=agent_app, owner=plain_user, approval=ApprovalDecision(
        approval_id=second[-1].pending_approvals[0]["id"], decision="approve")))
    assert third[-1].status == "normal" and counting_target.hits == 2
    assert third[0].message_id == first[0].message_id
    statuses = [t.status async for t in Thought.objects.filter(message_id=first[0].message_id, tool="http_check")]
    assert statuses == ["done", "done"]


async def test_the_resumed_run_keeps_the_turns_tool_subset(agent_app, plain_user, fake_upstream, counting_target,
                                                           http_check_needs_approval):
    paused = await _paused_http_check(agent_app, plain_user, fake_upstream, counting_target.url,
                                      overrides=TurnOverrides(tools=["http_check", "current_time"]))
    assert {t["function"]["name"] for t in fake_upstream.chat_requests[-1].body["tools"]} == {"http_check",
                                                                                              "current_time"}
    fake_upstream.script(Reply(text="It answered 200."))
    await run_all(TurnRequest(app=agent_app, owner=plain_user, session_id=paused[0].session_id,
                              approval=ApprovalDecision(approval_id=paused[-1].pending_approvals[0]["id"],
                                                        decision="approve")))
    assert counting_target.hits == 1
    assert {t["function"]["name"] for t in fake_upstream.chat_requests[-1].body["tools"]} == {"http_check",
                                                                                              "current_time"}


async def test_an_approval_resumes_after_the_paused_conversations_older_checkpoints_are_pruned(
        agent_app, plain_user, fake_upstream, counting_target, http_check_needs_approval):
    fake_upstream.script(Reply(text="Hello."))
    first = await run_all(TurnRequest(app=agent_app, query="hi", owner=plain_user))
    session_id = first[0].session_id
    paused = await _paused_http_check(agent_app, plain_user, fake_upstream, counting_target.url, session_id=session_id)
    # The pause's own checkpoint stays, with the interrupt pending on it; everything before it is gone.
    checkpoints, writes = await checkpoint_rows(session_id)
    assert checkpoints == 1 and writes >= 1
    fake_upstream.script(Reply(text="It answered 200."))
    decision = ApprovalDecision(approval_id=paused[-1].pending_approvals[0]["id"], decision="approve")
    events = await run_all(TurnRequest(app=agent_app, owner=plain_user, session_id=session_id, approval=decision))
    assert events[-1].status == "normal" and counting_target.hits == 1
    roles = [m["role"] for m in fake_upstream.chat_requests[-1].messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "tool"]


async def test_a_call_needing_approval_after_a_tool_step_the_run_made_itself_pauses_and_resumes(
        agent_app, plain_user, fake_upstream, counting_target, http_check_needs_approval):
    """The run's own tool loop hands a call that needs an approval to the graph: its tool step interrupts; approving
    runs it once, and the model sees both tool steps."""
    fake_upstream.script(Reply(tool_calls=[ToolCall("current_time", {"timezone": "UTC"}, id="call_t")]),
                         Reply(tool_calls=[ToolCall("http_check", {"url": counting_target.url}, id="call_h")]))
    paused = await run_all(TurnRequest(app=agent_app, query="is it up?", owner=plain_user))
    assert paused[-1].status == "paused" and counting_target.hits == 0
    assert [a["tool"] for a in paused[-1].pending_approvals] == ["http_check"]
    fake_upstream.script(Reply(text="It answered 200."))
    events = await run_all(TurnRequest(
        app=agent_app, owner=plain_user, session_id=paused[0].session_id,
        approval=ApprovalDecision(approval_id=paused[-1].pending_approvals[0]["id"], decision="approve")))
    assert events[-1].status == "normal" and events[-1].answer == "It answered 200."
    assert counting_target.hits == 1
    sent = fake_upstream.chat_requests[-1].messages
    assert [m["role"] for m in sent[1:]] == ["user", "assistant", "tool", "assistant", "tool"]
    assert [m.get("tool_call_id") for m in sent[1:] if m["role"] == "tool"] == ["call_t", "call_h"]
    thoughts = [t async for t in Thought.objects.filter(message_id=paused[0].message_id).order_by("position")]
    assert [(t.tool, t.status) for t in thoughts] == [("current_time", "done"), ("http_check", "done"),
                                                      ("", "done")]
