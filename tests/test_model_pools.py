"""Model pools end to end: real HTTP fake upstreams on their own ports (healthy, always 500, 429, a closed port, slow
to first byte) behind one route, through the run service, the Dify API, the REST API and the WebSocket."""
from __future__ import annotations

import json
import random
import socket

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections
from django.test import override_settings
from rest_framework.authtoken.models import Token

from agentcore.events import RunError
from agentcore.models import AgentApp, Message, Session
from agentcore.routing import websocket_application
from agentcore.runs import TurnOverrides, TurnRequest
from agentcore.tests.factories import run_all
from difyapi.auth import api_key_create
from llmconfigs.errors import ProviderCallError
from llmconfigs.models import LLMConfig
from tests.e2e.dify_servers import dify_post
from tests.fakes.upstream import FakeUpstream, Reply
from tests.fixtures import client_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def _close_worker_connections():
    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture(scope="module")
def _extra_servers():
    servers = [FakeUpstream().start() for _ in range(4)]
    yield servers
    for server in servers:
        server.stop()


class Upstreams:
    """The pool's members' endpoints: `healthy` (the shared fake), `second` (healthy too), `broken` (always 500),
    `limited` (always 429), `slow` (first byte after 3 s) and `closed` (nothing listens)."""

    def __init__(self, healthy: FakeUpstream, servers: list[FakeUpstream]):
        self.healthy = healthy
        self.second, self.broken, self.limited, self.slow = servers
        for server in servers:
            server.reset()
        self.broken.default = Reply(status=500, error_message="upstream exploded")
        self.limited.default = Reply(status=429, error_message="Rate limit reached")
        self.slow.default = Reply(text="late answer", first_delay=3)
        self.second.default = Reply(text="Second answers.")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"


@pytest.fixture
def upstreams(fake_upstream, _extra_servers):
    fake_upstream.default = Reply(text="Healthy answers.")
    return Upstreams(fake_upstream, _extra_servers)


@pytest.fixture
def member(make_llm_config):
    def make(name: str, base_url, *, route: str = "pool-m", **fields) -> LLMConfig:
        url = base_url if isinstance(base_url, str) else base_url.base_url
        return make_llm_config(name=name, model_name=f"{name}-model", route=route, base_url=url, **fields)

    return make


@pytest.fixture
def chat_app(default_llm_config):
    return AgentApp.objects.create(name="Chat", mode=AgentApp.Mode.CHAT, system_prompt="Answer briefly.")


async def _turn(app, user, model: str = "pool-m") -> list:
    return await run_all(TurnRequest(app=app, query="hi", owner=user, overrides=TurnOverrides(model=model)))


async def test_twenty_requests_to_a_pool_are_all_answered_by_healthy_members(chat_app, plain_user, upstreams, member):
    await database_sync_to_async(member)("healthy", upstreams.healthy)
    await database_sync_to_async(member)("second", upstreams.second)
    await database_sync_to_async(member)("broken", upstreams.broken)
    await database_sync_to_async(member)("limited", upstreams.limited)
    await database_sync_to_async(member)("closed", upstreams.closed)
    for _ in range(20):
        events = await _turn(chat_app, plain_user)
        assert events[-1].status == "normal", events[-1]
        assert events[-1].answer in ("Healthy answers.", "Second answers.")
    # A failing member costs at most LLM_COOLDOWN_FAILURES calls per cooldown window, a 429 one.
    assert len(upstreams.broken.chat_requests) <= 3
    assert len(upstreams.limited.chat_requests) <= 1
    served = await sync_to_async(lambda: set(Message.objects.values_list("llm_config__name", flat=True)))()
    assert served <= {"healthy", "second"}
    closed = await LLMConfig.objects.aget(name="closed")
    assert closed.error_count <= 3 and closed.usage_count == closed.error_count


async def test_weights_three_to_one_split_400_requests_75_25_within_5_percent(upstreams, member):
    from agentcore.runs.chat_models import _http_clients_for_this_loop
    from llmconfigs.factory import chat_model
    from llmconfigs.routing import PoolChatModel
    from llmconfigs.selectors import llm_pool_resolve

    await database_sync_to_async(member)("heavy", upstreams.healthy, weight=3)
    await database_sync_to_async(member)("light", upstreams.second, weight=1)
    _http_clients_for_this_loop()  # the provider clients of an earlier test's event loop cannot serve this one
    random.seed(3)
    for _ in range(400):
        pool = await database_sync_to_async(llm_pool_resolve)(model="pool-m")
        model = PoolChatModel(members=pool, build=lambda config, last: chat_model(config, streaming=True))
        await model.ainvoke("hi")
    heavy, light = len(upstreams.healthy.chat_requests), len(upstreams.second.chat_requests)
    assert heavy + light == 400
    assert abs(heavy / 400 - 0.75) <= 0.05, (heavy, light)


async def test_failover_is_recorded_on_the_message_and_counted_on_each_config(chat_app, plain_user, upstreams,
                                                                             member, user_client):
    await database_sync_to_async(member)("dead", upstreams.closed, priority=1)
    await database_sync_to_async(member)("alive", upstreams.healthy)
    events = await _turn(chat_app, plain_user)
    assert events[-1].status == "normal" and events[-1].answer == "Healthy answers."
    message = await Message.objects.select_related("llm_config").aget(pk=events[0].message_id)
    assert (message.llm_config.name, message.model_name) == ("alive", "alive-model")
    assert [(a["config_name"], a["category"]) for a in message.attempts] == [("dead", "unreachable"), ("alive", "")]
    assert all(a["latency_ms"] >= 0 for a in message.attempts)
    dead, alive = await LLMConfig.objects.aget(name="dead"), await LLMConfig.objects.aget(name="alive")
    assert (dead.usage_count, dead.error_count, dead.last_error.split(":")[0]) == (1, 1, "unreachable")
    assert (alive.usage_count, alive.error_count) == (1, 0)

    # The REST message list and the admin show the attempts.
    client = await sync_to_async(client_for)(plain_user)
    listing = await sync_to_async(client.get)(f"/api/sessions/{events[0].session_id}/messages/")
    attempts = listing.json()["results"][0]["attempts"]
    assert [a["category"] for a in attempts] == ["unreachable", ""]


async def test_admin_shows_the_model_calls_of_a_message(chat_app, plain_user, upstreams, member, admin_client):
    await database_sync_to_async(member)("dead", upstreams.closed, priority=1)
    await database_sync_to_async(member)("alive", upstreams.healthy)
    events = await _turn(chat_app, plain_user)
    html = (await sync_to_async(admin_client.get)(
        f"/admin/agentcore/message/{events[0].message_id}/change/")).content.decode()
    assert "Model calls" in html and "unreachable" in html and "answered" in html


@override_settings(LLM_FIRST_TOKEN_TIMEOUT=0.5)
async def test_a_member_slow_to_its_first_token_hands_the_request_on(chat_app, plain_user, upstreams, member):
    await database_sync_to_async(member)("slow", upstreams.slow, priority=1)
    await database_sync_to_async(member)("alive", upstreams.healthy)
    events = await _turn(chat_app, plain_user)
    assert events[-1].status == "normal" and events[-1].answer == "Healthy answers."
    message = await Message.objects.aget(pk=events[0].message_id)
    assert [(a["config_name"], a["category"]) for a in message.attempts] == [("slow", "timeout"), ("alive", "")]
    assert message.attempts[0]["latency_ms"] < 2000


@override_settings(LLM_FIRST_TOKEN_TIMEOUT=0.5)
async def test_a_member_reasoning_before_its_answer_has_answered_and_keeps_the_request(chat_app, plain_user,
                                                                                       upstreams, member):
    # Reasoning models stream their reasoning first, for longer than the first-token timeout: it is their first token.
    await database_sync_to_async(member)("thinker", upstreams.second, priority=1)
    await database_sync_to_async(member)("alive", upstreams.healthy)
    upstreams.second.script(Reply(text="Thought it through.", reasoning=["Let me ", "think."], reasoning_delay=1.0))
    events = await _turn(chat_app, plain_user)
    assert events[-1].status == "normal" and events[-1].answer == "Thought it through."
    assert upstreams.healthy.chat_requests == []
    message = await Message.objects.aget(pk=events[0].message_id)
    assert [(a["config_name"], a["category"]) for a in message.attempts] == [("thinker", "")]


async def test_the_last_member_gets_the_full_timeout(chat_app, plain_user, upstreams, member):
    await database_sync_to_async(member)("slow", upstreams.slow)
    with override_settings(LLM_FIRST_TOKEN_TIMEOUT=0.5):
        events = await _turn(chat_app, plain_user)
    assert events[-1].status == "normal" and events[-1].answer == "late answer"


async def test_after_the_first_token_nothing_is_retried(chat_app, plain_user, upstreams, member):
    await database_sync_to_async(member)("cut", upstreams.second, priority=1)
    await database_sync_to_async(member)("alive", upstreams.healthy)
    upstreams.second.script(Reply(text="alpha beta gamma delta", cut_after=2))
    events = await _turn(chat_app, plain_user)
    assert isinstance(events[-1], RunError)
    assert upstreams.healthy.chat_requests == []
    message = await Message.objects.aget(pk=events[0].message_id)
    assert (message.status, message.answer) == ("error", "alpha beta ")


async def test_priority_order_keeps_the_backup_idle_while_the_main_member_answers(chat_app, plain_user, upstreams,
                                                                                 member):
    await database_sync_to_async(member)("main", upstreams.second, priority=10)
    await database_sync_to_async(member)("backup", upstreams.healthy, weight=50)
    for _ in range(5):
        assert (await _turn(chat_app, plain_user))[-1].answer == "Second answers."
    assert upstreams.healthy.chat_requests == []


async def test_a_member_after_a_failover_is_called_with_its_own_settings(chat_app, plain_user, upstreams, member):
    # The first member's own temperature and max_tokens are its settings, not the request's: the member that answers
    # after it uses its own. What the request asks for goes to every member.
    await database_sync_to_async(member)("dead", upstreams.closed, priority=1, temperature=0.2, max_tokens=50)
    await database_sync_to_async(member)("alive", upstreams.healthy, temperature=0.9, max_tokens=300)
    assert (await _turn(chat_app, plain_user))[-1].answer == "Healthy answers."
    sent = upstreams.healthy.chat_requests[-1].body
    assert (sent["temperature"], sent.get("max_completion_tokens", sent.get("max_tokens"))) == (0.9, 300)

    events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user,
                                       overrides=TurnOverrides(model="pool-m", temperature=0.5)))
    assert events[-1].answer == "Healthy answers."
    sent = upstreams.healthy.chat_requests[-1].body
    assert (sent["temperature"], sent.get("max_completion_tokens", sent.get("max_tokens"))) == (0.5, 300)


async def test_a_last_member_that_refuses_the_requested_parameters_leaves_the_last_call_s_error(
        chat_app, plain_user, upstreams, member):
    # temperature 1.5 suits the first member (OpenAI: 0-2), not the last (Moonshot: 0-1), which is never called:
    # the turn's error is the first member's, not an internal error.
    await database_sync_to_async(member)("dead", upstreams.closed, priority=1)
    await database_sync_to_async(member)("narrow", upstreams.healthy, provider="moonshot")
    events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user,
                                       overrides=TurnOverrides(model="pool-m", temperature=1.5)))
    assert isinstance(events[-1], RunError) and events[-1].category == "unreachable", events[-1]
    assert upstreams.healthy.chat_requests == []
    message = await Message.objects.aget(pk=events[0].message_id)
    assert [(a["config_name"], a["category"]) for a in message.attempts] == [("dead", "unreachable"),
                                                                               ("narrow", "bad_request")]


async def test_a_refused_key_is_marked_auth_failed_and_left_out(chat_app, plain_user, upstreams, member):
    refused = await database_sync_to_async(member)("refused", upstreams.second, priority=1)
    await database_sync_to_async(member)("alive", upstreams.healthy)
    upstreams.second.default = Reply(status=401, error_message="Incorrect API key provided: {api_key}")
    for _ in range(3):
        assert (await _turn(chat_app, plain_user))[-1].answer == "Healthy answers."
    assert len(upstreams.second.chat_requests) == 1
    fresh = await LLMConfig.objects.aget(pk=refused.pk)
    assert fresh.auth_failed_at is not None and refused.api_key not in fresh.last_error


async def test_a_lone_refused_config_is_still_tried_and_an_answer_brings_it_back(chat_app, plain_user, upstreams,
                                                                               member):
    from llmconfigs.routing import provider_failure_record

    refused = await database_sync_to_async(member)("refused", upstreams.healthy)
    await database_sync_to_async(provider_failure_record)(
        config=refused, error=ProviderCallError("auth", "Incorrect API key", status_code=401))
    events = await _turn(chat_app, plain_user)
    assert events[-1].status == "normal" and events[-1].answer == "Healthy answers."
    assert (await LLMConfig.objects.aget(pk=refused.pk)).auth_failed_at is None


async def test_the_default_pool_spreads_over_its_members(plain_user, upstreams, make_llm_config):
    main = await database_sync_to_async(make_llm_config)(name="main", model_name="shared", default=True,
                                                         base_url=upstreams.healthy.base_url)
    await database_sync_to_async(make_llm_config)(name="twin", model_name="twin-model", route="shared",
                                                  base_url=upstreams.second.base_url)
    app = await AgentApp.objects.acreate(name="Default pool", mode=AgentApp.Mode.CHAT)
    answers = {(await run_all(TurnRequest(app=app, query="hi", owner=plain_user)))[-1].answer for _ in range(16)}
    assert answers == {"Healthy answers.", "Second answers."}
    assert main.route_name == "shared"


# ----- every member down: the last attempt's error, in each surface's format -----

@pytest.fixture
def pool_down(upstreams, make_llm_config):
    """The default config's pool: one member answering 500, one on a closed port (tried last)."""
    make_llm_config(name="down-a", model_name="down", default=True, base_url=upstreams.broken.base_url, priority=1)
    make_llm_config(name="down-b", model_name="down", base_url=upstreams.closed)
    return upstreams


async def test_all_members_down_gives_difys_error_envelope(pool_down):
    app = await AgentApp.objects.acreate(name="Dify", mode=AgentApp.Mode.CHAT)
    _, key = await sync_to_async(api_key_create)(app=app)
    status, _, raw = await dify_post(key, "/v1/chat-messages",
                                     {"inputs": {}, "query": "hi", "user": "u", "response_mode": "blocking"})
    data = json.loads(raw)
    assert (status, set(data)) == (400, {"code", "message", "status"})
    assert data["code"] == "completion_request_error"
    assert "Could not reach the model provider" in data["message"]  # the closed port, tried last


async def test_all_members_down_gives_the_rest_error(pool_down, plain_user):
    await AgentApp.objects.acreate(name="Rest", mode=AgentApp.Mode.CHAT)
    client = await sync_to_async(client_for)(plain_user)
    response = await sync_to_async(client.post)("/api/agent/chat/", {"message": "hi"}, format="json")
    assert response.status_code == 200
    data = response.json()
    assert data["status"] == "error" and data["error"]["category"] == "unreachable"


async def test_all_members_down_gives_a_websocket_error_event(pool_down, plain_user):
    app = await AgentApp.objects.acreate(name="Socket", mode=AgentApp.Mode.CHAT)
    session = await Session.objects.acreate(app=app, owner=plain_user)
    token = await Token.objects.acreate(user=plain_user)
    communicator = WebsocketCommunicator(websocket_application, f"/ws/agent/sessions/{session.id}/?token={token.key}")
    assert (await communicator.connect(timeout=10))[0]
    await communicator.send_json_to({"type": "chat", "message": "hi"})
    events = []
    while not events or events[-1]["type"] != "end":
        events.append(await communicator.receive_json_from(timeout=10))
    await communicator.disconnect()
    error = next(e for e in events if e["type"] == "error")
    assert error["category"] == "unreachable"
    assert events[-1]["status"] == "error"


def test_title_and_suggested_question_calls_are_counted_on_their_configs(upstreams, member, plain_user):
    from agentcore.generation import message_suggested_questions, session_generate_name

    dead = member("dead", upstreams.closed, priority=1)
    alive = member("alive", upstreams.healthy)
    app = AgentApp.objects.create(name="Titles", mode=AgentApp.Mode.CHAT, llm_config=dead)
    session = Session.objects.create(app=app, owner=plain_user)
    message = Message.objects.create(session=session, query="How is the disk?", answer="Fine.", status="normal")
    upstreams.healthy.script(Reply(text="Disk check", prompt_tokens=7, completion_tokens=2),
                             Reply(text='["a?", "b?", "c?"]', prompt_tokens=5, completion_tokens=3))
    assert session_generate_name(session=session) == "Disk check"
    assert message_suggested_questions(message=message) == ["a?", "b?", "c?"]
    dead.refresh_from_db()
    alive.refresh_from_db()
    assert (dead.usage_count, dead.error_count) == (2, 2)
    assert (alive.usage_count, alive.error_count, alive.prompt_tokens_total, alive.completion_tokens_total) == (
        2, 0, 12, 5)


async def test_a_key_echoed_by_a_failing_member_is_stored_nowhere(chat_app, plain_user, upstreams, member):
    from llmconfigs.models import AuditLog

    echoing = await database_sync_to_async(member)("echoing", upstreams.second, priority=1)
    await database_sync_to_async(member)("alive", upstreams.healthy)
    upstreams.second.default = Reply(status=429, error_message="Rate limit for {api_key} ({authorization})")
    events = await _turn(chat_app, plain_user)
    assert events[-1].answer == "Healthy answers."
    assert upstreams.second.chat_requests[0].api_key == echoing.api_key  # the attack was real
    fresh = await LLMConfig.objects.aget(pk=echoing.pk)
    message = await Message.objects.aget(pk=events[0].message_id)
    audits = await sync_to_async(lambda: json.dumps(list(AuditLog.objects.values_list("changes", flat=True))))()
    for stored in (fresh.last_error, json.dumps(message.attempts), audits):
        assert echoing.api_key not in stored
    assert fresh.last_error.startswith("rate_limit: Rate limit for ")


async def test_members_that_all_refuse_before_any_call_end_the_turn_with_a_clear_refusal(chat_app, plain_user,
                                                                                        upstreams, member):
    # The first member's key was entered for another endpoint (refused before any call); the last one's provider
    # (Moonshot: 0-1) refuses temperature 1.5: no call was made, and the turn says why instead of an internal error.
    moved = await database_sync_to_async(member)("moved", upstreams.healthy, priority=1)
    await LLMConfig.objects.filter(pk=moved.pk).aupdate(api_key_origin="https://elsewhere.example")
    await database_sync_to_async(member)("narrow", upstreams.healthy, provider="moonshot")
    events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user,
                                       overrides=TurnOverrides(model="pool-m", temperature=1.5)))
    error = events[-1]
    assert isinstance(error, RunError) and error.category == "bad_request", error
    assert "temperature" in error.message
    assert upstreams.healthy.chat_requests == []
