"""POST /v1/chat-messages streaming: exact SSE framing, event sequences and key sets, faults after the stream started,
pings, and files given to the model."""
from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async
from channels.routing import get_default_application
from django.conf import settings
from django.core.files.base import ContentFile
from django.test import override_settings

from agentcore.models import AgentApp, Message
from difyapi.models import MessageFile, UploadFile
from difyapi.services import end_user_get_or_create
from difyapi.tests.factories import make_app_with_key, shared_cache_trips
from tests.e2e.dify_servers import AsgiCall, data_events, dify_headers, parse_sse
from tests.fakes.upstream import Reply, ToolCall

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_worker_connections")]


COMMON = ["event", "conversation_id", "message_id", "created_at", "task_id"]
MESSAGE_KEYS = {*COMMON, "id", "answer", "from_variable_selector"}
AGENT_MESSAGE_KEYS = {*COMMON, "id", "answer"}
THOUGHT_KEYS = {*COMMON, "id", "position", "thought", "observation", "tool", "tool_labels", "tool_input",
                "message_files"}
END_KEYS = {*COMMON, "id", "metadata", "files"}
ERROR_EVENT_KEYS = {"event", "conversation_id", "message_id", "created_at", "status", "code", "message"}
USAGE_KEYS = {
    "prompt_tokens", "prompt_unit_price", "prompt_price_unit", "prompt_price", "completion_tokens",
    "completion_unit_price", "completion_price_unit", "completion_price", "total_tokens", "total_price", "currency",
    "latency", "time_to_first_token", "time_to_generate",
}


UPLOADS_ON = {"enabled": True}


@pytest.fixture
def agent_app(default_llm_config):
    return make_app_with_key(name="stream-agent", mode="agent-chat", enabled_tools=["current_time"])


def body(**fields):
    return {"inputs": {}, "query": "hello", "user": "alice", "response_mode": "streaming", "auto_generate_name": False,
            **fields}


async def stream(key: str, payload: dict) -> tuple[AsgiCall, bytes]:
    application = get_default_application()

    async with AsgiCall(application, path="/v1/chat-messages", headers=dify_headers(key),
                        body=json.dumps(payload).encode()) as call:
        raw = await call.read(30)
    return call, raw


def assert_common(events: list[dict]) -> None:
    first = events[0]
    for event in events:
        if event["event"] == "error":
            assert list(event)[:4] == COMMON[:4]
        else:
            assert list(event)[:5] == COMMON, list(event)
            assert event["task_id"] == first["task_id"]
        assert (event["conversation_id"], event["message_id"], event["created_at"]) == (
            first["conversation_id"], first["message_id"], first["created_at"])
        assert isinstance(event["created_at"], int)


async def test_chat_stream_framing_and_sequence(chat_app, fake_upstream):
    _, key = chat_app
    fake_upstream.script(Reply(text="Grüße aus dem Rechenzentrum, 你好", prompt_tokens=9, completion_tokens=5))
    call, raw = await stream(key, body())
    assert call.status == 200
    assert call.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert call.headers["cache-control"] == "no-cache"
    assert call.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in call.headers
    assert "Grüße".encode() in raw and "你好".encode() in raw  # raw UTF-8, no \\u escapes
    assert b"[DONE]" not in raw and b": " not in raw.replace(b"data: ", b"").replace(b"event: ping", b"")
    events = data_events(raw)  # the whole body in one read: several events per chunk parse fine
    assert [e["event"] for e in events] == ["message"] * (len(events) - 1) + ["message_end"]
    assert_common(events)
    for event in events[:-1]:
        assert set(event) == MESSAGE_KEYS and event["from_variable_selector"] is None
        assert event["id"] == event["message_id"]
    assert "".join(e["answer"] for e in events[:-1]) == "Grüße aus dem Rechenzentrum, 你好"
    end = events[-1]
    assert set(end) == END_KEYS and end["files"] is None
    assert set(end["metadata"]) == {"usage", "retriever_resources", "annotation_reply"}
    usage = end["metadata"]["usage"]
    assert set(usage) == USAGE_KEYS
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (9, 5)
    assert all(isinstance(usage[k], str) for k in ("prompt_price", "completion_price", "total_price"))
    message = await Message.objects.aget(pk=end["message_id"])
    assert message.status == "normal" and message.answer == "Grüße aus dem Rechenzentrum, 你好"
    assert str(message.task_id) == end["task_id"]


async def test_each_upstream_chunk_is_sent_as_it_arrives(chat_app, fake_upstream):
    application = get_default_application()

    _, key = chat_app
    fake_upstream.script(Reply(text="one two three", delay=0.3))
    async with AsgiCall(application, path="/v1/chat-messages", headers=dify_headers(key),
                        body=json.dumps(body()).encode()) as call:
        await call.start()
        first = parse_sse(await call.chunk(5))
        assert first[0]["event"] == "message" and first[0]["answer"] == "one "
        assert not call.finished
        rest = await call.read()
    assert [e["event"] for e in data_events(rest)][-1] == "message_end"


async def test_agent_chat_stream_with_a_tool_call(agent_app, fake_upstream):
    _, key = agent_app
    fake_upstream.script(
        Reply(text="Let me check.", tool_calls=[ToolCall("current_time", {"timezone": "UTC"})]),
        Reply(text="It is daytime in UTC."),
    )
    call, raw = await stream(key, body(query="what time is it?"))
    assert call.status == 200
    events = data_events(raw)
    assert_common(events)
    names = [e["event"] for e in events]
    assert names[-1] == "message_end"
    assert set(names) <= {"agent_thought", "agent_message", "message_end"}
    assert names[0] == "agent_thought"
    for event in events:
        expected = {"agent_thought": THOUGHT_KEYS, "agent_message": AGENT_MESSAGE_KEYS, "message_end": END_KEYS}
        assert set(event) == expected[event["event"]], event
    thoughts: dict[str, dict] = {}
    for event in events:
        if event["event"] == "agent_thought":
            thoughts[event["id"]] = event  # upsert by id, as Dify clients do
    final = sorted(thoughts.values(), key=lambda t: t["position"])
    assert [t["position"] for t in final] == [1, 2]
    tool_thought = final[0]
    assert tool_thought["tool"] == "current_time"
    assert json.loads(tool_thought["tool_input"]) == {"current_time": {"timezone": "UTC"}}
    observation = json.loads(tool_thought["observation"])
    assert set(observation) == {"current_time"} and observation["current_time"]
    assert tool_thought["tool_labels"]["current_time"]
    assert final[1]["tool"] == "" and final[1]["thought"] == "It is daytime in UTC."
    answer = "".join(e["answer"] for e in events if e["event"] == "agent_message")
    assert answer == "Let me check.It is daytime in UTC."
    message = await Message.objects.aget(pk=events[0]["message_id"])
    assert message.status == "normal" and message.answer == "Let me check.\nIt is daytime in UTC."
    # The tool result went back to the model.
    assert any(m.get("role") == "tool" for m in fake_upstream.chat_requests[-1].messages)


@pytest.mark.parametrize(
    ("reply", "category", "text"),
    [
        (Reply(status=401, error_message="Incorrect API key provided: {api_key}"), "auth",
         "Incorrect API key provided"),
        (Reply(status=429, error_message="Rate limit reached for requests"), "rate_limit",
         "Rate limit reached for requests"),
        (Reply(status=500, error_message="upstream exploded"), "upstream_error", "upstream exploded"),
    ],
)
async def test_upstream_failure_after_the_stream_started_is_one_error_event(chat_app, default_llm_config,
                                                                             fake_upstream, reply, category, text):
    _, key = chat_app
    fake_upstream.script(reply)
    call, raw = await stream(key, body())
    assert call.status == 200
    events = data_events(raw)
    assert [e["event"] for e in events] == ["error"]
    error = events[0]
    assert set(error) == ERROR_EVENT_KEYS
    assert (error["status"], error["code"]) == (400, "completion_request_error")
    assert default_llm_config.api_key not in raw.decode()
    message = await Message.objects.aget(pk=error["message_id"])
    assert (message.status, message.error_category) == ("error", category)
    assert text in message.error and text in error["message"]


async def test_cut_stream_saves_the_partial_answer_as_error(chat_app, fake_upstream):
    _, key = chat_app
    fake_upstream.script(Reply(text="alpha beta gamma delta epsilon", cut_after=2))
    call, raw = await stream(key, body())
    events = data_events(raw)
    # The two chunks sent before the cut go out as one or two message events, by the network's timing.
    assert {e["event"] for e in events[:-1]} == {"message"} and events[-1]["event"] == "error"
    assert "".join(e["answer"] for e in events[:-1]) == "alpha beta "
    assert_common(events)
    assert events[-1]["code"] == "completion_request_error"
    message = await Message.objects.aget(pk=events[0]["message_id"])
    assert message.status == "error" and message.answer == "alpha beta "


async def test_upstream_timeout_is_an_error_event(chat_app, fake_upstream):
    _, key = chat_app
    fake_upstream.script(Reply(text="too late", hang=3))
    with override_settings(LLM_REQUEST_TIMEOUT=0.5):
        call, raw = await stream(key, body())
    events = data_events(raw)
    assert [e["event"] for e in events] == ["error"]
    assert events[0]["code"] == "completion_request_error"
    assert (await Message.objects.aget(pk=events[0]["message_id"])).status == "error"


async def test_pings_while_the_run_lasts(chat_app, fake_upstream):
    _, key = chat_app
    fake_upstream.script(Reply(text="a b c d", delay=0.25))
    with override_settings(DIFY_PING_INTERVAL=0.1):
        call, raw = await stream(key, body())
    parsed = parse_sse(raw)
    assert parsed.count("ping") >= 3
    assert b"event: ping\n\n" in raw
    names = [e if e == "ping" else e["event"] for e in parsed]
    assert names[-1] == "message_end"


async def test_short_answers_have_no_ping(chat_app, fake_upstream):
    _, key = chat_app
    call, raw = await stream(key, body())
    assert "ping" not in parse_sse(raw)


def make_upload(app: AgentApp, user: str, name: str, data: bytes, mime: str) -> UploadFile:
    end_user = end_user_get_or_create(app=app, user=user)
    upload = UploadFile(app=app, end_user=end_user, name=name, size=len(data), extension=name.rsplit(".", 1)[-1],
                        mime_type=mime)
    upload.file.save(name, ContentFile(data), save=False)
    upload.save()
    return upload


PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


async def test_an_image_reaches_a_vision_model_as_image_content(make_llm_config, fake_upstream):
    vision = await sync_to_async(make_llm_config)(name="vision", model_name="gpt-4o-mini", default=True)
    app, key = await sync_to_async(make_app_with_key)(name="vision-app", mode="chat", file_upload=UPLOADS_ON)
    upload = await sync_to_async(make_upload)(app, "alice", "dot.png", PNG, "image/png")
    files = [
        {"type": "image", "transfer_method": "local_file", "upload_file_id": str(upload.pk)},
        {"type": "image", "transfer_method": "remote_url", "url": "https://example.com/cat.jpg"},
    ]
    call, raw = await stream(key, body(query="what is this?", files=files))
    events = data_events(raw)
    assert events[-1]["event"] == "message_end", events
    content = fake_upstream.chat_requests[-1].messages[-1]["content"]
    assert isinstance(content, list)
    image_urls = [part["image_url"]["url"] for part in content if part.get("type") == "image_url"]
    assert image_urls[0].startswith("data:image/png;base64,")
    assert image_urls[1] == "https://example.com/cat.jpg"
    assert any(part.get("type") == "text" and "what is this?" in part["text"] for part in content)
    assert fake_upstream.chat_requests[-1].body["model"] == vision.model_name
    rows = [f async for f in MessageFile.objects.filter(message_id=events[0]["message_id"]).order_by("created_at")]
    assert {(r.transfer_method, r.upload_file_id) for r in rows} == {("local_file", upload.pk), ("remote_url", None)}


async def test_a_text_document_reaches_the_model_as_text(chat_app, fake_upstream):
    app, key = chat_app
    upload = await sync_to_async(make_upload)(app, "alice", "notes.txt", b"disk /var is 93% full", "text/plain")
    files = [{"type": "document", "transfer_method": "local_file", "upload_file_id": str(upload.pk)}]
    call, raw = await stream(key, body(query="summarise the file", files=files))
    assert data_events(raw)[-1]["event"] == "message_end"
    sent = json.dumps(fake_upstream.chat_requests[-1].messages)
    assert "disk /var is 93% full" in sent and "notes.txt" in sent
    assert await MessageFile.objects.filter(upload_file=upload).acount() == 1


@pytest.fixture
def documents():
    from agentcore.tests.test_remote_files import DocumentServer

    server = DocumentServer()
    yield server
    server.close()


async def test_a_text_document_given_by_url_is_fetched_for_the_model(chat_app, fake_upstream, documents):
    app, key = chat_app
    app.network_allow_networks = ["127.0.0.1/32"]  # the test's document server is on loopback
    await app.asave()
    url = f"{documents.url}/notes.md"
    files = [{"type": "document", "transfer_method": "remote_url", "url": url}]
    call, raw = await stream(key, body(query="summarise the file", files=files))
    events = data_events(raw)
    assert events[-1]["event"] == "message_end"
    sent = json.dumps(fake_upstream.chat_requests[-1].messages)
    assert "/var is 93% full" in sent and "notes.md" in sent
    assert documents.requests == ["/notes.md"]
    row = await MessageFile.objects.aget(message_id=events[0]["message_id"])
    assert (row.transfer_method, row.url) == ("remote_url", url)


async def test_a_document_url_on_a_private_address_is_not_fetched(chat_app, fake_upstream, documents):
    app, key = chat_app
    files = [{"type": "document", "transfer_method": "remote_url", "url": f"{documents.url}/notes.md"}]
    call, raw = await stream(key, body(query="summarise the file", files=files))
    assert data_events(raw)[-1]["event"] == "message_end"  # the answer goes on, told why the file is missing
    sent = json.dumps(fake_upstream.chat_requests[-1].messages)
    assert ("could not be fetched: refused: 127.0.0.1 resolves to 127.0.0.1, a private address this app's network "
            "allow-list does not open") in sent
    assert "/var is 93% full" not in sent
    assert documents.requests == []


async def test_an_image_for_a_model_without_vision_is_only_recorded(chat_app, fake_upstream):
    app, key = chat_app
    upload = await sync_to_async(make_upload)(app, "alice", "dot.png", PNG, "image/png")
    files = [{"type": "image", "transfer_method": "local_file", "upload_file_id": str(upload.pk)}]
    call, raw = await stream(key, body(files=files))
    assert data_events(raw)[-1]["event"] == "message_end"
    assert "image_url" not in json.dumps(fake_upstream.chat_requests[-1].messages)
    assert await MessageFile.objects.acount() == 1


async def test_another_users_upload_is_refused(chat_app, fake_upstream):
    from tests.e2e.dify_servers import dify_post

    app, key = chat_app
    upload = await sync_to_async(make_upload)(app, "bob", "notes.txt", b"secret", "text/plain")
    files = [{"type": "document", "transfer_method": "local_file", "upload_file_id": str(upload.pk)}]
    status, _, raw = await dify_post(key, "/v1/chat-messages", body(files=files))
    assert status == 400 and json.loads(raw)["code"] == "invalid_param"
    assert fake_upstream.chat_requests == []


async def test_files_are_ignored_when_the_app_disabled_uploads_and_limited_in_number(default_llm_config,
                                                                                     fake_upstream):
    from tests.e2e.dify_servers import dify_post

    _, off_key = await sync_to_async(make_app_with_key)(name="no-files", mode="chat", file_upload={"enabled": False})
    files = [{"type": "image", "transfer_method": "remote_url", "url": "https://example.com/a.png"}] * 2
    call, raw = await stream(off_key, body(files=files))
    assert data_events(raw)[-1]["event"] == "message_end"
    assert await MessageFile.objects.acount() == 0

    _, one_key = await sync_to_async(make_app_with_key)(name="one-file", mode="chat",
                                               file_upload={"enabled": True, "number_limits": 1})
    status, _, raw = await dify_post(one_key, "/v1/chat-messages", body(files=files))
    assert status == 400 and json.loads(raw)["code"] == "invalid_param"


async def test_an_app_that_never_configured_uploads_ignores_files_as_parameters_reports(default_llm_config,
                                                                                         fake_upstream):
    """/v1/parameters reports uploads off for such an app (Dify's default): chat-messages must not take files."""
    _, bare_key = await sync_to_async(make_app_with_key)(name="bare", mode="chat")
    files = [{"type": "image", "transfer_method": "remote_url", "url": "https://example.com/a.png"}] * 2
    call, raw = await stream(bare_key, body(files=files))
    assert data_events(raw)[-1]["event"] == "message_end"
    assert await MessageFile.objects.acount() == 0


async def test_the_default_file_limit_is_the_one_parameters_reports(default_llm_config, fake_upstream):
    from tests.e2e.dify_servers import dify_post

    _, key = await sync_to_async(make_app_with_key)(name="images-on", mode="chat",
                                                    file_upload={"image": {"enabled": True}})
    files = [{"type": "image", "transfer_method": "remote_url", "url": "https://example.com/a.png"}] * 4
    status, _, raw = await dify_post(key, "/v1/chat-messages", body(files=files))
    assert (status, json.loads(raw)["message"]) == (400, "Number of files exceeds the limit of 3.")


@pytest.mark.parametrize("mode", ["chat", "agent-chat"])
async def test_a_streamed_turn_reads_the_shared_cache_in_one_round_trip(default_llm_config, fake_upstream,
                                                                       monkeypatch, mode):
    """The key, its app, the config generation, the app's reply setting and (agent) the tool setup stamp: every
    turn reads them, and with Redis each read is a round trip that costs the server CPU. Once this process has seen
    the key, the first read brings them all."""
    _, key = await sync_to_async(make_app_with_key)(name=f"trips-{mode}", mode=mode, enabled_tools=["current_time"])
    fake_upstream.script(Reply(text="first"), Reply(text="first"), Reply(text="second"))
    for _ in range(2):  # the process learns the key's app; the cache entries (and the built-in tools' rows) are written
        call, raw = await stream(key, body())
        assert data_events(raw)[-1]["event"] == "message_end"
    trips = shared_cache_trips(monkeypatch)
    call, raw = await stream(key, body(query="again"))
    monkeypatch.undo()
    assert data_events(raw)[-1]["event"] == "message_end"
    assert "".join(e["answer"] for e in data_events(raw) if "answer" in e) == "second"
    operations = [trip for trip in trips if trip != "redis"]
    assert operations == ["get_many"]
    if "redis" in settings.CACHES["default"]["BACKEND"].lower():
        assert trips.count("redis") == 2  # those reads, and the turn's token counters when it ends
