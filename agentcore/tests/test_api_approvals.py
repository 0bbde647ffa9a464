"""REST approvals: a tool that needs approval pauses the turn; approve/reject resume it; decisions are final."""
from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from agentcore.models import Approval, Message
from tests.fakes.upstream import Reply, ToolCall

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("http_check_needs_approval")]


def _paused_turn(client, fake_upstream, counting_target) -> dict:
    fake_upstream.script(
        Reply(tool_calls=[ToolCall("http_check", {"url": counting_target.url})]),
        Reply(text="The site answered."),
    )
    response = client.post("/api/agent/chat/", {"message": "Is the site up?"}, format="json")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "paused"
    return body


def test_a_tool_needing_approval_pauses_the_turn_and_does_not_run(user_client, agent_app, fake_upstream,
                                                                   counting_target):
    body = _paused_turn(user_client, fake_upstream, counting_target)
    [pending] = body["pending_approvals"]
    assert pending["tool"] == "http_check" and pending["tool_input"] == {"url": counting_target.url}
    assert counting_target.hits == 0
    assert Message.objects.get(id=body["message_id"]).status == "paused"
    listed = user_client.get("/api/approvals/?status=pending").json()
    assert [a["id"] for a in listed["results"]] == [pending["id"]]
    assert user_client.get("/api/approvals/?status=approved").json()["count"] == 0


def test_approve_runs_the_tool_and_resumes_the_same_message(user_client, plain_user, agent_app, fake_upstream,
                                                            counting_target):
    body = _paused_turn(user_client, fake_upstream, counting_target)
    approval_id = body["pending_approvals"][0]["id"]
    assert counting_target.hits == 0

    response = user_client.post(f"/api/approvals/{approval_id}/approve/", {"comment": "go ahead"}, format="json")
    assert response.status_code == 200, response.json()
    result = response.json()
    assert result["approval"]["status"] == "approved" and result["approval"]["comment"] == "go ahead"
    assert result["approval"]["decided_by"] == plain_user.username
    assert result["message"] == {"id": body["message_id"], "answer": "The site answered.", "status": "normal"}
    assert counting_target.hits == 1
    tool_messages = [m for m in fake_upstream.chat_requests[-1].messages if m["role"] == "tool"]
    assert '"status": 200' in tool_messages[-1]["content"]


def test_reject_tells_the_model_and_never_runs_the_tool(user_client, agent_app, fake_upstream, counting_target):
    body = _paused_turn(user_client, fake_upstream, counting_target)
    approval_id = body["pending_approvals"][0]["id"]
    response = user_client.post(f"/api/approvals/{approval_id}/reject/", {"comment": "not during the freeze"},
                                format="json")
    assert response.status_code == 200, response.json()
    assert response.json()["approval"]["status"] == "rejected"
    assert response.json()["message"]["status"] == "normal"
    assert counting_target.hits == 0
    tool_messages = [m for m in fake_upstream.chat_requests[-1].messages if m["role"] == "tool"]
    assert "not during the freeze" in tool_messages[-1]["content"]


def test_a_second_decision_is_409(user_client, agent_app, fake_upstream, counting_target):
    body = _paused_turn(user_client, fake_upstream, counting_target)
    approval_id = body["pending_approvals"][0]["id"]
    assert user_client.post(f"/api/approvals/{approval_id}/reject/", {}, format="json").status_code == 200
    second = user_client.post(f"/api/approvals/{approval_id}/approve/", {}, format="json")
    assert second.status_code == 409
    assert second.json() == {"detail": "This approval was already rejected.",
                             "code": "approval_already_decided"}
    assert Approval.objects.get(id=approval_id).status == "rejected"
    assert counting_target.hits == 0


def test_staff_only_approval_is_403_for_a_user_and_works_for_staff(user_client, staff_client, agent_app,
                                                                     fake_upstream, counting_target):
    from agentcore.tools.policies import tool_policy_update

    tool_policy_update(name="http_check", approver="staff")
    body = _paused_turn(user_client, fake_upstream, counting_target)
    approval_id = body["pending_approvals"][0]["id"]
    response = user_client.post(f"/api/approvals/{approval_id}/approve/", {}, format="json")
    assert response.status_code == 403
    assert Approval.objects.get(id=approval_id).status == "pending"
    assert counting_target.hits == 0

    response = staff_client.post(f"/api/approvals/{approval_id}/approve/", {}, format="json")
    assert response.status_code == 200, response.json()
    assert response.json()["approval"]["decided_by"] == "staff"
    assert counting_target.hits == 1


def test_another_users_approval_is_invisible(user_client, agent_app, fake_upstream, counting_target, django_user_model):
    body = _paused_turn(user_client, fake_upstream, counting_target)
    approval_id = body["pending_approvals"][0]["id"]
    other = APIClient()
    other.force_authenticate(django_user_model.objects.create_user(username="bob", password="pw-bob-12345"))
    assert other.get("/api/approvals/").json()["count"] == 0
    assert other.post(f"/api/approvals/{approval_id}/approve/", {}, format="json").status_code == 404
    assert Approval.objects.get(id=approval_id).status == "pending"
    assert counting_target.hits == 0


def test_unknown_status_filter_is_a_field_error(user_client):
    response = user_client.get("/api/approvals/?status=maybe")
    assert response.status_code == 400 and "status" in response.json()


def test_staff_approve_a_staff_only_tool_asked_for_by_a_service_api_end_user(staff_client, agent_app, fake_upstream,
                                                                              counting_target):
    from agentcore.api.turns import turn_drain
    from agentcore.runs import TurnRequest, turn_prepare
    from agentcore.tools.policies import tool_policy_update

    tool_policy_update(name="http_check", approver="staff")
    fake_upstream.script(
        Reply(tool_calls=[ToolCall("http_check", {"url": counting_target.url})]),
        Reply(text="The site answered."),
    )
    turn = turn_prepare(TurnRequest(app=agent_app, query="Is the site up?", end_user="dify-user", source="api"))
    assert turn_drain(turn).status == "paused"
    approval = Approval.objects.get(message_id=turn.message.id)
    assert counting_target.hits == 0

    response = staff_client.post(f"/api/approvals/{approval.id}/approve/", {}, format="json")

    assert response.status_code == 200, response.json()
    assert response.json()["approval"]["decided_by"] == "staff"
    assert response.json()["message"]["status"] == "normal"
    assert counting_target.hits == 1


def test_a_decision_is_audited_with_who_where_and_no_tool_arguments(user_client, plain_user, agent_app,
                                                                    fake_upstream, counting_target):
    from llmconfigs.models import AuditLog

    body = _paused_turn(user_client, fake_upstream, counting_target)
    approval_id = body["pending_approvals"][0]["id"]

    user_client.post(f"/api/approvals/{approval_id}/reject/", {"comment": "not now"}, format="json",
                     REMOTE_ADDR="10.7.7.7", HTTP_USER_AGENT="approver-ui/2")

    [row] = AuditLog.objects.filter(action="decide")
    assert (row.actor, row.source, row.ip_address, row.user_agent) == (plain_user, "api", "10.7.7.7",
                                                                       "approver-ui/2")
    assert (row.target_type, row.target_id) == ("agentcore.Approval", approval_id)
    assert row.changes["status"] == {"old": "pending", "new": "rejected"} and row.changes["tool"] == "http_check"
    assert counting_target.url not in str(row.changes) and "not now" not in str(row.changes)
