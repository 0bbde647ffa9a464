"""Conversations (SPEC.md §7): listing with keyset pagination and sorting, scoping, soft delete (204), rename with
and without auto_generate (the fake upstream names it), and the always-empty variables list."""
from __future__ import annotations

import uuid

import pytest

from agentcore.models import Session
from difyapi.tests.factories import (
    CONVERSATION_KEYS,
    DifyClient,
    assert_error,
    make_app,
    make_key,
    make_message,
    make_session,
    seconds,
)
from difyapi.tests.openapi import assert_schema
from tests.fakes.upstream import Reply

pytestmark = pytest.mark.django_db


@pytest.fixture
def app():
    return make_app(opening_statement="Welcome!")


@pytest.fixture
def client(app):
    return DifyClient(make_key(app))


def listing(client, **params):
    return client.get("/v1/conversations", {"user": "alice", **params})


def test_list_shape(app, client):
    session = make_session(app, name="Disk check", inputs={"host": "db1"}, at=seconds(5))
    at = int(seconds(5).timestamp())
    response = listing(client)
    assert response.status_code == 200
    data = response.json()
    assert set(data) == {"limit", "has_more", "data"}
    [item] = data["data"]
    assert set(item) == CONVERSATION_KEYS
    assert item == {
        "id": str(session.id), "name": "Disk check", "inputs": {"host": "db1"}, "status": "normal",
        "introduction": "Welcome!", "created_at": at, "updated_at": at,
    }


def test_unnamed_conversation_is_new_conversation(app, client):
    make_session(app)
    assert listing(client).json()["data"][0]["name"] == "New conversation"


def test_only_this_users_live_api_conversations(app, client):
    mine = make_session(app)
    make_session(app, user="bob")
    make_session(app, source=Session.Source.CONSOLE)
    make_session(app, is_deleted=True)
    make_session(make_app(), user="alice")
    assert [c["id"] for c in listing(client).json()["data"]] == [str(mine.id)]


def test_default_sort_is_most_recently_updated_and_last_id_pages(app, client):
    sessions = [make_session(app, at=seconds(i)) for i in range(5)]
    page = listing(client, limit=2).json()
    assert [c["id"] for c in page["data"]] == [str(sessions[4].id), str(sessions[3].id)]
    assert page["has_more"] is True and page["limit"] == 2
    page = listing(client, limit=2, last_id=page["data"][-1]["id"]).json()
    assert [c["id"] for c in page["data"]] == [str(sessions[2].id), str(sessions[1].id)]
    assert page["has_more"] is True
    page = listing(client, limit=2, last_id=page["data"][-1]["id"]).json()
    assert [c["id"] for c in page["data"]] == [str(sessions[0].id)]
    assert page["has_more"] is False


def test_exactly_full_last_page_has_no_more(app, client):
    for i in range(2):
        make_session(app, at=seconds(i))
    assert listing(client, limit=2).json()["has_more"] is False


@pytest.mark.parametrize("sort_by", ["created_at", "-created_at", "updated_at", "-updated_at"])
def test_sort_by(app, client, sort_by):
    a = make_session(app, at=seconds(1))
    b = make_session(app, at=seconds(2))
    Session.objects.filter(pk=a.pk).update(updated_at=seconds(3))  # a was continued after b was created
    ids = [c["id"] for c in listing(client, sort_by=sort_by).json()["data"]]
    expected = {"created_at": [a, b], "-created_at": [b, a], "updated_at": [b, a], "-updated_at": [a, b]}[sort_by]
    assert ids == [str(s.id) for s in expected]
    page = listing(client, sort_by=sort_by, limit=1, last_id=ids[0]).json()
    assert [c["id"] for c in page["data"]] == [ids[1]]


def test_list_validation(client, app):
    other = make_session(app, user="bob")
    assert_error(listing(client, limit=0), 400, "invalid_param")
    assert_error(listing(client, limit=101), 400, "invalid_param")
    assert_error(listing(client, sort_by="name"), 400, "invalid_param")
    assert_error(listing(client, last_id="x"), 400, "invalid_param", "last_id must be a valid UUID")
    assert_error(listing(client, last_id=str(uuid.uuid4())), 404, "not_found", "Last Conversation Not Exists.")
    assert_error(listing(client, last_id=str(other.id)), 404, "not_found", "Last Conversation Not Exists.")
    assert listing(client, pinned="true").status_code == 200  # unknown keys (the SDK's `pinned`) are ignored


def test_get_is_the_same_object_as_the_list_item(app, client):
    session = make_session(app, name="Disk check", inputs={"host": "db1"}, at=seconds(5))
    make_message(session)
    response = client.get(f"/v1/conversations/{session.id}", {"user": "alice"})
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    item = assert_schema(response.json(), "ConversationListItem")
    assert set(item) == CONVERSATION_KEYS
    assert item == listing(client).json()["data"][0]


def test_get_is_scoped_like_the_list(app, client):
    """Another user's, another app's, a console or a deleted conversation is not found; without `user` it is
    the shared default user's, as in the list."""
    others = [make_session(app, user="bob"), make_session(app, source=Session.Source.CONSOLE),
              make_session(app, is_deleted=True), make_session(make_app(), user="alice"),
              make_session(app, user="DEFAULT-USER")]
    for session in others[:4]:
        assert_error(client.get(f"/v1/conversations/{session.id}", {"user": "alice"}), 404, "not_found",
                     "Conversation Not Exists.")
    assert_error(client.get(f"/v1/conversations/{uuid.uuid4()}", {"user": "alice"}), 404, "not_found",
                 "Conversation Not Exists.")
    assert client.get(f"/v1/conversations/{others[-1].id}").json()["id"] == str(others[-1].id)
    assert_error(client.get(f"/v1/conversations/{others[0].id}"), 404, "not_found")


def test_get_needs_the_app_key(app):
    session = make_session(app)
    assert_error(DifyClient(None).get(f"/v1/conversations/{session.id}", {"user": "alice"}), 401, "unauthorized")
    assert_error(DifyClient(make_key(make_app())).get(f"/v1/conversations/{session.id}", {"user": "alice"}), 404,
                 "not_found", "Conversation Not Exists.")


def test_other_methods_are_405_in_difys_envelope(app, client):
    session = make_session(app)
    for method in ("post", "put", "patch"):
        response = getattr(client.client, method)(f"/v1/conversations/{session.id}", "{}",
                                                  content_type="application/json", headers=client.headers)
        assert_error(response, 405, "method_not_allowed")
        assert response["Allow"] == "DELETE, GET, HEAD"
    session.refresh_from_db()
    assert not session.is_deleted


def test_delete_is_204_with_empty_body_and_soft(app, client):
    session = make_session(app)
    response = client.delete(f"/v1/conversations/{session.id}", {"user": "alice"})
    assert response.status_code == 204 and response.content == b""
    session.refresh_from_db()
    assert session.is_deleted and session.deleted_at is not None
    assert listing(client).json()["data"] == []
    assert_error(client.delete(f"/v1/conversations/{session.id}", {"user": "alice"}), 404, "not_found",
                 "Conversation Not Exists.")


def test_delete_of_another_users_conversation_is_404(app, client):
    session = make_session(app, user="bob")
    assert_error(client.delete(f"/v1/conversations/{session.id}", {"user": "alice"}), 404, "not_found",
                 "Conversation Not Exists.")
    session.refresh_from_db()
    assert not session.is_deleted


def test_delete_needs_a_json_body(app, client):
    session = make_session(app)
    response = client.client.delete(f"/v1/conversations/{session.id}", headers=client.headers)
    assert_error(response, 415, "unsupported_media_type")


def test_rename(app, client):
    session = make_session(app, at=seconds(0))
    response = client.post(f"/v1/conversations/{session.id}/name", {"name": "Nightly backups", "user": "alice"})
    assert response.status_code == 200
    data = response.json()
    assert set(data) == CONVERSATION_KEYS
    assert data["name"] == "Nightly backups" and data["updated_at"] > data["created_at"]
    session.refresh_from_db()
    assert session.name == "Nightly backups"


def test_rename_validation(app, client):
    session = make_session(app)
    url = f"/v1/conversations/{session.id}/name"
    assert_error(client.post(url, {"name": "  ", "user": "alice"}), 400, "invalid_param",
                 "name is required when auto_generate is false")
    assert_error(client.post(url, {"name": 5, "user": "alice"}), 400, "invalid_param", "name must be a string")
    assert_error(client.post(url, {"name": "x", "user": "bob"}), 404, "not_found", "Conversation Not Exists.")
    assert_error(client.post(f"/v1/conversations/{uuid.uuid4()}/name", {"name": "x", "user": "alice"}), 404,
                 "not_found")


def test_auto_generate_uses_the_conversations_model_on_the_first_query(app, client, make_llm_config, fake_upstream):
    config = make_llm_config(name="namer", model_name="fake-namer")
    app.llm_config = config
    app.save()
    session = make_session(app)
    make_message(session, query="Why is disk usage on db1 growing every night?", at=seconds(1))
    make_message(session, query="second question", at=seconds(2))
    fake_upstream.script(Reply(text='"Nightly disk growth on db1"'))
    response = client.post(f"/v1/conversations/{session.id}/name", {"auto_generate": True, "user": "alice"})
    assert response.status_code == 200, response.content
    assert response.json()["name"] == "Nightly disk growth on db1"
    request = fake_upstream.chat_requests[-1]
    assert request.body["model"] == "fake-namer"
    assert request.messages[-1]["content"] == "Why is disk usage on db1 growing every night?"
    assert request.api_key == config.api_key


def test_auto_generate_falls_back_to_the_query_when_the_model_fails(app, client, default_llm_config, fake_upstream):
    session = make_session(app)
    query = "Please explain why the nightly backup job of the billing database takes four hours now"
    make_message(session, query=query)
    fake_upstream.script(Reply(status=500, error_message="boom {api_key}"))
    response = client.post(f"/v1/conversations/{session.id}/name", {"auto_generate": True, "user": "alice"})
    assert response.status_code == 200
    assert response.json()["name"] == query[:47] + "..."


def test_auto_generate_without_messages_is_invalid_param_with_empty_message(app, client, default_llm_config):
    session = make_session(app)
    response = client.post(f"/v1/conversations/{session.id}/name", {"auto_generate": True, "user": "alice"})
    assert_error(response, 400, "invalid_param", "")


def test_variables_are_always_empty(app, client):
    session = make_session(app)
    url = f"/v1/conversations/{session.id}/variables"
    response = client.get(url, {"user": "alice"})
    assert response.status_code == 200
    assert response.json() == {"limit": 20, "has_more": False, "data": []}
    assert client.get(url, {"user": "alice", "limit": 5}).json()["limit"] == 5
    assert_error(client.get(url, {"user": "alice", "limit": 0}), 400, "invalid_param")
    assert_error(client.get(url, {"user": "alice", "last_id": str(uuid.uuid4())}), 400, "invalid_param", "")
    assert_error(client.get(url, {"user": "alice", "last_id": "x"}), 400, "invalid_param")
    assert_error(client.get(url, {"user": "alice", "variable_name": "bad name!"}), 400, "invalid_param")
    assert_error(client.get(url, {"user": "bob"}), 404, "not_found", "Conversation Not Exists.")


def test_updating_a_variable_is_404_as_no_conversation_has_variables(app, client):
    """Dify's order: the body's `value`, the conversation (scoped by `user`), then the variable."""
    session = make_session(app)
    url = f"/v1/conversations/{session.id}/variables/{uuid.uuid4()}"
    for value in ("new value", None, 3, {"a": 1}):
        assert_error(client.put(url, {"value": value, "user": "alice"}), 404, "not_found",
                     "Conversation Variable Not Exists.")
    assert_error(client.put(url, {"user": "alice"}), 400, "invalid_param", "value is required")
    assert_error(client.put(url, {"value": "x", "user": "bob"}), 404, "not_found", "Conversation Not Exists.")
    assert_error(client.put(f"/v1/conversations/{uuid.uuid4()}/variables/{uuid.uuid4()}",
                            {"value": "x", "user": "alice"}), 404, "not_found", "Conversation Not Exists.")
    response = client.client.put(url, "x", content_type="text/plain", headers=client.headers)
    assert_error(response, 415, "unsupported_media_type")
    assert_error(client.post(url, {"value": "x", "user": "alice"}), 405, "method_not_allowed")
