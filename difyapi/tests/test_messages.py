"""GET /v1/messages (SPEC.md §5): item shape, newest page first with oldest -> newest inside it, first_id paging,
thoughts and files, the end user's own feedback, validation and scoping."""
from __future__ import annotations

import json
import uuid

import pytest

from agentcore.models import Message, Session
from difyapi.models import EndUser, Feedback, MessageFile, UploadFile
from difyapi.tests.factories import (
    DifyClient,
    assert_error,
    make_app,
    make_key,
    make_message,
    make_session,
    make_thought,
    seconds,
)

pytestmark = pytest.mark.django_db

MESSAGE_KEYS = {
    "id", "conversation_id", "parent_message_id", "inputs", "query", "answer", "message_files", "feedback",
    "retriever_resources", "agent_thoughts", "created_at", "status", "error",
}
THOUGHT_KEYS = {"id", "chain_id", "message_id", "position", "thought", "tool", "tool_labels", "tool_input",
                "created_at", "observation", "files"}
MESSAGE_FILE_KEYS = {"id", "filename", "type", "url", "mime_type", "size", "transfer_method", "belongs_to",
                     "upload_file_id"}


@pytest.fixture
def app():
    return make_app(mode="agent-chat")


@pytest.fixture
def client(app):
    return DifyClient(make_key(app))


def history(client, conversation, **params):
    return client.get("/v1/messages", {"user": "alice", "conversation_id": str(conversation.id), **params})


def test_item_shape_with_thoughts_files_and_own_feedback(app, client):
    session = make_session(app, inputs={"city": "SF"})
    message = make_message(session, query="disk?", answer="42% used", inputs={"city": "SF"})
    make_thought(message, position=1, thought="checking", tool="disk_usage", tool_input={"path": "/"},
                 observation="42%", files=["f-1"])
    MessageFile.objects.create(message=message, type="image", transfer_method="remote_url",
                               url="https://example.com/x/chart.png", belongs_to="user")
    Feedback.objects.create(app=app, session=session, message=message, rating="like", end_user=None)

    response = history(client, session)
    assert response.status_code == 200
    data = response.json()
    assert set(data) == {"limit", "has_more", "data"}
    assert data["limit"] == 20 and data["has_more"] is False
    [item] = data["data"]
    assert set(item) == MESSAGE_KEYS
    assert item["id"] == str(message.id) and item["conversation_id"] == str(session.id)
    assert item["query"] == "disk?" and item["answer"] == "42% used" and item["inputs"] == {"city": "SF"}
    assert isinstance(item["created_at"], int)
    assert item["status"] == "normal" and item["error"] is None
    assert item["feedback"] == {"rating": "like"}
    assert item["retriever_resources"] == []
    [thought] = item["agent_thoughts"]
    assert set(thought) == THOUGHT_KEYS
    assert thought["position"] == 1 and thought["tool"] == "disk_usage" and thought["files"] == ["f-1"]
    assert json.loads(thought["tool_input"]) == {"disk_usage": {"path": "/"}}
    assert json.loads(thought["observation"]) == {"disk_usage": "42%"}
    assert isinstance(thought["created_at"], int)
    [file] = item["message_files"]
    assert set(file) == MESSAGE_FILE_KEYS
    assert file["url"] == "https://example.com/x/chart.png" and file["filename"] == "chart.png"
    assert file["belongs_to"] == "user" and file["upload_file_id"] is None


def test_error_and_stopped_turns(app, client):
    session = make_session(app)
    make_message(session, query="a", answer="partial", status=Message.Status.ERROR, error="Incorrect API key",
                 at=seconds(1))
    make_message(session, query="b", answer="cut", status=Message.Status.STOPPED, at=seconds(2))
    items = history(client, session).json()["data"]
    assert [(i["status"], i["error"]) for i in items] == [("error", "Incorrect API key"), ("normal", None)]
    assert items[0]["answer"] == "partial"


def test_newest_page_first_oldest_to_newest_within_and_first_id_goes_back(app, client):
    session = make_session(app)
    messages = [make_message(session, query=f"q{i}", at=seconds(i)) for i in range(5)]

    page = history(client, session, limit=2).json()
    assert [m["query"] for m in page["data"]] == ["q3", "q4"]
    assert page["has_more"] is True and page["limit"] == 2

    page = history(client, session, limit=2, first_id=page["data"][0]["id"]).json()
    assert [m["query"] for m in page["data"]] == ["q1", "q2"]
    assert page["has_more"] is True

    page = history(client, session, limit=2, first_id=page["data"][0]["id"]).json()
    assert [m["query"] for m in page["data"]] == ["q0"]
    assert page["has_more"] is False
    assert page["data"][0]["id"] == str(messages[0].id)


def test_a_page_that_holds_exactly_the_remaining_messages_has_no_more(app, client):
    session = make_session(app)
    for i in range(4):
        make_message(session, query=f"q{i}", at=seconds(i))
    page = history(client, session, limit=2).json()
    page = history(client, session, limit=2, first_id=page["data"][0]["id"]).json()
    assert [m["query"] for m in page["data"]] == ["q0", "q1"]
    assert page["has_more"] is False


def test_messages_with_equal_timestamps_page_without_loss(app, client):
    session = make_session(app)
    for i in range(4):
        make_message(session, query=f"q{i}", at=seconds(10))
    seen, first_id = [], None
    while True:
        params = {"limit": 1, **({"first_id": first_id} if first_id else {})}
        page = history(client, session, **params).json()
        seen += [m["query"] for m in page["data"]]
        if not page["has_more"]:
            break
        first_id = page["data"][0]["id"]
    assert sorted(seen) == ["q0", "q1", "q2", "q3"]


def test_another_users_feedback_is_not_shown(app, client):
    session = make_session(app)
    message = make_message(session)
    Feedback.objects.create(app=app, session=session, message=message, rating="dislike",
                            from_source=Feedback.FromSource.ADMIN)
    assert history(client, session).json()["data"][0]["feedback"] is None


def test_validation_errors(app, client):
    session = make_session(app)
    assert_error(client.get("/v1/messages", {"user": "alice"}), 400, "invalid_param")
    assert_error(history(client, session, limit=0), 400, "invalid_param")
    assert_error(history(client, session, limit=101), 400, "invalid_param")
    assert_error(history(client, session, limit="ten"), 400, "invalid_param")
    assert_error(history(client, session, first_id="nope"), 400, "invalid_param", "first_id must be a valid UUID")
    response = client.get("/v1/messages", {"user": "alice", "conversation_id": "nope"})
    assert_error(response, 400, "invalid_param", "conversation_id must be a valid UUID")
    assert_error(history(client, session, first_id=str(uuid.uuid4())), 404, "not_found", "First Message Not Exists.")


def test_empty_conversation_id_lists_nothing(client):
    response = client.get("/v1/messages", {"user": "alice", "conversation_id": ""})
    assert response.json() == {"limit": 20, "has_more": False, "data": []}


def test_first_id_from_another_conversation_is_404(app, client):
    session = make_session(app)
    other = make_message(make_session(app))
    assert_error(history(client, session, first_id=str(other.id)), 404, "not_found", "First Message Not Exists.")


@pytest.mark.parametrize("case", ["other_user", "other_app", "console", "deleted"])
def test_conversations_outside_the_end_users_scope_are_404(app, client, case):
    session = {
        "other_user": lambda: make_session(app, user="bob"),
        "other_app": lambda: make_session(make_app(), user="alice"),
        "console": lambda: make_session(app, source=Session.Source.CONSOLE),
        "deleted": lambda: make_session(app, is_deleted=True),
    }[case]()
    make_message(session)
    assert_error(history(client, session), 404, "not_found", "Conversation Not Exists.")


def test_unknown_conversation_is_404(client):
    response = client.get("/v1/messages", {"user": "alice", "conversation_id": str(uuid.uuid4())})
    assert_error(response, 404, "not_found", "Conversation Not Exists.")


def test_query_count_does_not_grow_with_messages(app, client, django_assert_max_num_queries):
    session = make_session(app)
    end_user = EndUser.objects.create(app=app, session_id="alice")
    for i in range(10):
        message = make_message(session, at=seconds(i))
        make_thought(message, tool="t", observation="o")
        MessageFile.objects.create(message=message, transfer_method="remote_url", url="https://e.x/a.png")
        upload = UploadFile.objects.create(app=app, end_user=end_user, name=f"f{i}.png", size=1, extension="png",
                                           mime_type="image/png", file=f"uploads/f{i}.png")
        MessageFile.objects.create(message=message, transfer_method="local_file", upload_file=upload)
    with django_assert_max_num_queries(10):
        items = history(client, session).json()["data"]
    assert len(items) == 10
    assert sorted(f["filename"] for f in items[9]["message_files"]) == ["a.png", "f9.png"]
