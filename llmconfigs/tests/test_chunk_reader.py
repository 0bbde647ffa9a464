"""A passed-through stream's chunks (llmconfigs.completions.ChunkReader) are what the openai SDK's own AsyncStream
reads from the same bytes, however the bytes are split, and end, fail or raise as the SDK's do."""
from __future__ import annotations

import json

import httpx2
import openai
import pytest

from llmconfigs.completions import ChunkReader

URL = "http://upstream.test/v1/chat/completions"
CHUNKS = [
    {"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hé \u2028 there"}}]},
    {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None},
    {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
]


def _events(line_end: str) -> bytes:
    lines = [": keep-alive", ""]
    for chunk in CHUNKS:
        lines += [f"data: {json.dumps(chunk, ensure_ascii=False)}", ""]
    # One event whose data spans two lines, with fields a chat stream ignores.
    lines += ["event: message", "id: 7", "retry: 10", 'data: {"id": "c1",', 'data: "choices": []}', ""]
    lines += ["data: [DONE]", "", ""]
    return line_end.join(lines).encode()


def _response(body: bytes, size: int) -> httpx2.Response:
    async def parts():
        for start in range(0, len(body), size):
            yield body[start:start + size]

    request = httpx2.Request("POST", URL)
    return httpx2.Response(200, content=parts(), request=request,
                           headers={"content-type": "text/event-stream"})


async def _ours(body: bytes, size: int) -> list:
    reader = ChunkReader(_response(body, size))
    try:
        return [chunk async for chunk in reader]
    finally:
        await reader.close()


async def _sdks(body: bytes, size: int) -> list:
    client = openai.AsyncOpenAI(api_key="sk-test", base_url="http://upstream.test/v1")
    stream = openai.AsyncStream(cast_to=object, response=_response(body, size), client=client)
    return [chunk async for chunk in stream]


@pytest.mark.parametrize("line_end", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("size", [1, 2, 7, 4096])
async def test_the_chunks_are_the_sdks_however_the_bytes_are_split(line_end, size):
    body = _events(line_end)
    ours = await _ours(body, size)
    assert ours == await _sdks(body, size)
    assert ours[:4] == CHUNKS and ours[4] == {"id": "c1", "choices": []} and len(ours) == 5


async def test_nothing_after_done_is_read_as_a_chunk():
    body = b'data: {"a": 1}\n\ndata: [DONE]\n\ndata: {"b": 2}\n\n'
    assert await _ours(body, 5) == [{"a": 1}] == await _sdks(body, 5)


async def test_an_error_chunk_raises_the_sdks_api_error_with_its_body():
    body = b'data: {"a": 1}\n\ndata: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
    reader = ChunkReader(_response(body, 3))
    seen = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in reader:
            seen.append(chunk)
    assert seen == [{"a": 1}]
    assert caught.value.message == "overloaded"
    assert caught.value.body == {"message": "overloaded", "type": "server_error"}


async def test_a_broken_connection_raises_the_sdks_connection_error():
    async def parts():
        yield b'data: {"a": 1}\n\n'
        raise httpx2.ReadError("connection reset")

    reader = ChunkReader(httpx2.Response(200, content=parts(), request=httpx2.Request("POST", URL)))
    with pytest.raises(openai.APIConnectionError):
        async for _ in reader:
            pass


async def test_a_loop_that_stops_early_leaves_the_rest_to_the_next():
    reader = ChunkReader(_response(_events("\n"), 11))
    head = []
    async for chunk in reader:
        head.append(chunk)
        break
    rest = [chunk async for chunk in reader]
    assert [*head, *rest][:4] == CHUNKS
    await reader.close()
    assert reader.response.is_closed
