"""REST sessions: CRUD with the session's model and parameters, isolation between users, history and plans."""
from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from agentcore.models import Message, Session, Task, Thought

pytestmark = pytest.mark.django_db


@pytest.fixture
def other_client(django_user_model):
    client = APIClient()
    client.force_authenticate(django_user_model.objects.create_user(username="bob", password="pw-bob-12345"))
    return client


def test_create_session_with_model_and_parameters(user_client, plain_user, agent_app, make_llm_config):
    config = make_llm_config(name="fast")
    response = user_client.post("/api/sessions/", {
        "name": "disk alerts", "llm_config_id": str(config.id), "model_parameters": {"temperature": 0.2},
    }, format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["name"] == "disk alerts"
    assert body["llm_config_id"] == str(config.id)
    assert body["model_parameters"] == {"temperature": 0.2}
    assert body["app_id"] == str(agent_app.id)
    session = Session.objects.get(id=body["id"])
    assert session.owner == plain_user and session.llm_config_id == config.id


def test_create_session_with_unknown_config_is_a_field_error(user_client, agent_app):
    response = user_client.post("/api/sessions/", {"llm_config_id": str(uuid.uuid4())}, format="json")
    assert response.status_code == 400
    assert "llm_config_id" in response.json()
    assert not Session.objects.exists()


def test_create_session_with_out_of_range_temperature_is_refused(user_client, agent_app):
    response = user_client.post("/api/sessions/", {"model_parameters": {"temperature": 7}}, format="json")
    assert response.status_code == 400
    assert not Session.objects.exists()


def test_patch_session_changes_model_parameters_and_name(user_client, plain_user, agent_app, make_llm_config):
    session = Session.objects.create(app=agent_app, owner=plain_user, name="old")
    config = make_llm_config(name="smart")
    response = user_client.patch(f"/api/sessions/{session.id}/", {
        "name": "new", "llm_config_id": str(config.id), "model_parameters": {"max_tokens": 256, "top_p": 0.5},
    }, format="json")
    assert response.status_code == 200, response.json()
    session.refresh_from_db()
    assert (session.name, session.llm_config_id) == ("new", config.id)
    assert session.model_parameters == {"max_tokens": 256, "top_p": 0.5}


def test_delete_is_soft_and_hides_the_session(user_client, plain_user, agent_app):
    session = Session.objects.create(app=agent_app, owner=plain_user)
    assert user_client.delete(f"/api/sessions/{session.id}/").status_code == 204
    session.refresh_from_db()
    assert session.is_deleted
    assert user_client.get(f"/api/sessions/{session.id}/").status_code == 404
    assert user_client.get("/api/sessions/").json()["count"] == 0


def test_users_see_only_their_own_sessions(user_client, other_client, plain_user, agent_app):
    mine = Session.objects.create(app=agent_app, owner=plain_user, name="mine")
    listed = other_client.get("/api/sessions/").json()
    assert listed["count"] == 0
    assert other_client.get(f"/api/sessions/{mine.id}/").status_code == 404
    assert other_client.patch(f"/api/sessions/{mine.id}/", {"name": "x"}, format="json").status_code == 404
    assert other_client.delete(f"/api/sessions/{mine.id}/").status_code == 404
    assert other_client.get(f"/api/sessions/{mine.id}/messages/").status_code == 404
    assert other_client.get(f"/api/sessions/{mine.id}/tasks/").status_code == 404
    mine.refresh_from_db()
    assert mine.name == "mine" and not mine.is_deleted
    assert [s["id"] for s in user_client.get("/api/sessions/").json()["results"]] == [str(mine.id)]


def test_staff_see_every_session(staff_client, plain_user, agent_app):
    session = Session.objects.create(app=agent_app, owner=plain_user)
    assert staff_client.get(f"/api/sessions/{session.id}/").status_code == 200


def test_anonymous_is_refused(api_client, agent_app):
    response = api_client.get("/api/sessions/")
    assert response.status_code == 401  # not authenticated (403 would be "authenticated but not allowed")
    assert response.json() == {"detail": "Authentication credentials were not provided."}


def test_messages_list_with_thoughts_in_constant_queries(user_client, plain_user, agent_app):
    session = Session.objects.create(app=agent_app, owner=plain_user)

    def add_message(n: int) -> None:
        message = Message.objects.create(session=session, query=f"q{n}", answer=f"a{n}", status="normal")
        for position in (1, 2):
            Thought.objects.create(message=message, position=position, tool="current_time", observation="now")

    add_message(1)
    # force_authenticate hands every request the same user object: the first request fills its permission cache.
    user_client.get(f"/api/sessions/{session.id}/messages/")
    with CaptureQueriesContext(connection) as one:
        assert user_client.get(f"/api/sessions/{session.id}/messages/").status_code == 200
    for n in range(2, 12):
        add_message(n)
    with CaptureQueriesContext(connection) as many:
        response = user_client.get(f"/api/sessions/{session.id}/messages/")
    assert len(many) == len(one)
    body = response.json()
    assert body["count"] == 11
    first = body["results"][0]
    assert (first["query"], first["answer"], first["status"]) == ("q1", "a1", "normal")
    assert [t["position"] for t in first["thoughts"]] == [1, 2]
    assert first["thoughts"][0]["tool"] == "current_time"


def test_tasks_list_the_plan_in_order(user_client, plain_user, agent_app):
    session = Session.objects.create(app=agent_app, owner=plain_user)
    Task.objects.create(session=session, title="check disk", order=2)
    Task.objects.create(session=session, title="check load", order=1, status="done")
    response = user_client.get(f"/api/sessions/{session.id}/tasks/")
    assert response.status_code == 200
    assert [(t["title"], t["status"]) for t in response.json()] == [("check load", "done"), ("check disk", "pending")]
