"""Services and selectors: sessions with their model, history without N+1, plans, approvals, stale runs, demo app."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agentcore.errors import (
    ApprovalAlreadyDecided,
    ApprovalForbidden,
    ApprovalNotFound,
    InvalidInput,
    SessionNotFound,
)
from agentcore.models import AgentApp, Approval, Message, Session, Thought
from agentcore.selectors import approval_list, message_list, session_get_for, session_list_for, task_list
from agentcore.services import (
    agent_app_seed_demo,
    approval_decide,
    approval_supersede,
    message_close_stale,
    session_create,
    session_delete,
    session_update,
    task_replace,
)
from llmconfigs.errors import ConfigInactive, ConfigNotFound, InvalidParameter

pytestmark = pytest.mark.django_db


def test_session_create_and_update_validate_model_and_parameters(agent_app, plain_user, make_llm_config):
    config = make_llm_config(name="zhipu-cfg", provider="zhipu", model_name="glm-4", top_p=0.9)
    session = session_create(app=agent_app, owner=plain_user, llm_config_id=str(config.pk),
                             model_parameters={"temperature": 0.5})
    assert session.llm_config_id == config.pk and session.model_parameters == {"temperature": 0.5}
    with pytest.raises(InvalidParameter) as caught:  # zhipu refuses temperature 0
        session_update(session=session, model_parameters={"temperature": 0})
    assert caught.value.field == "model_parameters"
    with pytest.raises(InvalidInput, match=r"^Unknown model parameter\(s\): seed; allowed: ") as caught:
        session_update(session=session, model_parameters={"seed": 1})
    assert caught.value.field == "model_parameters"
    with pytest.raises(ConfigNotFound) as caught:
        session_update(session=session, llm_config_id="00000000-0000-0000-0000-000000000000")
    assert caught.value.field == "llm_config_id"
    inactive = make_llm_config(name="off", is_active=False)
    with pytest.raises(ConfigInactive) as caught:
        session_update(session=session, llm_config_id=str(inactive.pk))
    assert caught.value.field == "llm_config_id"
    session_update(session=session, name="  renamed ", llm_config_id=None)
    session.refresh_from_db()
    assert (session.name, session.llm_config_id, session.model_parameters) == ("renamed", None, {"temperature": 0.5})


def test_session_delete_is_soft_and_hides_the_session(agent_app, plain_user, staff_user, django_user_model):
    mine = session_create(app=agent_app, owner=plain_user)
    other = session_create(app=agent_app, owner=django_user_model.objects.create_user(username="bob"))
    assert list(session_list_for(user=plain_user)) == [mine]
    assert set(session_list_for(user=staff_user)) == {mine, other}
    session_delete(session=mine)
    assert Session.objects.filter(pk=mine.pk, is_deleted=True).exists()
    assert list(session_list_for(user=plain_user)) == []
    with pytest.raises(SessionNotFound):
        session_get_for(session_id=mine.pk, owner=plain_user)


def test_message_list_prefetches_thoughts(agent_app, plain_user):
    session = session_create(app=agent_app, owner=plain_user)
    for i in range(5):
        message = Message.objects.create(session=session, query=f"q{i}", status="normal")
        Thought.objects.bulk_create([Thought(message=message, position=p, tool="current_time") for p in (1, 2)])
    with CaptureQueriesContext(connection) as queries:
        rows = [(m.query, [t.position for t in m.thoughts.all()]) for m in message_list(session=session)]
    assert len(queries) == 2
    assert rows[0] == ("q0", [1, 2]) and len(rows) == 5


def test_task_replace_and_list(agent_app, plain_user):
    session = session_create(app=agent_app, owner=plain_user)
    task_replace(session_id=session.pk, tasks=[{"title": "a"}, {"title": "b", "status": "done"}])
    task_replace(session_id=session.pk, tasks=[{"title": "c", "status": "in_progress"}])
    assert [(t.title, t.status) for t in task_list(session=session)] == [("c", "in_progress")]
    with pytest.raises(ValueError, match=r"^unknown status 'someday'; use one of "):
        task_replace(session_id=session.pk, tasks=[{"title": "x", "status": "someday"}])
    with pytest.raises(ValueError, match=r"^every step needs a title$"):
        task_replace(session_id=session.pk, tasks=[{"title": "  ", "status": "done"}])
    assert [(t.title, t.status) for t in task_list(session=session)] == [("c", "in_progress")]  # nothing half-written


def test_approval_list_and_decide(agent_app, plain_user, staff_user):
    session = session_create(app=agent_app, owner=plain_user)
    message = Message.objects.create(session=session, query="q", status="paused")
    approval = Approval.objects.create(session=session, message=message, tool="http_check")
    assert list(approval_list(status="pending", user=plain_user)) == [approval]
    approval_decide(approval_id=approval.pk, decision="reject", comment="no", user=staff_user)
    assert list(approval_list(status="pending")) == []
    assert approval_list(status="rejected").get().decided_by == staff_user
    with pytest.raises(InvalidInput, match=r"^decision must be 'approve' or 'reject'\.$") as caught:
        approval_decide(approval_id=approval.pk, decision="maybe")
    assert caught.value.field == "decision"


@pytest.fixture
def pending(agent_app, plain_user):
    """pending(tool, approver): a pending approval of a paused turn in one of plain_user's sessions."""
    session = session_create(app=agent_app, owner=plain_user)
    message = Message.objects.create(session=session, query="q", status="paused")

    def make(tool: str = "http_check", approver: str = "requester") -> Approval:
        return Approval.objects.create(session=session, message=message, tool=tool, approver=approver)

    return make


@pytest.mark.parametrize("approval_id", ["not-a-uuid", "5b1f6e0e-0000-4000-8000-000000000000"])
def test_deciding_an_unknown_approval_is_not_found(approval_id):
    with pytest.raises(ApprovalNotFound) as caught:
        approval_decide(approval_id=approval_id, decision="approve")
    assert (str(caught.value), caught.value.field) == ("Approval not found.", "approval_id")


def test_an_end_user_decides_a_requester_approval_once(pending):
    approval = pending()
    decided = approval_decide(approval_id=str(approval.pk), decision="approve", comment="x" * 2100, end_user="bob")
    stored = Approval.objects.get(pk=approval.pk)
    assert (stored.status, stored.decided_by, stored.decided_by_end_user) == ("approved", None, "bob")
    assert stored.comment == "x" * 2000 and stored.decided_at is not None
    assert (decided.status, decided.decided_at) == (stored.status, stored.decided_at)
    with pytest.raises(ApprovalAlreadyDecided) as caught:
        approval_decide(approval_id=approval.pk, decision="reject", end_user="bob")
    assert (str(caught.value), caught.value.field) == ("This approval was already approved.", "approval_id")
    assert Approval.objects.get(pk=approval.pk).status == "approved"


def test_an_anonymous_user_decides_as_nobody(pending):
    from django.contrib.auth.models import AnonymousUser

    approval = pending()
    approval_decide(approval_id=approval.pk, decision="reject", user=AnonymousUser())
    stored = Approval.objects.get(pk=approval.pk)
    assert (stored.status, stored.decided_by, stored.decided_by_end_user, stored.comment) == ("rejected", None, "", "")


@pytest.mark.parametrize(("tool", "approver", "permission"), [
    ("run_shell", "requester", "agentcore.approve_shell"),
    ("run_shell", "staff", "agentcore.approve_shell"),
    ("http_check", "staff", "agentcore.change_approval"),
])
def test_a_guarded_approval_needs_its_permission(pending, plain_user, grant, tool, approver, permission):
    approval = pending(tool, approver)
    for who in ({"end_user": "alice"}, {"user": plain_user}):
        with pytest.raises(ApprovalForbidden) as caught:
            approval_decide(approval_id=approval.pk, decision="approve", **who)
        assert str(caught.value) == f"Deciding {tool} needs the permission {permission}."
        assert caught.value.field == "approval_id"
        assert Approval.objects.get(pk=approval.pk).status == "pending"
    approver_user = grant(plain_user, permission)
    approval_decide(approval_id=approval.pk, decision="approve", user=approver_user)
    stored = Approval.objects.get(pk=approval.pk)
    assert (stored.status, stored.decided_by) == ("approved", plain_user)


def test_a_new_query_supersedes_only_its_own_sessions_pending_approvals(pending, agent_app, plain_user):
    first, second, decided = pending(), pending(), pending()
    approval_decide(approval_id=decided.pk, decision="approve", end_user="alice")
    other_session = session_create(app=agent_app, owner=plain_user)
    other_message = Message.objects.create(session=other_session, query="q", status="paused")
    other = Approval.objects.create(session=other_session, message=other_message, tool="http_check")
    # The session's earlier turns are not the paused one: their answers and errors stay as they were.
    earlier = {status: Message.objects.create(session=first.session, query="q", status=status)
               for status in ("normal", "error", "running")}

    assert approval_supersede(session=first.session) == 2
    for approval in (first, second):
        stored = Approval.objects.get(pk=approval.pk)
        assert (stored.status, stored.comment) == ("rejected", "superseded by a new message")
        assert stored.decided_at is not None
    assert Approval.objects.get(pk=decided.pk).status == "approved"
    assert Message.objects.get(pk=first.message_id).status == "stopped"
    assert Approval.objects.get(pk=other.pk).status == "pending"
    assert Message.objects.get(pk=other_message.pk).status == "paused"
    assert {status: Message.objects.get(pk=message.pk).status for status, message in earlier.items()} == {
        "normal": "normal", "error": "error", "running": "running"}


def test_message_close_stale(agent_app, plain_user, settings):
    settings.AGENT_STALE_RUN_SECONDS = 60
    session = session_create(app=agent_app, owner=plain_user)
    dead = Message.objects.create(session=session, query="q", heartbeat_at=timezone.now() - timedelta(seconds=61))
    alive = Message.objects.create(session=session, query="q", heartbeat_at=timezone.now())
    assert message_close_stale() == 1
    dead.refresh_from_db()
    alive.refresh_from_db()
    assert (dead.status, dead.error) == ("error", "interrupted: the server stopped during this answer")
    assert alive.status == "running"


def test_agent_app_seed_demo_is_idempotent(db):
    app = agent_app_seed_demo()
    assert (app.name, app.mode) == ("OpsAgent", "agent-chat") and "OpsAgent" in app.system_prompt
    assert agent_app_seed_demo() == app and AgentApp.objects.count() == 1
