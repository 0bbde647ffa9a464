"""GET /metrics: who may read it (METRICS_TOKEN, else loopback clients only), and series that count scripted
fake-upstream runs exactly, parsed with prometheus_client's own parser. No key, user or secret in any label."""
from __future__ import annotations

import json
import logging
import socket
import uuid
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from channels.routing import get_default_application
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from difyapi.tests.factories import make_app_with_key
from tests.e2e.dify_servers import AsgiCall, dify_headers, dify_post, parse_sse
from tests.fakes.upstream import Reply

TOKEN = "metrics-token-5f1c2d9e8a7b6c5d4e3f"


def scrape(client: Client | None = None, **headers) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics as {(name, labels): value}."""
    response = (client or Client()).get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return samples(response.content.decode())


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ----- who may read -----

@pytest.mark.django_db
def test_loopback_client_reads_the_metrics_without_a_token(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    scraped = samples(response.content.decode())
    assert value(scraped, "opsagent_dependency_up", dependency="database") == 1.0
    assert value(scraped, "opsagent_dependency_up", dependency="cache") == 1.0


@pytest.mark.django_db
@pytest.mark.parametrize("meta", [
    {"REMOTE_ADDR": "203.0.113.7"},
    # A proxy on this host that is not a trusted one: the client behind it is unknown.
    {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.7"},
    {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_REAL_IP": "203.0.113.7"},
])
def test_other_clients_are_refused_without_a_token(client, meta):
    response = client.get("/metrics", **meta)
    assert response.status_code == 403
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert b"METRICS_TOKEN" in response.content


@pytest.mark.django_db
def test_a_trusted_proxy_relaying_a_remote_client_is_refused_and_one_on_this_host_is_not(client, settings):
    settings.TRUSTED_PROXY_IPS = ["10.0.0.5"]
    assert client.get("/metrics", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="203.0.113.7").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="127.0.0.1").status_code == 200


@pytest.mark.django_db
def test_with_a_token_only_its_bearer_reads_from_anywhere(client, settings, caplog):
    settings.METRICS_TOKEN = TOKEN
    caplog.set_level(logging.DEBUG)
    missing = client.get("/metrics")
    assert missing.status_code == 401
    assert missing["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Basic {TOKEN}").status_code == 401
    wrong = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}x")
    assert wrong.status_code == 403
    assert TOKEN.encode() not in wrong.content
    allowed = client.get("/metrics", REMOTE_ADDR="203.0.113.7", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert allowed.status_code == 200
    assert TOKEN.encode() not in allowed.content
    assert TOKEN not in caplog.text


@pytest.mark.django_db
def test_metrics_switched_off_are_not_found(client, settings):
    settings.METRICS_ENABLED = False
    response = client.get("/metrics")
    assert response.status_code == 404
    assert response["Content-Type"] == "text/plain; charset=utf-8"


def test_post_is_not_allowed(client):
    assert client.post("/metrics").status_code == 405


# ----- what they count -----

async def _dify_stream(key: str, **fields) -> list[dict]:
    payload = {"inputs": {}, "query": "hello", "user": "alice-end-user", "response_mode": "streaming",
               "auto_generate_name": False, **fields}
    async with AsgiCall(get_default_application(), path="/v1/chat-messages", headers=dify_headers(key),
                        body=json.dumps(payload).encode()) as call:
        raw = await call.read(30)
    assert call.status == 200
    return parse_sse(raw)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_a_streamed_turn_counts_exactly_once_with_its_tokens_and_cost(make_llm_config, fake_upstream):
    name, route = unique("metrics-cfg"), unique("metrics-route")
    config = await sync_to_async(make_llm_config)(name=name, route=route, input_price_per_million=Decimal("2"),
                                                  output_price_per_million=Decimal("6"))
    _, key = await sync_to_async(make_app_with_key)(name=unique("metrics-app"), mode="chat")
    fake_upstream.script(Reply(text="All quiet on the disks.", prompt_tokens=9, completion_tokens=5))
    before = await sync_to_async(scrape)()
    events = await _dify_stream(key, model=route)
    assert events[-1]["event"] == "message_end"
    after = await sync_to_async(scrape)()

    labels = {"route": route, "config": name}
    assert value(after, "opsagent_chat_requests_total", surface="dify", status="normal", **labels) == 1.0
    assert value(after, "opsagent_chat_request_duration_seconds_count", surface="dify", **labels) == 1.0
    assert value(after, "opsagent_chat_ttft_seconds_count", surface="dify", **labels) == 1.0
    assert 0 < value(after, "opsagent_chat_ttft_seconds_sum", surface="dify", **labels) <= value(
        after, "opsagent_chat_request_duration_seconds_sum", surface="dify", **labels)
    assert value(after, "opsagent_tokens_total", kind="prompt", **labels) == 9.0
    assert value(after, "opsagent_tokens_total", kind="completion", **labels) == 5.0
    # 9 tokens at 2 per million and 5 at 6 per million.
    assert value(after, "opsagent_cost_total", currency="USD", **labels) == pytest.approx(0.000048, abs=1e-12)
    assert value(after, "opsagent_provider_calls_total", outcome="ok", **labels) == 1.0
    assert value(after, "opsagent_active_streams", surface="dify") == value(before, "opsagent_active_streams",
                                                                            surface="dify")
    assert value(after, "opsagent_pool_member_health", state="ok", **labels) == 1.0
    assert value(after, "opsagent_pool_member_health", state="cooling_down", **labels) == 0.0

    text = await sync_to_async(lambda: Client().get("/metrics").content.decode())()
    for secret in (config.api_key, key, "alice-end-user", "hello", "All quiet"):
        assert secret not in text


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_a_failover_counts_each_members_call_and_shows_its_health(make_llm_config, fake_upstream):
    route = unique("metrics-pool")
    refused, healthy = unique("metrics-refused"), unique("metrics-healthy")
    await sync_to_async(make_llm_config)(name=refused, route=route, priority=2)
    await sync_to_async(make_llm_config)(name=healthy, route=route, priority=1)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    unreachable = unique("metrics-unreachable")
    await sync_to_async(make_llm_config)(name=unreachable, route=route, priority=3, base_url=closed)
    _, key = await sync_to_async(make_app_with_key)(name=unique("metrics-app"), mode="chat")
    fake_upstream.script(Reply(status=401, error_message="bad key"), Reply(text="Second member answers."))
    events = await _dify_stream(key, model=route)
    assert events[-1]["event"] == "message_end"
    after = await sync_to_async(scrape)()

    assert value(after, "opsagent_provider_calls_total", route=route, config=unreachable, outcome="unreachable") == 1
    assert value(after, "opsagent_provider_calls_total", route=route, config=refused, outcome="auth") == 1
    assert value(after, "opsagent_provider_calls_total", route=route, config=healthy, outcome="ok") == 1
    # The turn is counted once, under the member that answered.
    assert value(after, "opsagent_chat_requests_total", surface="dify", route=route, config=healthy,
                 status="normal") == 1
    assert value(after, "opsagent_chat_requests_total", surface="dify", route=route, config=refused,
                 status="normal") == 0
    assert value(after, "opsagent_pool_member_health", route=route, config=refused, state="auth_failed") == 1
    assert value(after, "opsagent_pool_member_health", route=route, config=refused, state="ok") == 0
    assert value(after, "opsagent_pool_member_health", route=route, config=healthy, state="ok") == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_a_failed_turn_counts_as_an_error(make_llm_config, fake_upstream):
    name, route = unique("metrics-failing"), unique("metrics-route")
    await sync_to_async(make_llm_config)(name=name, route=route)
    _, key = await sync_to_async(make_app_with_key)(name=unique("metrics-app"), mode="chat")
    fake_upstream.default = Reply(status=500, error_message="exploded")
    events = await _dify_stream(key, model=route)
    assert events[-1]["event"] == "error"
    after = await sync_to_async(scrape)()
    labels = {"route": route, "config": name}
    assert value(after, "opsagent_chat_requests_total", surface="dify", status="error", **labels) == 1
    assert value(after, "opsagent_chat_request_duration_seconds_count", surface="dify", **labels) == 1
    assert value(after, "opsagent_chat_ttft_seconds_count", surface="dify", **labels) == 0
    assert value(after, "opsagent_provider_calls_total", outcome="upstream_error", **labels) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_limit_refusals_are_counted_by_scope_and_limit(default_llm_config, fake_upstream, settings):
    settings.AUTH_FAILURE_LIMIT = 1
    _, key = await sync_to_async(make_app_with_key)(name=unique("metrics-limited"), mode="chat",
                                                    requests_per_minute=1)
    fake_upstream.default = Reply(text="ok")
    before = await sync_to_async(scrape)()
    payload = {"inputs": {}, "query": "hi", "user": "alice", "response_mode": "blocking"}
    assert (await dify_post(key, "/v1/chat-messages", payload))[0] == 200
    assert (await dify_post(key, "/v1/chat-messages", payload))[0] == 429
    # One wrong key locks the address (AUTH_FAILURE_LIMIT=1); the next request is refused by the lock.
    assert (await dify_post("app-wrong-key", "/v1/chat-messages", payload))[0] == 401
    assert (await dify_post(key, "/v1/chat-messages", payload))[0] == 429
    after = await sync_to_async(scrape)()

    def delta(**labels):
        return value(after, "opsagent_rate_limit_refusals_total", **labels) - value(
            before, "opsagent_rate_limit_refusals_total", **labels)

    assert delta(scope="app", limit="requests_per_minute") == 1
    assert delta(scope="client", limit="auth_lock") == 1
