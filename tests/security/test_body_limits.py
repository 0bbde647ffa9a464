"""Issue 15, item 7 (pre-auth memory exhaustion): bodies over their surface's limit are refused with a 413 in that
surface's format as soon as their size is known, before they are buffered and before any key is looked at, over a
real daphne; WebSocket messages over their limit close the socket with 1009."""
from __future__ import annotations

import asyncio
import json
import re
import select
import socket
import uuid

import httpx
import pytest
import websockets
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.authtoken.models import Token

from agentcore.models import AgentApp, Session
from difyapi.auth import api_key_create
from difyapi.tests.factories import DifyClient, assert_error, make_app, make_key

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

BODY_LIMIT = 64 * 1024
WS_LIMIT = 16 * 1024
SMALL_LIMITS = {
    "REQUEST_BODY_MAX_BYTES": str(BODY_LIMIT),
    "UPLOAD_FILE_SIZE_LIMIT": "1",
    "UPLOAD_IMAGE_FILE_SIZE_LIMIT": "1",
    "WEBSOCKET_MESSAGE_MAX_BYTES": str(WS_LIMIT),
}
MB = 1024 * 1024
BAD_KEY = "app-not-a-key-of-this-service-0000"


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    sock.settimeout(15)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body (all the server's refusals have one)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the response body"
        body += chunk
    return status, headers, body


def _head(path: str, *headers: str) -> bytes:
    return ("\r\n".join([f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *headers]) + "\r\n\r\n").encode()


def _send_until_answered(sock: socket.socket, head: bytes, *, total: int, piece: int = 64 * 1024) -> int:
    """Send `head`, then a chunked body of `total` bytes in pieces, stopping as soon as the server answers; the
    terminating chunk goes only if the whole body went. Returns the body bytes sent."""
    sock.sendall(head)
    chunk = b"%x\r\n" % piece + b"x" * piece + b"\r\n"
    sent = 0
    try:
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                return sent
            sock.sendall(chunk)
            sent += piece
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server stopped listening: its answer is what the test reads next
    return sent


def _peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1))


@pytest.fixture
def server(start_daphne):
    return start_daphne(**SMALL_LIMITS)


def test_declared_oversize_bodies_are_refused_at_once_in_each_surfaces_format(server):
    conversation = uuid.uuid4()
    cases = [
        ("/v1/chat-messages", "request_entity_too_large"),
        (f"/v1/chat-messages/{uuid.uuid4()}/stop", "request_entity_too_large"),
        (f"/v1/conversations/{conversation}/name", "request_entity_too_large"),
        ("/v1/files/upload", "file_too_large"),
        ("/api/llm-configs/", "request_too_large"),
        ("/admin/login/", None),
    ]
    for path, code in cases:
        # The upload limit is the largest file (1 MB here) plus room for the form; everything else is BODY_LIMIT.
        declared = 3 * MB if path == "/v1/files/upload" else BODY_LIMIT + 1
        with _connect(server) as sock:
            # Only the head is sent: the answer cannot wait for a body that never comes.
            sock.sendall(_head(path, f"Authorization: Bearer {BAD_KEY}", "Content-Type: application/json",
                               f"Content-Length: {declared}"))
            status, headers, body = _read_response(sock)
        assert status == 413, (path, body)
        if path.startswith("/v1/"):
            assert json.loads(body)["code"] == code
            assert json.loads(body)["status"] == 413
        elif path.startswith("/api/"):
            assert json.loads(body) == {"detail": f"Request body too large: at most {BODY_LIMIT} bytes.",
                                        "code": code}
        else:
            assert headers["content-type"].startswith("text/plain")


def test_chunked_oversize_bodies_are_refused_while_they_arrive(server):
    for path in ("/v1/chat-messages", "/api/agent/chat/"):
        with _connect(server) as sock:
            head = _head(path, f"Authorization: Bearer {BAD_KEY}", "Content-Type: application/json",
                         "Transfer-Encoding: chunked")
            # 2 MB are offered and the body is never finished: only an answer given while reading can come back.
            sock.sendall(head)
            piece = b"%x\r\n" % (64 * 1024) + b"x" * 64 * 1024 + b"\r\n"
            try:
                for _ in range(32):
                    sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                pass
            status, _, body = _read_response(sock)
        assert status == 413, (path, body)
        assert json.loads(body).get("code") in ("request_entity_too_large", "request_too_large")


def test_fifty_megabytes_with_a_bad_key_are_answered_before_they_are_sent_and_never_buffered(server):
    pid = server.process.pid
    warm_up = httpx.post(f"{server.base_url}/v1/chat-messages", json={}, timeout=30,  # the path the attack takes
                         headers={"Authorization": f"Bearer {BAD_KEY}"})
    assert warm_up.status_code == 401
    peak_before = _peak_rss_kb(pid)

    total = 50 * MB
    with _connect(server) as sock:
        head = _head("/v1/chat-messages", f"Authorization: Bearer {BAD_KEY}", "Content-Type: application/json",
                     "Transfer-Encoding: chunked")
        sent = _send_until_answered(sock, head, total=total)
        status, _, body = _read_response(sock)

    assert status == 413 and json.loads(body)["code"] == "request_entity_too_large"
    assert sent < total  # the answer came while the client was still sending
    # The server's peak memory did not grow by anything like the body (it held at most the limit's worth).
    assert _peak_rss_kb(pid) - peak_before < 10 * 1024


def test_a_body_in_many_parts_under_the_limit_still_reaches_the_chat(server, default_llm_config, fake_upstream):
    app = AgentApp.objects.create(name="limits-chat", mode="chat")
    _, key = api_key_create(app=app)
    # Whitespace makes the body span several of daphne's reads without bending any field's own bounds.
    body = json.dumps({"inputs": {}, "query": "hi", "user": "alice", "response_mode": "blocking",
                       "auto_generate_name": False}).encode() + b" " * 40_000
    assert len(body) < BODY_LIMIT
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for header_key, expected in ((BAD_KEY, 401), (key, 200)):
            answer = client.post("/v1/chat-messages", content=body, headers={
                "Authorization": f"Bearer {header_key}", "Content-Type": "application/json"})
            assert answer.status_code == expected, answer.text
    assert answer.json()["answer"]


async def test_oversize_websocket_messages_close_the_socket_with_1009(server, plain_user):
    app = await AgentApp.objects.acreate(name="limits-ws", mode="chat")
    session = await Session.objects.acreate(app=app, owner=plain_user)
    token = await Token.objects.acreate(user=plain_user)
    url = f"{server.ws_url}/ws/agent/sessions/{session.id}/?token={token.key}"
    for size in (WS_LIMIT + 1, 2 * MB):
        async with websockets.connect(url, open_timeout=10, max_size=None) as ws:
            await ws.send(json.dumps({"type": "chat", "message": "x" * size}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=10)
        assert closed.value.rcvd.code == 1009


def test_an_upload_whose_form_fields_pass_the_body_limit_gets_the_dify_413(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000  # Django's own bound on the non-file fields of a form
    client = DifyClient(make_key(make_app()))
    response = client.upload("/v1/files/upload", {"user": "u" * 2000,
                                                  "file": SimpleUploadedFile("a.txt", b"hi", "text/plain")})
    assert_error(response, 413, "request_entity_too_large")
