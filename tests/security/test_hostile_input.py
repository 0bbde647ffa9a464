"""Issue 15 item 9: hostile bodies, query strings and WebSocket frames against a real daphne never get a 5xx (or a
1011 close); every /v1 refusal is in Dify's envelope. Each endpoint of difyapi/urls.py and difyapi/routing.py gets
every hostile body or query: JSON nested 100,000 deep, NUL bytes, lone surrogates (\\ud800 escapes), huge and
non-finite numbers, wrong types, non-object JSON, bytes that are not UTF-8, an empty body."""
from __future__ import annotations

import asyncio
import json
import socket
import uuid

import httpx
import pytest
import websockets
from rest_framework.authtoken.models import Token

from agentcore.models import AgentApp, Message, Session
from difyapi.auth import api_key_create
from difyapi.models import EndUser, UploadFile

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

USER = "hostile-user"
DEPTH = 100_000
DEEP_ARRAY = b"[" * DEPTH + b"]" * DEPTH
DEEP_OBJECT = b'{"a":' * DEPTH + b"1" + b"}" * DEPTH
HUGE_INT = "9" * 5000  # beyond Python's default int parsing limit
BIGINT_PLUS = str(2**63)


def hostile_values() -> dict[str, bytes]:
    """JSON texts (as the client writes them) to put in place of one field's value."""
    return {
        "nul": b'"a\\u0000b"',
        "only-nul": b'"\\u0000"',
        "surrogate": b'"x\\ud800y"',
        "low-surrogate": b'"\\udfff"',
        "huge-int": HUGE_INT.encode(),
        "bigint": BIGINT_PLUS.encode(),
        "negative-bigint": b"-" + BIGINT_PLUS.encode(),
        "inf": b"1e999",
        "nan": b"NaN",
        "list": b'[1, "two", null]',
        "object": b'{"nested": {"x": "\\u0000"}}',
        "number": b"3.5",
        "bool": b"true",
        "null": b"null",
        "deep": DEEP_ARRAY,
    }


def whole_bodies() -> dict[str, bytes]:
    """Bodies that are hostile as a whole."""
    return {
        "deep-array": DEEP_ARRAY,
        "deep-object": DEEP_OBJECT,
        "empty": b"",
        "blank": b"   ",
        "array": b"[1, 2]",
        "string": b'"user"',
        "number": b"42",
        "null": b"null",
        "not-utf8": b'{"user": "\xff\xfe\xfa", "query": "\xc3\x28"}',
        "cesu-surrogate-bytes": b'{"user": "\xed\xa0\x80"}',
        "nul-key": b'{"us\\u0000er": "a", "user": "a", "inputs": {"k\\u0000": 1}, "query": "q"}',
        "surrogate-key": b'{"\\ud800": 1, "user": "a", "inputs": {"\\udc00": "x"}, "query": "q"}',
        "truncated": b'{"user": "a", "query": ',
        "huge-int-body": HUGE_INT.encode(),
    }


def body_with(base: dict, field: str, value: bytes) -> bytes:
    """`base` as JSON with `field` set to the raw JSON text `value` (which json.dumps could not write)."""
    placeholder = f"__{uuid.uuid4().hex}__"
    text = json.dumps({**base, field: placeholder}).encode()
    return text.replace(f'"{placeholder}"'.encode(), value)


@pytest.fixture
def v1_setup(default_llm_config, fake_upstream):
    app = AgentApp.objects.create(name="hostile", mode=AgentApp.Mode.CHAT)
    _, key = api_key_create(app=app)
    session = Session.objects.create(app=app, end_user=USER, source=Session.Source.API, name="target")
    message = Message.objects.create(session=session, query="hello", answer="hi", status=Message.Status.NORMAL)
    end_user = EndUser.objects.create(app=app, session_id=USER)
    upload = UploadFile.objects.create(app=app, end_user=end_user, name="a.txt", size=1, extension="txt",
                                       mime_type="text/plain", file="uploads/none.txt")
    return {"key": key, "session": session, "message": message, "upload": upload}


def json_endpoints(setup) -> list[tuple[str, str, dict]]:
    """(method, path, a valid body) of every /v1 endpoint that reads a JSON body."""
    conversation, message = setup["session"].pk, setup["message"].pk
    chat = {"user": USER, "query": "hi", "inputs": {"k": "v"}, "response_mode": "blocking", "conversation_id": "",
            "files": [], "auto_generate_name": False, "model": None, "temperature": None}
    return [
        ("POST", "/v1/chat-messages", chat),
        ("POST", f"/v1/chat-messages/{uuid.uuid4()}/stop", {"user": USER}),
        ("POST", "/v1/chat-messages/not-a-task/stop", {"user": USER}),
        ("POST", f"/v1/messages/{message}/feedbacks", {"user": USER, "rating": "like", "content": "ok"}),
        ("POST", f"/v1/conversations/{conversation}/name", {"user": USER, "name": "n", "auto_generate": False}),
        ("DELETE", f"/v1/conversations/{uuid.uuid4()}", {"user": USER}),
        ("PUT", f"/v1/conversations/{conversation}/variables/{uuid.uuid4()}", {"user": USER, "value": "v"}),
        ("POST", "/v1/completion-messages", {k: v for k, v in chat.items() if k != "conversation_id"}),
        ("POST", f"/v1/completion-messages/{uuid.uuid4()}/stop", {"user": USER}),
        ("POST", "/v1/text-to-audio", {"user": USER, "text": "hi", "message_id": str(message)}),
        ("POST", "/v1/audio-to-text", {"user": USER}),
        ("POST", "/v1/files/upload", {"user": USER}),
    ]


def query_endpoints(setup) -> list[tuple[str, dict]]:
    """(path, valid query) of every /v1 endpoint that reads the query string."""
    conversation, message, upload = setup["session"].pk, setup["message"].pk, setup["upload"].pk
    return [
        ("/v1/", {}),
        ("/v1/info", {}),
        ("/v1/parameters", {}),
        ("/v1/meta", {}),
        ("/v1/site", {}),
        ("/v1/models", {}),
        ("/v1/messages", {"user": USER, "conversation_id": str(conversation), "first_id": str(message),
                          "limit": "20"}),
        (f"/v1/messages/{message}/suggested", {"user": USER}),
        ("/v1/app/feedbacks", {"page": "1", "limit": "20"}),
        ("/v1/conversations", {"user": USER, "last_id": str(conversation), "limit": "20", "sort_by": "-updated_at"}),
        (f"/v1/conversations/{conversation}", {"user": USER}),
        (f"/v1/end-users/{uuid.uuid4()}", {"user": USER}),
        (f"/v1/conversations/{conversation}/variables", {"user": USER, "limit": "20", "variable_name": "x",
                                                          "last_id": str(uuid.uuid4())}),
        (f"/v1/files/{upload}/preview", {"as_attachment": "true"}),
        (f"/v1/files/{upload}/file-preview", {"timestamp": "1", "nonce": "n", "sign": "s", "as_attachment": "1"}),
        ("/v1/no-such-endpoint", {"user": USER}),
    ]


HOSTILE_QUERY_VALUES = {
    "nul": "a%00b",
    "only-nul": "%00",
    "surrogate-bytes": "%ED%A0%80",
    "not-utf8": "%FF%FE",
    "huge-int": HUGE_INT,
    "bigint": BIGINT_PLUS,
    "negative": "-1",
    "float": "1e400",
    "nan": "nan",
    "list": "[1]",
    "empty": "",
    "not-a-uuid": "not-a-uuid",
}


def assert_dify_refusal(response: httpx.Response, label: str) -> None:
    assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        data = response.json()
        assert set(data) == {"code", "message", "status"}, f"{label}: {data}"
        assert data["status"] == response.status_code and isinstance(data["code"], str), f"{label}: {data}"


def test_hostile_json_bodies_on_every_v1_endpoint(daphne_server, v1_setup):
    headers = {"Authorization": f"Bearer {v1_setup['key']}", "Content-Type": "application/json"}
    sent = 0
    with httpx.Client(base_url=daphne_server.base_url, headers=headers, timeout=30) as client:
        for method, path, base in json_endpoints(v1_setup):
            cases = {f"body {name}": raw for name, raw in whole_bodies().items()}
            for field in base:
                for name, value in hostile_values().items():
                    cases[f"{field}={name}"] = body_with(base, field, value)
            for label, raw in cases.items():
                response = client.request(method, path, content=raw)
                assert_dify_refusal(response, f"{method} {path} {label}")
                sent += 1
    assert sent > 400
    assert "Traceback" not in daphne_server.log()


def test_hostile_query_strings_and_paths_on_every_v1_endpoint(daphne_server, v1_setup):
    headers = {"Authorization": f"Bearer {v1_setup['key']}"}
    with httpx.Client(base_url=daphne_server.base_url, headers=headers, timeout=30) as client:
        for path, base in query_endpoints(v1_setup):
            fields = [*base, "user", "limit"]
            for field in fields:
                for name, value in HOSTILE_QUERY_VALUES.items():
                    query = "&".join(f"{k}={v}" for k, v in {**base, field: value}.items())
                    response = client.get(f"{path}?{query}")
                    assert_dify_refusal(response, f"GET {path} {field}={name}")
            response = client.get(f"{path}?a%00b=1&user%00=2")
            assert_dify_refusal(response, f"GET {path} NUL in a query key")
        for path in ("/v1/messages/%00/feedbacks", "/v1/files/%00/preview", "/v1/conversations/%00/name",
                     "/v1/%00", "/v1/conversations/a%ED%A0%80b"):
            assert_dify_refusal(client.get(path), f"GET {path}")
            assert_dify_refusal(client.post(path, json={"user": USER}), f"POST {path}")
        # The consumer routes take the task id from the path.
        for task in ("%00", "%ED%A0%80", "a" * 3000):
            response = client.post(f"/v1/chat-messages/{task}/stop", json={"user": USER})
            assert_dify_refusal(response, f"stop {task[:10]}")
    assert "Traceback" not in daphne_server.log()


def test_hostile_multipart_uploads(daphne_server, v1_setup):
    headers = {"Authorization": f"Bearer {v1_setup['key']}"}
    forms = {
        "nul user": ({"user": "a\x00b"}, {"file": ("a.txt", b"hello", "text/plain")}),
        "nul file name": ({"user": USER}, {"file": ("a\x00.txt", b"hello", "text/plain")}),
        "nul content type": ({"user": USER}, {"file": ("a.txt", b"hello", "text/pl\x00ain")}),
        "no file": ({"user": USER}, {"other": ("a.txt", b"hello", "text/plain")}),
    }
    with httpx.Client(base_url=daphne_server.base_url, headers=headers, timeout=30) as client:
        for label, (data, files) in forms.items():
            for path in ("/v1/files/upload", "/v1/audio-to-text"):
                response = client.post(path, data=data, files=files)
                assert_dify_refusal(response, f"{path} {label}")
        response = client.post("/v1/files/upload", content=b"--x\r\nnot multipart at all\x00",
                               headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert_dify_refusal(response, "broken multipart")
    assert "Traceback" not in daphne_server.log()


def test_refusals_name_the_field(daphne_server, v1_setup):
    headers = {"Authorization": f"Bearer {v1_setup['key']}", "Content-Type": "application/json"}
    base = {"user": USER, "query": "hi", "inputs": {}, "response_mode": "blocking"}
    with httpx.Client(base_url=daphne_server.base_url, headers=headers, timeout=30) as client:
        cases = [
            (body_with(base, "user", b'"a\\u0000b"'), "user must not contain NUL characters"),
            (body_with(base, "query", b'"\\ud800"'), "query must be valid Unicode text"),
            (body_with(base, "inputs", b'{"k\\u0000": 1}'), "a key of inputs must not contain NUL"),
            (body_with(base, "inputs", b'{"x": NaN}'), "inputs.x must be a finite number"),
            (DEEP_OBJECT, "nested too deeply"),
        ]
        for raw, message in cases:
            response = client.post("/v1/chat-messages", content=raw)
            assert response.status_code == 400, response.text
            assert response.json()["code"] == "invalid_param"
            assert message in response.json()["message"]
        # Dify's own rule stays: NUL characters are stripped from the query, not refused.
        response = client.post("/v1/chat-messages", content=body_with(base, "query", b'"\\u0000"'))
        assert response.json() == {"code": "invalid_param", "message": "query is required", "status": 400}
        response = client.get("/v1/conversations?user=a%00b")
        assert response.status_code == 400 and "user must not contain NUL" in response.json()["message"]
        response = client.get("/v1/app/feedbacks?page=" + BIGINT_PLUS)
        assert response.status_code == 400 and "page" in response.json()["message"]
    assert Message.objects.count() == 1  # nothing half-written


def raw_request(server, method: str, path: str, header: bytes) -> tuple[int, bytes]:
    """(status, body) of a request carrying a header no HTTP client library would send."""
    request = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n"
               .encode() + header + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        chunks = b""
        while body:
            size, _, rest = body.partition(b"\r\n")
            chunks, body = chunks + rest[: int(size, 16)], rest[int(size, 16) + 2:]
        body = chunks
    return int(head.split(b" ", 2)[1]), body


def test_nul_in_headers_and_cookies(daphne_server, v1_setup, admin_user):
    """The HTTP server itself refuses such a request (400, before the application): no token or session lookup ever
    gets a NUL character."""
    headers = [b"Authorization: Token abc\x00def", b"Authorization: Bearer app-\x00abc",
               b"Cookie: sessionid=abcdefgh\x00ijkl; csrftoken=x", b"X-Anything: a\x00b"]
    paths = [("GET", "/api/llm-configs/"), ("GET", "/api/sessions/"), ("POST", "/api/agent/chat/"),
             ("GET", "/admin/"), ("GET", "/v1/info"), ("GET", "/v1/conversations"), ("POST", "/v1/chat-messages")]
    for header in headers:
        for method, path in paths:
            status, body = raw_request(daphne_server, method, path, header)
            assert status < 500, f"{method} {path} {header!r}: {status} {body[:200]!r}"
    assert "Traceback" not in daphne_server.log()


@pytest.fixture
def ws_setup(default_llm_config, fake_upstream, plain_user):
    app = AgentApp.objects.create(name="hostile-ws", mode=AgentApp.Mode.CHAT)
    session = Session.objects.create(app=app, owner=plain_user)
    return session, Token.objects.create(user=plain_user).key


HOSTILE_FRAMES: dict[str, str | bytes] = {
    "deep array": DEEP_ARRAY.decode(),
    "deep object": DEEP_OBJECT.decode(),
    "deep inside chat": '{"type": "chat", "message": "hi", "inputs": ' + DEEP_ARRAY.decode() + "}",
    "nul in message": '{"type": "chat", "message": "a\\u0000b"}',
    "nul in an inputs key": '{"type": "chat", "message": "hi", "inputs": {"k\\u0000": 1}}',
    "surrogate in message": '{"type": "chat", "message": "\\ud800"}',
    "surrogate key": '{"\\udc00": 1, "type": "chat", "message": "hi"}',
    "nul type": '{"type": "ch\\u0000at"}',
    "huge int": '{"type": "chat", "message": "hi", "max_tokens": ' + HUGE_INT + "}",
    "bigint max_tokens": '{"type": "chat", "message": "hi", "max_tokens": ' + BIGINT_PLUS + "}",
    "infinite temperature": '{"type": "chat", "message": "hi", "temperature": 1e999}',
    "nan in inputs": '{"type": "chat", "message": "hi", "inputs": {"x": NaN}}',
    "wrong types": '{"type": "chat", "message": [], "inputs": "x", "tools": 3}',
    "model_config_id not a uuid": '{"type": "chat", "message": "hi", "model_config_id": "\\u0000"}',
    "approval with nul id": '{"type": "approval", "id": "\\u0000", "decision": "approve"}',
    "approval with surrogate comment": '{"type": "approval", "id": "x", "decision": "reject", "comment": "\\ud800"}',
    "approval wrong types": '{"type": "approval", "id": 5, "decision": {}, "comment": []}',
    "non-object": "[1, 2]",
    "string": '"chat"',
    "null": "null",
    "empty": "",
    "unknown type": '{"type": 42}',
    "truncated": '{"type": "chat", "message": ',
    "binary not utf8": b"\xff\xfe{\x00",
    "binary json": b'{"type": "stop"}',
}


async def test_hostile_websocket_frames_get_error_events_on_an_open_socket(daphne_server, ws_setup):
    session, token = ws_setup
    url = f"{daphne_server.ws_url}/ws/agent/sessions/{session.id}/?token={token}"
    async with websockets.connect(url, open_timeout=10, max_size=None) as socket:
        for label, frame in HOSTILE_FRAMES.items():
            await socket.send(frame)
            try:
                message = json.loads(await asyncio.wait_for(socket.recv(), timeout=15))
            except websockets.ConnectionClosed as closed:
                pytest.fail(f"{label}: the socket closed with {closed.rcvd and closed.rcvd.code}")
            assert message["type"] == "error", f"{label}: {message}"
            assert message["code"] and message["message"], f"{label}: {message}"
        await socket.send(json.dumps({"type": "stop"}))
        still_open = json.loads(await asyncio.wait_for(socket.recv(), timeout=15))
        assert still_open["code"] == "not_running"
    assert await Message.objects.acount() == 0
    assert "Traceback" not in daphne_server.log()


async def test_hostile_websocket_token_is_refused_with_its_close_code(daphne_server, ws_setup):
    session, _ = ws_setup
    for token in ("%00", "a%00b", "%ED%A0%80"):
        url = f"{daphne_server.ws_url}/ws/agent/sessions/{session.id}/?token={token}"
        async with websockets.connect(url, open_timeout=10) as socket:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), timeout=10)
        assert closed.value.rcvd.code == 4401, token
