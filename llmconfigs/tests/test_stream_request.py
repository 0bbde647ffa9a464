"""A streamed request of the OpenAI-compatible surface (llmconfigs.completions.stream_request_send) goes to the
provider as the openai SDK's own `client.post(..., stream=True)` sends it, over real HTTP to the fake upstream: the
same URL, headers and body, the same retries (which statuses, how many, their retry count header) and the same errors
when it gives up."""
from __future__ import annotations

import json
import socket

import httpx2
import openai
import pytest

from llmconfigs.completions import stream_request_send
from tests.fakes.upstream import Reply

KEY = "sk-stream-request-test-0123456789"
BODY = {"model": "upstream-model", "stream": True, "temperature": 0.2,
        "messages": [{"role": "user", "content": "Hé \u2028 there, 温度?"}], "stream_options": {"include_usage": True}}


async def sdk_send(client: openai.AsyncOpenAI, body: dict) -> httpx2.Response:
    return await client.post("/chat/completions", body=body, cast_to=httpx2.Response, stream=True)


SENDERS = pytest.mark.parametrize("send", [sdk_send, stream_request_send], ids=["sdk", "ours"])


def client_for(base_url: str, *, max_retries: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=KEY, base_url=base_url, max_retries=max_retries, timeout=10)


async def outcome(send, client: openai.AsyncOpenAI) -> tuple:
    """What the caller sees: the status and body read, or the error's type, status and body."""
    try:
        response = await send(client, BODY)
    except openai.APIError as exc:
        return type(exc), getattr(exc, "status_code", None), exc.body
    try:
        return 200, response.status_code, (await response.aread()).count(b"data: ")
    finally:
        await response.aclose()


def sent(fake_upstream) -> list[tuple]:
    """Each request the upstream received: its path, headers (names in lower case) and body."""
    return [(r.path, {k.lower(): v for k, v in r.headers.items()}, r.body) for r in fake_upstream.chat_requests]


async def test_sends_what_the_sdk_sends(fake_upstream):
    client = client_for(fake_upstream.base_url, max_retries=0)
    await outcome(sdk_send, client)  # the SDK learns the platform its headers name on its first request
    fake_upstream.reset()
    by_sdk = await outcome(sdk_send, client)
    by_ours = await outcome(stream_request_send, client_for(fake_upstream.base_url, max_retries=0))
    assert by_ours == by_sdk and by_sdk[:2] == (200, 200)
    (sdk_request, our_request) = sent(fake_upstream)
    assert our_request == sdk_request
    assert sdk_request[1]["authorization"] == f"Bearer {KEY}" and sdk_request[2] == BODY


@SENDERS
async def test_retries_a_retryable_status_as_the_sdk_does(send, fake_upstream):
    fake_upstream.script(Reply(status=500, error_message="boom"), Reply(status=429, error_message="slow down"))
    result = await outcome(send, client_for(fake_upstream.base_url, max_retries=2))
    assert result[:2] == (200, 200)
    requests = sent(fake_upstream)
    assert [headers["x-stainless-retry-count"] for _, headers, _ in requests] == ["0", "1", "2"]
    assert all(body == BODY for _, _, body in requests)


@pytest.mark.parametrize("reply, error, calls", [
    (Reply(status=400, error_message="bad tool schema"), openai.BadRequestError, 1),  # never retried
    (Reply(status=500, error_message="boom"), openai.InternalServerError, 2),  # retried, then given up
])
async def test_gives_up_with_the_sdks_error(reply, error, calls, fake_upstream):
    results = {}
    for send in (sdk_send, stream_request_send):
        fake_upstream.reset()
        fake_upstream.script(reply, reply)
        results[send] = await outcome(send, client_for(fake_upstream.base_url, max_retries=1))
        assert len(fake_upstream.chat_requests) == calls
    assert results[sdk_send] == results[stream_request_send]
    assert results[sdk_send][:2] == (error, reply.status) and json.dumps(results[sdk_send][2])


@SENDERS
async def test_an_unreachable_provider_is_a_connection_error(send):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = await outcome(send, client_for(f"http://127.0.0.1:{port}/v1", max_retries=0))
    assert result[0] is openai.APIConnectionError


async def test_a_provider_request_writes_no_log_line_of_its_own(fake_upstream, caplog):
    """The HTTP client's line per request ("HTTP Request: POST ... 200 OK", INFO) is not written: it told nothing the
    request log does not, and it was written on the way to every first token (the response's headers are logged
    before its body is read)."""
    client = client_for(fake_upstream.base_url, max_retries=0)
    fake_upstream.script(Reply(text="hi"))
    response = await stream_request_send(client, BODY)
    await response.aread()
    await response.aclose()
    assert [record.getMessage() for record in caplog.records if record.name.startswith("httpx")] == []
