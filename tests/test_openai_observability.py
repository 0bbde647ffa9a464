"""What a /v1/chat/completions request shows to operators: exact metric deltas (parsed with prometheus_client's parser
from /metrics) under the surface "openai", every member call counted, the active streams gauge around a stream (a
client that leaves included), and the request log line with its time to first token, config, app and outcome; never
a key or message text in either."""
from __future__ import annotations

import asyncio
import json
import logging
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from channels.routing import get_default_application
from django.test import Client

from difyapi.openai.tests.test_chat_completions import PATH, ask, post
from difyapi.tests.factories import make_app_with_key
from opsagent.asgi import application  # noqa: F401 - imported here: Django's setup in it resets logging, and caplog
from tests.e2e.dify_servers import AsgiCall, dify_headers
from tests.fakes.upstream import Reply
from tests.test_metrics import scrape, unique, value

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_worker_connections")]

SAID = "tell me about the disks"
ANSWERED = "Disks are quiet."


@pytest.fixture
def pool(make_llm_config):
    """A priced pool of one under fresh names (the metrics live as long as the process) and an app key."""
    name, route = unique("oai-cfg"), unique("oai-route")
    config = make_llm_config(name=name, route=route, input_price_per_million=Decimal("2"),
                             output_price_per_million=Decimal("6"))
    app, key = make_app_with_key(name=unique("oai-app"), mode="chat")
    return config, app, key


def said(model: str, **fields):
    return {"model": model, "messages": [{"role": "user", "content": SAID}], **fields}


def log_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "opsagent.requests" and getattr(r, "path", "") == PATH]


async def written(caplog) -> logging.LogRecord:
    for _ in range(50):
        if log_lines(caplog):
            break
        await asyncio.sleep(0.05)
    (line,) = log_lines(caplog)
    return line


async def metrics_text() -> str:
    return await sync_to_async(lambda: Client().get("/metrics").content.decode())()


def deltas(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.mark.parametrize("stream", [True, False])
async def test_a_pool_request_is_counted_once_under_openai_and_logged(pool, fake_upstream, caplog, stream):
    config, app, key = pool
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    fake_upstream.script(Reply(text=ANSWERED, prompt_tokens=9, completion_tokens=5))
    before = await sync_to_async(scrape)()
    call, raw = await post(key, said(config.route_name, stream=stream))
    assert call.status == 200, raw
    line = await written(caplog)
    after = await sync_to_async(scrape)()

    labels = {"route": config.route_name, "config": config.name}
    assert deltas(before, after, "opsagent_chat_requests_total", surface="openai", status="normal", **labels) == 1
    assert deltas(before, after, "opsagent_chat_request_duration_seconds_count", surface="openai", **labels) == 1
    assert deltas(before, after, "opsagent_chat_ttft_seconds_count", surface="openai", **labels) == (1 if stream
                                                                                                     else 0)
    assert deltas(before, after, "opsagent_chat_requests_total", surface="dify", status="normal", **labels) == 0
    assert deltas(before, after, "opsagent_tokens_total", kind="prompt", **labels) == 9
    assert deltas(before, after, "opsagent_tokens_total", kind="completion", **labels) == 5
    assert deltas(before, after, "opsagent_cost_total", currency="USD", **labels) == pytest.approx(0.000048,
                                                                                                   abs=1e-12)
    assert deltas(before, after, "opsagent_provider_calls_total", outcome="ok", **labels) == 1
    assert value(after, "opsagent_active_streams", surface="openai") == value(before, "opsagent_active_streams",
                                                                              surface="openai")

    assert (line.method, line.status, line.surface, line.config, line.app, line.outcome) == (
        "POST", 200, "openai", config.name, app.name, "normal")
    assert line.task_id.startswith("chatcmpl-")
    if stream:
        assert line.ttft_ms is not None and 0 < line.ttft_ms <= line.duration_ms
        assert line.task_id in raw.decode()  # the id the client saw
    else:
        assert line.ttft_ms is None and json.loads(raw)["id"] == line.task_id
    text = await metrics_text()
    for secret in (config.api_key, key, SAID, ANSWERED):
        assert secret not in text and secret not in caplog.text


@pytest.fixture
def duo(make_llm_config):
    route, first, second = unique("oai-duo"), unique("oai-first"), unique("oai-second")
    make_llm_config(name=first, route=route, priority=2)
    make_llm_config(name=second, route=route, priority=1)
    return route, first, second, make_app_with_key(name=unique("oai-duo-app"), mode="chat")[1]


async def test_a_failover_counts_each_members_call_and_the_request_under_the_one_that_answered(duo, fake_upstream):
    route, first, second, key = duo
    fake_upstream.script(Reply(status=500, error_message="down"), Reply(text="from the second"))
    call, raw = await post(key, ask(route, stream=True))
    assert call.status == 200, raw
    after = await sync_to_async(scrape)()
    assert value(after, "opsagent_provider_calls_total", route=route, config=first, outcome="upstream_error") == 1
    assert value(after, "opsagent_provider_calls_total", route=route, config=second, outcome="ok") == 1
    assert value(after, "opsagent_chat_requests_total", surface="openai", route=route, config=second,
                 status="normal") == 1
    assert value(after, "opsagent_chat_requests_total", surface="openai", route=route, config=first,
                 status="normal") == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_a_request_every_member_failed_is_an_error_with_its_log_line(duo, fake_upstream, caplog, stream):
    route, first, second, key = duo
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    fake_upstream.script(Reply(status=500, error_message="down {api_key}"),
                         Reply(status=500, error_message="down too {api_key}"))
    before = await sync_to_async(scrape)()
    call, raw = await post(key, ask(route, stream=stream))
    assert call.status == 502, raw
    line = await written(caplog)
    after = await sync_to_async(scrape)()
    assert deltas(before, after, "opsagent_chat_requests_total", surface="openai", route=route, config=second,
                  status="error") == 1
    assert deltas(before, after, "opsagent_provider_calls_total", route=route, config=second,
                  outcome="upstream_error") == 1
    assert (line.status, line.outcome, line.config, line.surface) == (502, "error", second, "openai")
    assert value(after, "opsagent_active_streams", surface="openai") == value(before, "opsagent_active_streams",
                                                                              surface="openai")


async def test_an_open_stream_is_active_until_the_client_leaves(pool, fake_upstream, caplog):
    config, _, key = pool
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    fake_upstream.script(Reply(text=" ".join(["word"] * 50), delay=0.1))
    before = await sync_to_async(scrape)()
    body = json.dumps(said(config.route_name, stream=True)).encode()
    async with AsgiCall(get_default_application(), path=PATH, headers=dify_headers(key), body=body) as call:
        assert await call.start() == 200
        await call.chunk()
        during = await sync_to_async(scrape)()
        await call.disconnect()
    line = await written(caplog)
    after = await sync_to_async(scrape)()
    assert deltas(before, during, "opsagent_active_streams", surface="openai") == 1
    assert deltas(before, after, "opsagent_active_streams", surface="openai") == 0
    assert deltas(before, after, "opsagent_chat_requests_total", surface="openai", route=config.route_name,
                  config=config.name, status="stopped") == 1
    assert (line.status, line.outcome, line.surface) == (200, "stopped", "openai")
    assert line.ttft_ms is not None


async def test_the_agent_model_counts_its_turn_under_openai(default_llm_config, fake_upstream, caplog):
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    app, key = await sync_to_async(make_app_with_key)(name=unique("oai-agent"), mode="agent-chat")
    fake_upstream.script(Reply(text="Hello agent."))
    labels = {"route": default_llm_config.route_name, "config": default_llm_config.name}
    before = await sync_to_async(scrape)()
    call, raw = await post(key, ask("opsagent", stream=True))
    assert call.status == 200, raw
    line = await written(caplog)
    after = await sync_to_async(scrape)()
    assert deltas(before, after, "opsagent_chat_requests_total", surface="openai", status="normal", **labels) == 1
    assert deltas(before, after, "opsagent_chat_requests_total", surface="dify", status="normal", **labels) == 0
    assert (line.surface, line.app, line.outcome) == ("openai", app.name, "normal")


async def test_an_agent_models_stream_is_active_until_the_client_leaves(default_llm_config, fake_upstream):
    _, key = await sync_to_async(make_app_with_key)(name=unique("oai-agent-stream"), mode="agent-chat")
    fake_upstream.script(Reply(text=" ".join(["word"] * 50), delay=0.1))
    before = await sync_to_async(scrape)()
    body = json.dumps(ask("opsagent", stream=True)).encode()
    async with AsgiCall(get_default_application(), path=PATH, headers=dify_headers(key), body=body) as call:
        assert await call.start() == 200
        await call.chunk()
        during = await sync_to_async(scrape)()
        await call.disconnect()
    after = await sync_to_async(scrape)()
    assert deltas(before, during, "opsagent_active_streams", surface="openai") == 1
    assert deltas(before, after, "opsagent_active_streams", surface="openai") == 0
