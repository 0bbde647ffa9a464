"""Governance of apps and keys: the models an app may use (its allow-list, on every path that chooses a model) and
its rate limits and budgets (agentcore.limits), on /v1 (Dify's envelope) and /api (DRF's), at their edges."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache

from agentcore.limits import (
    COST_UNIT,
    LIMIT_FIELDS,
    Counted,
    Limits,
    MemoryCounters,
    Meter,
    OverLimit,
    RedisCounters,
    usage_check,
    usage_current,
    usage_record,
    usage_uncount,
)
from agentcore.models import AgentApp, Message, Session
from difyapi.auth import api_key_create
from difyapi.models import ApiKey
from difyapi.tests.factories import DifyClient, assert_error, make_message, make_session
from llmconfigs.models import AuditLog
from opsagent.common.dependencies import DependencyUnavailable, redis_server
from tests.e2e.dify_servers import dify_post
from tests.fakes.upstream import Reply


@pytest.fixture(autouse=True)
def _one_minute(monkeypatch):
    """The limits' clock stands still inside one UTC minute, so that no test straddles a period boundary."""
    moment = time.time() // 60 * 60 + 20
    monkeypatch.setattr("agentcore.limits.time", SimpleNamespace(time=lambda: moment))


def make_app(**fields) -> tuple[AgentApp, str]:
    fields.setdefault("name", f"gov-{uuid.uuid4().hex[:8]}")
    app = AgentApp.objects.create(mode=AgentApp.Mode.CHAT, **fields)
    return app, api_key_create(app=app)[1]


async def chat(key: str, **fields) -> tuple[int, dict[str, str], dict]:
    payload = {"inputs": {}, "query": "hello", "user": "alice", "response_mode": "blocking",
               "auto_generate_name": False, **fields}
    status, headers, raw = await dify_post(key, "/v1/chat-messages", payload)
    return status, headers, json.loads(raw)


def _header(headers, name: str) -> str | None:
    if isinstance(headers, dict):
        return next((v for k, v in headers.items() if k.lower() == name.lower()), None)
    return next((v.decode() for k, v in headers if k.decode().lower() == name.lower()), None)


# ----- rate limits and budgets on /v1 -----

@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_requests_per_minute_lets_exactly_the_limit_through_then_429_with_retry_after(
    default_llm_config, fake_upstream
):
    app, key = await sync_to_async(make_app)(requests_per_minute=2)
    for _ in range(2):
        status, _, data = await chat(key)
        assert status == 200, data
    status, headers, data = await chat(key)
    assert status == 429
    assert data == {"code": "too_many_requests", "status": 429, "message": data["message"]}
    assert "requests per minute" in data["message"] and "this app" in data["message"]
    assert 1 <= int(_header(headers, "Retry-After")) <= 61
    assert len(fake_upstream.chat_requests) == 2  # refused before any provider call


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_requests_refused_for_bad_input_or_by_the_limit_do_not_use_the_quota(default_llm_config, fake_upstream):
    app, key = await sync_to_async(make_app)(requests_per_minute=1)
    # Checked after the limit (Dify's order) and refused: an unknown conversation, a model outside the app's reach.
    status, _, data = await chat(key, conversation_id=str(uuid.uuid4()))
    assert (status, data["code"]) == (404, "not_found")
    status, _, data = await chat(key, model="no-such-model")
    assert (status, data["code"]) == (400, "invalid_param")
    status, _, data = await chat(key)
    assert status == 200, data
    for _ in range(2):  # refused by the limit itself: not counted either
        assert (await chat(key))[0] == 429
    assert (await sync_to_async(usage_current)(scope=f"app:{app.pk}"))["requests_per_minute"] == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_a_keys_limit_narrows_its_apps_and_other_keys_keep_the_apps(default_llm_config, fake_upstream):
    app, key = await sync_to_async(make_app)(requests_per_minute=5)
    await ApiKey.objects.filter(app=app).aupdate(requests_per_minute=1)
    _, other_key = await sync_to_async(api_key_create)(app=app)
    assert (await chat(key))[0] == 200
    status, _, data = await chat(key)
    assert status == 429 and "this API key" in data["message"]
    assert (await chat(other_key))[0] == 200


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_a_token_budget_crossed_during_a_turn_lets_it_finish_and_refuses_the_next(
    default_llm_config, fake_upstream
):
    app, key = await sync_to_async(make_app)(tokens_per_day=10)
    fake_upstream.script(Reply(text="a long answer", prompt_tokens=12, completion_tokens=7))
    status, _, data = await chat(key)
    assert status == 200 and data["answer"] == "a long answer"
    status, headers, data = await chat(key)
    assert status == 429 and data["code"] == "rate_limit_error" and "tokens per day" in data["message"]
    assert 1 <= int(_header(headers, "Retry-After")) <= 86401
    assert len(fake_upstream.chat_requests) == 1
    used = await sync_to_async(usage_current)(scope=f"app:{app.pk}")
    assert used["tokens_per_day"] == used["tokens_per_month"] == 19


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_a_cost_budget_per_month_on_the_key_counts_the_configs_prices(make_llm_config, fake_upstream):
    await sync_to_async(make_llm_config)(name="priced", model_name="fake-priced", default=True,
                                         input_price_per_million=Decimal("1000"),
                                         output_price_per_million=Decimal("1000"))
    app, key = await sync_to_async(make_app)()
    await ApiKey.objects.filter(app=app).aupdate(cost_per_month=Decimal("0.0100"))
    fake_upstream.script(Reply(text="x", prompt_tokens=5, completion_tokens=5),
                         Reply(text="y", prompt_tokens=5, completion_tokens=5))
    assert (await chat(key))[0] == 200  # 10 tokens at 1000 per million: 0.01, the budget exactly
    status, _, data = await chat(key)
    assert status == 429 and data["code"] == "rate_limit_error" and "cost per month" in data["message"]
    key_row = await ApiKey.objects.aget(app=app)
    assert (await sync_to_async(usage_current)(scope=f"key:{key_row.pk}"))["cost_per_month"] == Decimal("0.0100")


@pytest.mark.django_db
def test_suggested_questions_are_charged_to_the_app_and_key_and_refused_over_the_limit(
    default_llm_config, fake_upstream
):
    app, key = make_app(suggested_questions_after_answer=True, tokens_per_minute=30)
    message = make_message(make_session(app))
    client = DifyClient(key)
    fake_upstream.script(Reply(text='["a?", "b?", "c?"]', prompt_tokens=20, completion_tokens=10))
    response = client.get(f"/v1/messages/{message.pk}/suggested?user=alice")
    assert response.status_code == 200 and response.json()["data"] == ["a?", "b?", "c?"]
    key_row = ApiKey.objects.get(app=app)
    assert usage_current(scope=f"app:{app.pk}")["tokens_per_minute"] == 30
    assert usage_current(scope=f"key:{key_row.pk}")["tokens_per_day"] == 30
    assert_error(client.get(f"/v1/messages/{message.pk}/suggested?user=alice"), 429, "too_many_requests")
    assert len(fake_upstream.chat_requests) == 1


# ----- rate limits on /api -----

@pytest.mark.django_db(transaction=True)
def test_rest_chat_over_the_apps_limit_is_a_drf_429_with_retry_after(user_client, default_llm_config,
                                                                     fake_upstream):
    app, _ = make_app(requests_per_minute=1)
    assert user_client.post("/api/agent/chat/", {"message": "hi", "app_id": str(app.pk)},
                            format="json").status_code == 200
    response = user_client.post("/api/agent/chat/", {"message": "hi", "app_id": str(app.pk)}, format="json")
    assert response.status_code == 429
    assert response.json()["code"] == "rate_limited"
    assert 1 <= int(response["Retry-After"]) <= 61
    assert len(fake_upstream.chat_requests) == 1


@pytest.mark.django_db(transaction=True)
def test_rest_chat_refused_for_bad_input_does_not_use_the_quota(user_client, default_llm_config, fake_upstream):
    app, _ = make_app(requests_per_minute=1)
    response = user_client.post("/api/agent/chat/", {"message": "hi", "app_id": str(app.pk),
                                                     "model_config_id": str(uuid.uuid4())}, format="json")
    assert response.status_code == 400 and "model_config_id" in response.json()
    response = user_client.post("/api/agent/chat/", {"message": "hi", "app_id": str(app.pk),
                                                     "session_id": str(uuid.uuid4())}, format="json")
    assert response.status_code == 404
    assert user_client.post("/api/agent/chat/", {"message": "hi", "app_id": str(app.pk)},
                            format="json").status_code == 200
    assert user_client.post("/api/agent/chat/", {"message": "hi", "app_id": str(app.pk)},
                            format="json").status_code == 429


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_websocket_chat_over_the_apps_limit_is_an_error_event_and_reaches_no_provider(plain_user,
                                                                                           default_llm_config,
                                                                                           fake_upstream):
    from channels.testing import WebsocketCommunicator
    from rest_framework.authtoken.models import Token

    from agentcore.models import Session
    from agentcore.routing import websocket_application

    app, _ = await sync_to_async(make_app)(requests_per_minute=1)
    session = await Session.objects.acreate(app=app, owner=plain_user)
    token = (await Token.objects.acreate(user=plain_user)).key
    communicator = WebsocketCommunicator(websocket_application, f"/ws/agent/sessions/{session.id}/?token={token}")
    assert (await communicator.connect(timeout=10))[0]
    answers = []
    for _ in range(2):
        await communicator.send_json_to({"type": "chat", "message": "hi"})
        while True:
            event = await communicator.receive_json_from(timeout=10)
            if event["type"] in ("end", "error"):
                answers.append(event)
                break
    await communicator.disconnect()
    assert answers[0]["type"] == "end" and answers[0]["status"] == "normal"
    assert answers[1]["type"] == "error" and answers[1]["code"] == "rate_limited", answers[1]
    assert len(fake_upstream.chat_requests) == 1


# ----- the counters -----

def test_memory_counters_let_exactly_the_limit_through_under_threads():
    meter = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(requests_per_minute=7))
    passed = []

    def hit():
        try:
            usage_check(meter=meter)
            passed.append(1)
        except OverLimit:
            pass

    threads = [threading.Thread(target=hit) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(passed) == 7


def test_a_request_given_back_frees_its_place_and_never_goes_below_zero():
    meter = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(requests_per_minute=1, tokens_per_day=100))
    counted = usage_check(meter=meter)
    usage_uncount(counted)
    usage_uncount(counted)  # twice: a counter never goes below zero
    assert usage_current(scope=f"app:{meter.app_id}")["requests_per_minute"] == 0
    usage_check(meter=meter)
    with pytest.raises(OverLimit):
        usage_check(meter=meter)


def test_no_limit_means_no_counter_is_touched(monkeypatch):
    class Refusing(MemoryCounters):
        def check(self, checks):
            raise AssertionError("a request without limits reached the counters")

    monkeypatch.setattr("agentcore.limits._memory", Refusing())
    monkeypatch.setattr("agentcore.limits._redis", Refusing())
    usage_check(meter=Meter(app_id="a", key_id="k"))


@pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL")
def test_redis_counters_refuse_at_the_edge_and_add_usage():
    meter = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(requests_per_minute=3, tokens_per_day=100))
    for _ in range(3):
        usage_check(meter=meter)
    with pytest.raises(OverLimit) as refused:
        usage_check(meter=meter)
    assert refused.value.budget is False and 1 <= refused.value.retry_after <= 61
    budget = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(tokens_per_day=100))
    usage_record(meter=budget, tokens=99, cost=Decimal("0.5"))
    usage_check(meter=budget)
    usage_record(meter=budget, tokens=1, cost=Decimal(0))
    with pytest.raises(OverLimit) as refused:
        usage_check(meter=budget)
    assert refused.value.budget is True
    assert usage_current(scope=f"app:{budget.app_id}")["cost_per_month"] == Decimal("0.5000")



@pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL")
def test_with_redis_the_counters_are_kept_in_redis_where_every_worker_sees_them():
    # Counters in this process's memory would pass every other test here: one process sees its own counts.
    meter = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(tokens_per_day=100))
    usage_record(meter=meter, tokens=7, cost=Decimal(0))
    client = cache._cache.get_client(write=True)
    stored = [int(client.get(key)) for key in client.scan_iter(match=f"usage:app:{meter.app_id}:*")]
    assert stored == [7, 7, 7]  # its minute, day and month


def test_counters_on_an_unreachable_redis_fail_as_the_redis_dependency_and_log_why(caplog):
    with socket.socket() as closed:  # a port nothing listens on: every connection is refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]

    class Unreachable(RedisCounters):
        def _client(self):
            return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=5)

    operations = {"check": lambda c: c.check([("k", 1, True, 60)]), "uncount": lambda c: c.uncount(["k"]),
                  "add": lambda c: c.add([("k", 1, 60)]), "read": lambda c: c.read(["k"])}
    for name, operation in operations.items():
        redis_server.up()  # each operation tries the server itself, not the open circuit breaker of the last one
        caplog.clear()
        with pytest.raises(DependencyUnavailable) as failed:
            operation(Unreachable())  # a new instance: its scripts are registered on first use
        assert failed.value.dependency == "redis", name
        assert "redis is unreachable (network:ConnectionError)" in caplog.text, name  # why, not "(None)"


def test_a_request_given_back_during_a_redis_outage_stays_counted_and_is_logged_not_raised(monkeypatch, caplog):
    class Down(MemoryCounters):
        def uncount(self, keys):
            raise DependencyUnavailable("redis")

    monkeypatch.setattr("agentcore.limits._memory", Down())
    monkeypatch.setattr("agentcore.limits._redis", Down())
    usage_uncount(Counted(keys=("usage:app:a:req:m1",)))
    assert [r.getMessage() for r in caplog.records if r.name == "agentcore.limits"] == [
        f"a refused request stays counted: {DependencyUnavailable('redis').message}"]


def test_giving_back_a_request_whose_counter_is_gone_changes_nothing():
    counters = MemoryCounters()  # e.g. a restart, or an expired counter the memory bound dropped
    counters.uncount(["never-counted"])
    assert counters.read(["never-counted"]) == [0]


# ----- the models an app may use -----

@pytest.mark.django_db
def test_models_lists_only_the_allowed_routes(make_llm_config):
    make_llm_config(name="main", model_name="gpt-main", default=True)
    make_llm_config(name="cheap-a", model_name="m-a", route="cheap")
    make_llm_config(name="cheap-b", model_name="m-b", route="cheap")
    app, key = make_app(allowed_routes=["cheap"])
    names = [item["name"] for item in DifyClient(key).get("/v1/models").json()["data"]]
    assert sorted(names) == ["cheap-a", "cheap-b"]
    AgentApp.objects.filter(pk=app.pk).update(allowed_routes=[])
    _, open_key = make_app()
    assert len(DifyClient(open_key).get("/v1/models").json()["data"]) == 3


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
@pytest.mark.parametrize("field", ["model", "model_config_id"])
async def test_asking_for_a_model_outside_the_allow_list_is_invalid_param_naming_the_field(
    field, make_llm_config, fake_upstream
):
    main = await sync_to_async(make_llm_config)(name="main", model_name="gpt-main", default=True)
    await sync_to_async(make_llm_config)(name="cheap", model_name="m-cheap")
    app, key = await sync_to_async(make_app)(allowed_routes=["m-cheap"])
    status, _, data = await chat(key, **{field: "main" if field == "model" else str(main.pk)})
    assert status == 400 and data["code"] == "invalid_param"
    assert field in data["message"] and "'gpt-main'" in data["message"] and "m-cheap" in data["message"]
    assert not fake_upstream.chat_requests
    # Nothing named: the default is not allowed, so the app's first allowed model answers.
    status, _, data = await chat(key)
    assert status == 200, data
    assert fake_upstream.chat_requests[-1].body["model"] == "m-cheap"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_a_conversation_whose_model_left_the_allow_list_is_refused(make_llm_config, fake_upstream):
    main = await sync_to_async(make_llm_config)(name="main", model_name="gpt-main", default=True)
    app, key = await sync_to_async(make_app)()
    session = await Session.objects.acreate(app=app, end_user="alice", source=Session.Source.API, llm_config=main)
    await AgentApp.objects.filter(pk=app.pk).aupdate(allowed_routes=["other"])
    status, _, data = await chat(key, conversation_id=str(session.pk))
    assert status == 400 and data["code"] == "invalid_param" and data["message"].startswith("conversation_id:")
    assert not fake_upstream.chat_requests
    assert not await Message.objects.filter(session=session).aexists()


@pytest.mark.django_db
def test_rest_session_with_a_model_outside_the_allow_list_is_400_on_its_field(user_client, make_llm_config):
    make_llm_config(name="main", model_name="gpt-main", default=True)
    other = make_llm_config(name="other", model_name="gpt-other")
    app, _ = make_app(allowed_routes=["gpt-main"])
    response = user_client.post("/api/sessions/", {"app_id": str(app.pk), "llm_config_id": str(other.pk)},
                                format="json")
    assert response.status_code == 400, response.content
    assert "llm_config_id" in response.json()


# ----- the admin -----

@pytest.mark.django_db
def test_admin_edits_the_allow_list_as_check_boxes_and_shows_usage_beside_limits(admin_client, make_llm_config):
    make_llm_config(name="main", model_name="gpt-main", default=True)
    make_llm_config(name="cheap", model_name="m-cheap")
    app, _ = make_app(tokens_per_day=500)
    usage_record(meter=Meter.of_app(app), tokens=123, cost=Decimal(0))
    page = admin_client.get(f"/admin/agentcore/agentapp/{app.pk}/change/").content.decode()
    assert 'type="checkbox" name="allowed_routes" value="m-cheap"' in page
    assert "<td>tokens per day</td><td>500</td><td>123</td>" in page
    form = {f.name: getattr(app, f.attname) for f in AgentApp._meta.concrete_fields
            if f.editable and f.name not in ("id", "llm_config")}
    # Lists edited as check boxes post each value; the other JSON fields post their text.
    form.update({k: json.dumps(v) for k, v in form.items() if isinstance(v, list | dict) and k != "enabled_tools"})
    form.update(allowed_routes=["m-cheap"], llm_config="")
    response = admin_client.post(f"/admin/agentcore/agentapp/{app.pk}/change/", form)
    assert response.status_code == 302, response.content.decode()[:3000]
    app.refresh_from_db()
    assert app.allowed_routes == ["m-cheap"]
    assert app.tokens_per_day == 500 and app.mode == AgentApp.Mode.CHAT  # the rest of the form saved as it was
    # The audit row names what changed, and only that (a budget "0" posted over "0.0000" is no change).
    row = AuditLog.objects.filter(target_id=str(app.pk)).latest("id")
    assert set(row.changes) == {"allowed_routes"}
    form.update(cost_per_day="1.5")
    assert admin_client.post(f"/admin/agentcore/agentapp/{app.pk}/change/", form).status_code == 302
    assert AuditLog.objects.filter(target_id=str(app.pk)).latest("id").changes == {
        "cost_per_day": {"old": "0.0000", "new": "1.5000"}}


@pytest.mark.django_db
def test_admin_key_limits_only_narrow_the_apps_and_the_page_shows_usage_but_no_key(admin_client, default_llm_config):
    app, raw_key = make_app(requests_per_minute=10)
    key = ApiKey.objects.get(app=app)
    url = f"/admin/difyapi/apikey/{key.pk}/change/"
    form = {"name": "team-a", **dict.fromkeys(LIMIT_FIELDS, "0")}
    response = admin_client.post(url, {**form, "requests_per_minute": "11"})
    assert response.status_code == 200 and "At most the app&#x27;s limit (10)" in response.content.decode()
    assert admin_client.post(url, {**form, "requests_per_minute": "3", "tokens_per_day": "900"}).status_code == 302
    key.refresh_from_db()
    assert (key.name, key.requests_per_minute, key.tokens_per_day) == ("team-a", 3, 900)
    assert AuditLog.objects.filter(target_id=str(key.pk)).latest("id").changes == {
        "name": {"old": "", "new": "team-a"}, "requests_per_minute": {"old": 0, "new": 3},
        "tokens_per_day": {"old": 0, "new": 900}}
    usage_record(meter=Meter(app_id=str(app.pk), key_id=str(key.pk)), tokens=42, cost=Decimal(0))
    page = admin_client.get(url).content.decode()
    assert "<td>tokens per day</td><td>900</td><td>42</td>" in page
    assert raw_key not in page


@pytest.mark.django_db(transaction=True)
def test_rest_chat_asking_for_a_model_outside_the_allow_list_is_400_on_its_field(
    user_client, make_llm_config, fake_upstream
):
    make_llm_config(name="main", model_name="gpt-main", default=True)
    app, _ = make_app(allowed_routes=["gpt-main"])
    make_llm_config(name="other", model_name="gpt-other")
    response = user_client.post("/api/agent/chat/", {"message": "hi", "app_id": str(app.pk), "model": "other"},
                                format="json")
    assert response.status_code == 400 and "model" in response.json(), response.content
    assert not fake_upstream.chat_requests


def test_usage_lost_to_a_redis_outage_is_logged_not_raised(monkeypatch, caplog):
    class Down(MemoryCounters):
        def add(self, amounts):
            raise DependencyUnavailable("redis")

    monkeypatch.setattr("agentcore.limits._memory", Down())
    monkeypatch.setattr("agentcore.limits._redis", Down())
    usage_record(meter=Meter(app_id="app-1"), tokens=5, cost=Decimal(0))
    assert "usage of app-1 not counted" in caplog.text


# ----- the periods: UTC minutes, days and months -----

def _clock(monkeypatch, moment: str) -> SimpleNamespace:
    """Stop the limits' clock at `moment` (ISO, UTC); move it by setting the returned clock's `now`."""
    clock = SimpleNamespace(now=datetime.fromisoformat(moment).replace(tzinfo=UTC).timestamp())
    monkeypatch.setattr("agentcore.limits.time", SimpleNamespace(time=lambda: clock.now))
    return clock


def _refusal(meter: Meter) -> OverLimit:
    with pytest.raises(OverLimit) as refused:
        usage_check(meter=meter)
    return refused.value


@pytest.mark.parametrize(("limit", "budget"), [("requests_per_minute", False), ("tokens_per_minute", False),
                                               ("tokens_per_day", True), ("tokens_per_month", True),
                                               ("cost_per_day", True), ("cost_per_month", True)])
def test_every_period_ends_at_new_year_and_retry_after_counts_the_seconds_left(monkeypatch, limit, budget):
    clock = _clock(monkeypatch, "2026-12-31T23:59:30")
    meter = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(**{limit: 1}))
    usage_check(meter=meter)
    usage_record(meter=meter, tokens=1, cost=Decimal(1))
    refused = _refusal(meter)
    assert (refused.retry_after, refused.budget) == (30, budget)
    assert "try again in 30 seconds" in str(refused)
    clock.now += 29.9  # the period's last instant: still counted
    assert _refusal(meter).retry_after == 1
    clock.now += 0.1  # 2027-01-01T00:00:00Z: a new minute, day and month
    usage_check(meter=meter)
    # Only the request just let through is counted in the new periods.
    assert usage_current(scope=f"app:{meter.app_id}")[limit] == (1 if limit == "requests_per_minute" else 0)


@pytest.mark.parametrize(("moment", "day_left", "month_left"), [
    ("2026-06-15T12:00:00", 12 * 3600, 15 * 86400 + 12 * 3600),  # a 30-day month
    ("2027-02-28T23:00:00", 3600, 3600),  # February's last hour
    ("2026-01-01T00:00:00", 86400, 31 * 86400),  # the first instant of a year: January is 31 days
])
def test_day_and_month_budgets_last_until_the_utc_midnight_and_month_end(monkeypatch, moment, day_left, month_left):
    clock = _clock(monkeypatch, moment)
    day = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(tokens_per_day=10))
    month = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(tokens_per_month=10))
    for meter in (day, month):
        usage_record(meter=meter, tokens=10, cost=Decimal(0))
    assert _refusal(day).retry_after == day_left
    assert _refusal(month).retry_after == month_left
    clock.now += day_left - 1
    _refusal(day)
    clock.now += 1
    usage_check(meter=day)
    assert usage_current(scope=f"app:{day.app_id}")["tokens_per_day"] == 0
    clock.now += month_left - day_left - 1
    _refusal(month)
    clock.now += 1
    usage_check(meter=month)
    assert usage_current(scope=f"app:{month.app_id}")["tokens_per_month"] == 0


def test_a_minute_is_a_utc_minute_not_sixty_seconds_from_the_first_request(monkeypatch):
    clock = _clock(monkeypatch, "2026-12-02T10:00:59")
    meter = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(requests_per_minute=1))
    usage_check(meter=meter)
    assert _refusal(meter).retry_after == 1
    clock.now += 1
    usage_check(meter=meter)
    assert _refusal(meter).retry_after == 60


def test_a_negative_usage_report_never_lowers_a_counter(monkeypatch):
    _clock(monkeypatch, "2026-12-02T10:00:20")
    meter = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(tokens_per_day=10, cost_per_day=Decimal(1)))
    usage_record(meter=meter, tokens=10, cost=Decimal("0.5"))
    usage_record(meter=meter, tokens=-10, cost=Decimal("-0.5"))
    used = usage_current(scope=f"app:{meter.app_id}")
    assert (used["tokens_per_day"], used["cost_per_day"]) == (10, Decimal("0.5000"))
    assert _refusal(meter).budget is True


def test_memory_counters_drop_only_expired_entries_when_they_grow_past_their_bound(monkeypatch):
    clock = _clock(monkeypatch, "2026-12-02T10:00:20")
    counters = MemoryCounters()
    counters.add([("live", 5, 3600)])
    counters.add([(f"old-{i}", 1, 10) for i in range(100_000)])
    clock.now += 11  # the 100,000 entries have expired; the live one has not
    counters.add([("new", 1, 60)])
    assert len(counters._values) == 2
    assert counters.read(["live", "new", "old-1"]) == [5, 1, 0]


def test_a_counter_is_gone_at_its_expiry_and_the_next_amount_starts_it_over(monkeypatch):
    clock = _clock(monkeypatch, "2026-12-02T10:00:20")
    counters = MemoryCounters()
    counters.add([("k", 5, 10)])
    clock.now += 9
    assert counters.read(["k"]) == [5]
    clock.now += 1  # its ten seconds are over
    assert counters.read(["k"]) == [0]
    counters.add([("k", 1, 10)])
    assert counters.read(["k"]) == [1]
    assert counters.check([("k", 2, True, 10)]) == 0 and counters.read(["k"]) == [2]
    assert counters.check([("k", 2, True, 10)]) == 1 and counters.read(["k"]) == [2]
    clock.now += 10
    assert counters.check([("k", 1, True, 10)]) == 0  # expired: counted from zero again, not refused
    assert counters.read(["k"]) == [1]


def test_limits_are_read_from_the_row_and_a_key_adds_its_own_scope():
    app = SimpleNamespace(pk=uuid.uuid4(), requests_per_minute=3, tokens_per_minute=None, tokens_per_day=0,
                          tokens_per_month=7, cost_per_day=None, cost_per_month=Decimal("1.5"))
    limits = Limits.of(app)
    assert limits == Limits(requests_per_minute=3, tokens_per_month=7, cost_per_month=Decimal("1.5"))
    assert not Limits() and Limits(cost_per_day=Decimal("0.01")) and Limits(tokens_per_month=1)
    keyed = Meter.of_app(app, key_id="k1", key_limits=Limits(requests_per_minute=1))
    assert keyed.scopes() == [(f"app:{app.pk}", limits), ("key:k1", Limits(requests_per_minute=1))]
    assert Meter.of_app(app, key_id="k2").scopes() == [(f"app:{app.pk}", limits), ("key:k2", Limits())]
    assert Meter.of_app(app).scopes() == [(f"app:{app.pk}", limits)]


def test_the_usage_of_a_scope_never_used_is_zero(monkeypatch):
    _clock(monkeypatch, "2026-12-02T10:00:20")
    assert usage_current(scope=f"app:{uuid.uuid4()}") == {
        "requests_per_minute": 0, "tokens_per_minute": 0, "tokens_per_day": 0, "tokens_per_month": 0,
        "cost_per_day": Decimal("0.0000"), "cost_per_month": Decimal("0.0000")}


def test_the_refusal_names_the_limit_whose_it_is_and_the_wait(monkeypatch):
    _clock(monkeypatch, "2026-12-02T10:00:20")
    keyed = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(requests_per_minute=5), key_id=str(uuid.uuid4()),
                  key_limits=Limits(requests_per_minute=1))
    usage_check(meter=keyed)
    assert str(_refusal(keyed)) == (
        "The limit of requests per minute of this API key is reached; try again in 40 seconds.")
    app_only = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(tokens_per_day=1))
    usage_record(meter=app_only, tokens=1, cost=Decimal(0))
    assert str(_refusal(app_only)) == "The limit of tokens per day of this app is reached; try again in 50380 seconds."


@pytest.fixture
def local_time_tokyo():
    """The process's local time 9 hours ahead of UTC (as TIME_ZONE=Asia/Tokyo makes it): periods stay UTC."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.mark.usefixtures("local_time_tokyo")
def test_days_and_months_are_utc_whatever_the_servers_local_time(monkeypatch):
    _clock(monkeypatch, "2026-12-31T23:59:30")  # already 08:59:30 on 1 January in Tokyo
    for limit in ("tokens_per_day", "tokens_per_month"):
        meter = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(**{limit: 1}))
        usage_record(meter=meter, tokens=1, cost=Decimal(0))
        assert _refusal(meter).retry_after == 30


def test_a_free_call_adds_no_cost_and_a_cost_without_tokens_is_still_counted(monkeypatch):
    _clock(monkeypatch, "2026-12-02T10:00:20")
    meter = Meter(app_id=str(uuid.uuid4()), app_limits=Limits(cost_per_day=COST_UNIT))  # the smallest budget
    for cost in (Decimal(0), None):
        usage_record(meter=meter, tokens=5, cost=cost)
    usage_check(meter=meter)  # an unpriced model's calls cost nothing
    assert usage_current(scope=f"app:{meter.app_id}")["tokens_per_day"] == 10
    usage_record(meter=meter, tokens=0, cost=Decimal("0.5"))
    assert usage_current(scope=f"app:{meter.app_id}")["cost_per_day"] == Decimal("0.5000")
    assert _refusal(meter).budget is True
