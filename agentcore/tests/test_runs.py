"""The run service: text turns, streaming without buffering, model selection, usage, errors, stop and disconnect."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from channels.db import database_sync_to_async
from django.test import override_settings
from django.utils import timezone

from agentcore.errors import InvalidInput, SessionNotFound, TooManyActiveRuns
from agentcore.events import RunEnd, RunError, RunStarted, TextDelta, Usage
from agentcore.models import AgentApp, Message, Session
from agentcore.runs import (
    Attachment,
    TurnOverrides,
    TurnRequest,
    aturn_prepare,
    run_stop,
    turn_abandon,
    turn_prepare_and_run,
    turn_run,
)
from agentcore.services import session_create
from agentcore.tests.factories import run_all, types
from llmconfigs.errors import ConfigNotFound, InvalidParameter, NoUsableConfig
from llmconfigs.models import LLMConfig
from tests.fakes.upstream import Reply, ToolCall

pytestmark = pytest.mark.django_db(transaction=True)


async def test_chat_turn_streams_and_saves_the_message(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="Disk usage is fine.", prompt_tokens=11, completion_tokens=4))
    events = await run_all(TurnRequest(app=chat_app, query="How is the disk?", owner=plain_user))
    # The upstream's chunks that arrive together go out as one delta: one or more, by the network's timing.
    assert [t for i, t in enumerate(types(events)) if t != "delta" or types(events)[i - 1] != "delta"] == [
        "run_started", "delta", "usage", "end"]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Disk usage is fine."
    end = events[-1]
    assert isinstance(end, RunEnd) and end.status == "normal" and end.answer == "Disk usage is fine."
    usage = events[-2]
    assert isinstance(usage, Usage) and (usage.prompt_tokens, usage.completion_tokens) == (11, 4)
    message = await Message.objects.aget(pk=end.message_id)
    assert (message.status, message.answer, message.total_tokens) == ("normal", "Disk usage is fine.", 15)
    session = await Session.objects.aget(pk=events[0].session_id)
    assert session.owner_id == plain_user.pk and session.name == "How is the disk?"
    sent = fake_upstream.chat_requests[-1]
    assert sent.messages[0] == {"role": "system", "content": "Answer briefly."}
    assert sent.messages[-1]["content"] == "How is the disk?"
    assert "tools" not in sent.body


async def test_agent_turn_without_tool_calls_answers(agent_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="All good."))
    events = await run_all(TurnRequest(app=agent_app, query="status?", owner=plain_user))
    assert isinstance(events[0], RunStarted)
    assert events[-1].status == "normal" and events[-1].answer == "All good."
    assert "thought" in types(events)
    assert fake_upstream.chat_requests[-1].body["tools"]


class _Sent(str):
    """A statement as sent, and whether it went inside a transaction (a Django atomic block)."""
    in_transaction: bool


@contextlib.contextmanager
def _statements_sent() -> Iterator[list[_Sent]]:
    """Every statement sent while the block runs, from any thread (a run writes from the ORM's thread)."""
    from django.db.backends.utils import CursorWrapper

    sent: list[_Sent] = []
    execute = CursorWrapper.execute

    def recorded(self, sql, params=None):
        statement = _Sent(" ".join(str(sql).split()))
        statement.in_transaction = self.db.in_atomic_block
        sent.append(statement)
        return execute(self, sql, params)

    CursorWrapper.execute = recorded
    try:
        yield sent
    finally:
        CursorWrapper.execute = execute


async def test_an_agent_answers_thought_row_is_written_with_the_turns_end(agent_app, plain_user, fake_upstream):
    """The answer's thought row goes out with the turn's end (RunOutput._save_rows): after the message's update in
    the same block, and on PostgreSQL inside its one statement, never as a write of its own before it."""
    from django.db import connection

    from agentcore.models import Thought

    fake_upstream.script(Reply(text="All good."))
    with _statements_sent() as sent:
        events = await run_all(TurnRequest(app=agent_app, query="status?", owner=plain_user))

    assert events[-1].answer == "All good."
    thought = await Thought.objects.aget(message_id=events[-1].message_id)
    assert (thought.thought, thought.status) == ("All good.", Thought.Status.DONE)
    inserts = [i for i, sql in enumerate(sent) if 'INSERT INTO "agentcore_thought"' in sql]
    updates = [i for i, sql in enumerate(sent) if 'UPDATE "agentcore_message"' in sql]
    assert len(inserts) == 1 and updates
    if connection.vendor == "postgresql":
        assert sent[inserts[0]].startswith("WITH ") and inserts[0] in updates
    else:
        assert inserts[0] > updates[-1]


async def test_a_tool_results_thought_row_is_updated_and_its_event_made_without_reading_it_back(
        agent_app, plain_user, fake_upstream):
    """The run keeps the tool call rows it wrote: a tool's result updates its row and the event comes from the row
    in memory, without a query reading the row back (one database round trip fewer per tool step)."""
    from agentcore.events import ThoughtUpdate
    from agentcore.models import Thought

    fake_upstream.script(Reply(text="Let me look.", tool_calls=[ToolCall("current_time", {"timezone": "UTC"})]),
                         Reply(text="It is noon."))
    with _statements_sent() as sent:
        events = await run_all(TurnRequest(app=agent_app, query="what time?", owner=plain_user))

    assert events[-1].answer == "Let me look.\nIt is noon."
    [result] = [e for e in events if isinstance(e, ThoughtUpdate) and e.phase == "tool_result"]
    row = await Thought.objects.aget(pk=result.thought_id)
    assert (result.position, result.thought, result.tool, result.tool_input, result.observation, result.status) == (
        row.position, row.thought, row.tool, row.tool_input, row.observation, row.status)
    assert (row.thought, row.tool, row.tool_input, row.status) == ("Let me look.", "current_time", {"timezone": "UTC"},
                                                                   "done")
    assert '"timezone": "UTC"' in row.observation
    assert not [sql for sql in sent if sql.startswith("SELECT") and 'FROM "agentcore_thought"' in sql]


async def test_a_tool_steps_rows_go_out_without_a_transaction_and_its_results_in_one_write(
        agent_app, plain_user, fake_upstream):
    """A tool step's call rows are one INSERT with no transaction around it (a statement is atomic by itself), and
    the step's results are written together: one statement on PostgreSQL, one transaction elsewhere. What a client
    reads back is unchanged: each row with its call, result and status."""
    from django.db import connection

    from agentcore.models import Thought

    fake_upstream.script(
        Reply(text="Two checks.", tool_calls=[ToolCall("current_time", {"timezone": "UTC"}),
                                              ToolCall("current_time", {"timezone": "Asia/Tokyo"})]),
        Reply(text="Done."))
    with _statements_sent() as sent:
        events = await run_all(TurnRequest(app=agent_app, query="what time?", owner=plain_user))

    assert events[-1].answer == "Two checks.\nDone."
    rows = [t async for t in Thought.objects.filter(message_id=events[-1].message_id).order_by("position")]
    assert [(r.tool, r.tool_input, r.status) for r in rows] == [
        ("current_time", {"timezone": "UTC"}, "done"), ("current_time", {"timezone": "Asia/Tokyo"}, "done"),
        ("", {}, "done")]
    assert '"timezone": "UTC"' in rows[0].observation and "Asia/Tokyo" in rows[1].observation
    step_insert = next(s for s in sent if 'INSERT INTO "agentcore_thought"' in s)  # the answer's comes at the end
    assert step_insert.startswith("INSERT") and not step_insert.in_transaction
    updates = [s for s in sent if 'UPDATE "agentcore_thought"' in s]
    if connection.vendor == "postgresql":
        assert len(updates) == 1 and updates[0].startswith("WITH ")
    else:
        assert len(updates) == 2 and all(u.in_transaction for u in updates)


async def _cancelled_after_two_deltas(request: TurnRequest, *, starting: str = "") -> list:
    """The events a consumer saw before it was cancelled (a client gone) at the second text delta starting with
    `starting`."""
    seen: list = []
    two_deltas = asyncio.Event()

    async def consume():
        async for event in turn_prepare_and_run(request):
            seen.append(event)
            if len([e for e in seen if isinstance(e, TextDelta) and e.text.startswith(starting)]) == 2:
                two_deltas.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(two_deltas.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return seen


async def test_second_turn_sees_the_history(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="First answer."), Reply(text="Second answer."))
    first = await run_all(TurnRequest(app=chat_app, query="one", owner=plain_user))
    await run_all(TurnRequest(app=chat_app, query="two", owner=plain_user, session_id=first[0].session_id))
    contents = [m["content"] for m in fake_upstream.chat_requests[-1].messages]
    assert contents == ["Answer briefly.", "one", "First answer.", "two"]


async def test_each_upstream_chunk_becomes_a_delta_at_once(chat_app, plain_user, fake_upstream):
    import time

    fake_upstream.script(Reply(text="one two three four five", delay=0.3))
    started = time.monotonic()
    first_delta_at = None
    streams_open_at_first_delta = None
    async for event in turn_prepare_and_run(TurnRequest(app=chat_app, query="count", owner=plain_user)):
        if isinstance(event, TextDelta) and first_delta_at is None:
            first_delta_at = time.monotonic() - started
            streams_open_at_first_delta = fake_upstream.active_streams
    total = time.monotonic() - started
    assert total >= 1.2  # four gaps of 0.3 s
    assert first_delta_at < 0.6, first_delta_at
    assert streams_open_at_first_delta == 1  # the upstream was still sending when the first delta arrived


def test_text_deltas_waiting_together_are_handed_out_as_one_in_order():
    from agentcore.runs.lifecycle import _EventQueue

    other = object()  # any other event: a thought, an approval
    queue = _EventQueue()
    for item in (TextDelta("a"), TextDelta("b"), TextDelta("c"), other, TextDelta("d"), TextDelta("e", position=2),
                 TextDelta("f", position=2)):
        queue.put_nowait(item)
    taken = []
    while not queue.empty():
        taken.append(queue.get_nowait())
    assert taken == [TextDelta("abc"), other, TextDelta("d"), TextDelta("ef", position=2)]


async def test_session_model_and_parameters_reach_the_upstream(chat_app, plain_user, fake_upstream,
                                                               make_llm_config):
    config = await database_sync_to_async(make_llm_config)(name="session-model", model_name="session-model-v1")
    session = await database_sync_to_async(session_create)(
        app=chat_app, owner=plain_user, llm_config_id=str(config.pk),
        model_parameters={"temperature": 0.2, "max_tokens": 64},
    )
    events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user, session_id=str(session.pk)))
    body = fake_upstream.chat_requests[-1].body
    assert body["model"] == "session-model-v1"
    assert body["temperature"] == 0.2 and body["max_completion_tokens"] == 64
    assert fake_upstream.chat_requests[-1].api_key == config.api_key
    assert events[0].llm_config_id == str(config.pk)
    message = await Message.objects.aget(pk=events[-1].message_id)
    assert message.llm_config_id == config.pk and message.model_parameters["temperature"] == 0.2


async def test_turn_overrides_win_over_the_session(chat_app, plain_user, fake_upstream, make_llm_config):
    session_config = await database_sync_to_async(make_llm_config)(name="session-model")
    turn_config = await database_sync_to_async(make_llm_config)(name="turn-model", model_name="turn-model-v2")
    session = await database_sync_to_async(session_create)(
        app=chat_app, owner=plain_user, llm_config_id=str(session_config.pk),
        model_parameters={"temperature": 0.2},
    )
    await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user, session_id=str(session.pk),
                              overrides=TurnOverrides(model="turn-model", temperature=0.9, top_p=0.5)))
    body = fake_upstream.chat_requests[-1].body
    assert body["model"] == "turn-model-v2" and body["temperature"] == 0.9 and body["top_p"] == 0.5
    assert turn_config.pk


async def test_bad_override_is_a_field_error_and_writes_nothing(chat_app, plain_user, fake_upstream):
    with pytest.raises(InvalidParameter) as caught:
        await aturn_prepare(TurnRequest(app=chat_app, query="hi", owner=plain_user,
                                       overrides=TurnOverrides(temperature=7)))
    assert caught.value.field == "temperature"
    with pytest.raises(ConfigNotFound) as caught:
        await aturn_prepare(TurnRequest(app=chat_app, query="hi", owner=plain_user,
                                       overrides=TurnOverrides(config_id=str(uuid.uuid4()))))
    assert caught.value.field == "model_config_id"
    with pytest.raises(InvalidInput) as caught:
        await aturn_prepare(TurnRequest(app=chat_app, query="  ", owner=plain_user))
    assert caught.value.field == "query"
    assert await Session.objects.acount() == 0 and await Message.objects.acount() == 0
    assert fake_upstream.chat_requests == []


async def test_no_config_at_all_is_refused(db_app_without_config, plain_user):
    with pytest.raises(NoUsableConfig):
        await aturn_prepare(TurnRequest(app=db_app_without_config, query="hi", owner=plain_user))


@pytest.fixture
def db_app_without_config(transactional_db):
    return AgentApp.objects.create(name="Bare", mode=AgentApp.Mode.CHAT)


async def test_sessions_are_isolated_between_users(chat_app, plain_user, staff_user, django_user_model,
                                                   fake_upstream):
    events = await run_all(TurnRequest(app=chat_app, query="mine", owner=plain_user))
    session_id = events[0].session_id
    bob = await django_user_model.objects.acreate(username="bob")
    with pytest.raises(SessionNotFound):
        await aturn_prepare(TurnRequest(app=chat_app, query="theirs", owner=bob, session_id=session_id))
    with pytest.raises(SessionNotFound):
        await aturn_prepare(TurnRequest(app=chat_app, query="api", end_user="alice", source="api",
                                       session_id=session_id))
    staff_events = await run_all(TurnRequest(app=chat_app, query="staff", owner=staff_user,
                                             session_id=session_id))
    assert staff_events[-1].status == "normal"


async def test_api_sessions_are_scoped_to_app_and_end_user(chat_app, fake_upstream):
    events = await run_all(TurnRequest(app=chat_app, query="hi", end_user="u-1", source="api"))
    session_id = events[0].session_id
    with pytest.raises(SessionNotFound):
        await aturn_prepare(TurnRequest(app=chat_app, query="x", end_user="u-2", source="api",
                                       session_id=session_id))
    again = await run_all(TurnRequest(app=chat_app, query="x", end_user="u-1", source="api",
                                      session_id=session_id))
    assert again[0].session_id == session_id


@pytest.mark.parametrize(
    ("reply", "category"),
    [
        (Reply(status=401, error_message="Incorrect API key provided: {api_key}"), "auth"),
        (Reply(status=429, error_message="Rate limit reached for {api_key}"), "rate_limit"),
        (Reply(status=500, error_message="upstream exploded"), "upstream_error"),
    ],
)
async def test_upstream_http_errors_end_the_turn_with_a_clean_error(chat_app, plain_user, fake_upstream,
                                                                    default_llm_config, reply, category):
    fake_upstream.script(reply)
    events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user))
    assert types(events) == ["run_started", "usage", "error"]
    error = events[-1]
    assert isinstance(error, RunError) and error.category == category
    assert default_llm_config.api_key not in error.message
    message = await Message.objects.aget(pk=events[0].message_id)
    assert message.status == "error" and message.error_category == category
    assert default_llm_config.api_key not in message.error


async def test_cut_stream_keeps_the_partial_answer(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="alpha beta gamma delta", cut_after=2))
    events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user))
    assert isinstance(events[-1], RunError)
    message = await Message.objects.aget(pk=events[0].message_id)
    assert message.status == "error" and message.answer == "alpha beta "


async def test_hanging_upstream_times_out(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="late", hang=5.0))
    with override_settings(LLM_REQUEST_TIMEOUT=0.5):
        events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user))
    assert events[-1].category == "timeout"


async def test_unreachable_upstream(chat_app, plain_user, make_llm_config):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = await database_sync_to_async(make_llm_config)(name="nowhere", base_url=f"http://127.0.0.1:{port}/v1")
    events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user,
                                       overrides=TurnOverrides(config_id=str(config.pk))))
    assert events[-1].category == "unreachable"


async def test_stop_by_task_id_cancels_the_upstream_and_keeps_the_partial_answer(chat_app, plain_user,
                                                                                 fake_upstream, staff_user):
    import time

    fake_upstream.script(Reply(text=" ".join(f"w{i}" for i in range(40)), delay=0.2))
    events = []
    stopped_at = None
    async for event in turn_prepare_and_run(TurnRequest(app=chat_app, query="long", owner=plain_user)):
        events.append(event)
        if len([e for e in events if isinstance(e, TextDelta)]) == 2 and stopped_at is None:
            bob_user = await database_sync_to_async(type(staff_user).objects.create)(username="mallory")
            assert not await run_stop(task_id=events[0].task_id, user=bob_user)
            assert await run_stop(task_id=events[0].task_id, user=plain_user)
            stopped_at = time.monotonic()
    assert time.monotonic() - stopped_at < 1.0
    assert types(events)[-2:] == ["usage", "end"] and events[-1].status == "stopped"
    message = await Message.objects.aget(pk=events[0].message_id)
    assert message.status == "stopped" and message.answer == "w0 w1 "
    for _ in range(20):
        if fake_upstream.cancelled_streams:
            break
        await asyncio.sleep(0.05)
    assert fake_upstream.cancelled_streams == 1 and fake_upstream.active_streams == 0
    assert not await run_stop(task_id=events[0].task_id, user=plain_user)  # no longer running


async def test_client_disconnect_stops_the_run(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text=" ".join(f"w{i}" for i in range(40)), delay=0.2))
    seen = await _cancelled_after_two_deltas(TurnRequest(app=chat_app, query="long", owner=plain_user))
    message = await Message.objects.aget(pk=seen[0].message_id)
    assert message.status == "stopped" and message.answer.startswith("w0 w1 ")
    for _ in range(20):
        if fake_upstream.cancelled_streams:
            break
        await asyncio.sleep(0.05)
    assert fake_upstream.cancelled_streams == 1


async def test_stale_running_message_is_closed_when_the_session_is_next_used(chat_app, plain_user,
                                                                            fake_upstream, settings):
    settings.AGENT_STALE_SWEEP_SECONDS = 0  # every turn sweeps
    events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user))
    session = await Session.objects.aget(pk=events[0].session_id)
    dead = await Message.objects.acreate(session=session, query="lost", status="running",
                                         heartbeat_at=timezone.now() - timedelta(seconds=600))
    alive = await Message.objects.acreate(session=session, query="alive", status="running",
                                          heartbeat_at=timezone.now())
    await run_all(TurnRequest(app=chat_app, query="again", owner=plain_user, session_id=str(session.pk)))
    await dead.arefresh_from_db()
    await alive.arefresh_from_db()
    assert dead.status == "error" and dead.error == "interrupted: the server stopped during this answer"
    assert alive.status == "running"


async def test_a_process_sweeps_for_stale_runs_at_most_every_sweep_interval(chat_app, plain_user,
                                                                           fake_upstream, settings):
    settings.AGENT_STALE_SWEEP_SECONDS = 0
    events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user))  # sweeps now
    session = await Session.objects.aget(pk=events[0].session_id)
    dead = await Message.objects.acreate(session=session, query="lost", status="running",
                                         heartbeat_at=timezone.now() - timedelta(seconds=600))
    settings.AGENT_STALE_SWEEP_SECONDS = 60
    await run_all(TurnRequest(app=chat_app, query="again", owner=plain_user, session_id=str(session.pk)))
    await dead.arefresh_from_db()
    assert dead.status == "running"  # swept less than a minute ago: not looked for
    settings.AGENT_STALE_SWEEP_SECONDS = 0.2
    await asyncio.sleep(0.25)
    await run_all(TurnRequest(app=chat_app, query="once more", owner=plain_user, session_id=str(session.pk)))
    await dead.arefresh_from_db()
    assert dead.status == "error"


async def test_a_turn_rolled_back_does_not_count_as_a_sweep(chat_app, plain_user, fake_upstream, settings):
    settings.AGENT_STALE_SWEEP_SECONDS = 60
    session = await database_sync_to_async(session_create)(app=chat_app, owner=plain_user)
    dead = await Message.objects.acreate(session=session, query="lost", status="running",
                                         heartbeat_at=timezone.now() - timedelta(seconds=600))
    from agentcore import services

    services._last_stale_sweep = float("-inf")  # as in a process that has not swept yet
    with pytest.raises(ConfigNotFound):  # fails after the sweep, inside the turn's transaction
        await aturn_prepare(TurnRequest(app=chat_app, query="x", owner=plain_user,
                                       overrides=TurnOverrides(config_id=str(uuid.uuid4()))))
    await dead.arefresh_from_db()
    assert dead.status == "running"
    await run_all(TurnRequest(app=chat_app, query="y", owner=plain_user))
    await dead.arefresh_from_db()
    assert dead.status == "error"


async def test_too_many_active_runs(chat_app, plain_user, fake_upstream):
    chat_app.max_active_requests = 1
    await chat_app.asave()
    first = await aturn_prepare(TurnRequest(app=chat_app, query="one", owner=plain_user))
    with pytest.raises(TooManyActiveRuns):
        await aturn_prepare(TurnRequest(app=chat_app, query="two", owner=plain_user))
    assert await Message.objects.acount() == 1
    events = [e async for e in turn_run(first)]
    assert events[-1].status == "normal"
    await aturn_prepare(TurnRequest(app=chat_app, query="three", owner=plain_user))


async def test_a_dead_run_does_not_count_against_the_limit_before_the_sweep(chat_app, plain_user, settings,
                                                                            monkeypatch, fake_upstream):
    settings.AGENT_STALE_RUN_SECONDS = 15
    settings.AGENT_STALE_SWEEP_SECONDS = 600
    from agentcore import services

    monkeypatch.setattr(services, "_last_stale_sweep", time.monotonic())  # swept a moment ago: no sweep now
    chat_app.max_active_requests = 1
    await chat_app.asave()
    session = await database_sync_to_async(session_create)(app=chat_app, owner=plain_user)
    await Message.objects.acreate(session=session, query="lost", heartbeat_at=timezone.now() - timedelta(seconds=16))
    await aturn_prepare(TurnRequest(app=chat_app, query="one", owner=plain_user))
    with pytest.raises(TooManyActiveRuns):
        await aturn_prepare(TurnRequest(app=chat_app, query="two", owner=plain_user))


async def test_usage_and_cost_are_recorded(chat_app, plain_user, fake_upstream, default_llm_config):
    await LLMConfig.objects.filter(pk=default_llm_config.pk).aupdate(input_price_per_million=2,
                                                                    output_price_per_million=8)
    fake_upstream.script(Reply(text="ok", prompt_tokens=1000, completion_tokens=500))
    events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user))
    usage = events[-2]
    assert usage.cost.total_price == Decimal("0.006") and usage.latency > 0 and usage.time_to_first_token is not None
    config = await LLMConfig.objects.aget(pk=default_llm_config.pk)
    assert config.usage_count == 1 and config.prompt_tokens_total == 1000
    message = await Message.objects.aget(pk=events[0].message_id)
    assert message.total_price == Decimal("0.006") and message.time_to_first_token is not None


async def test_every_model_call_of_an_agent_turn_is_counted(agent_app, plain_user, fake_upstream, default_llm_config):
    fake_upstream.script(Reply(tool_calls=[ToolCall("current_time", {})], prompt_tokens=10, completion_tokens=2),
                         Reply(text="It is noon.", prompt_tokens=20, completion_tokens=3))
    events = await run_all(TurnRequest(app=agent_app, query="time?", owner=plain_user))
    assert events[-1].status == "normal"
    config = await LLMConfig.objects.aget(pk=default_llm_config.pk)
    assert (config.usage_count, config.prompt_tokens_total, config.completion_tokens_total) == (2, 30, 5)
    message = await Message.objects.aget(pk=events[0].message_id)
    assert [a["category"] for a in message.attempts] == ["", ""]


async def test_attachments_reach_the_model(chat_app, plain_user, fake_upstream):
    await run_all(TurnRequest(app=chat_app, query="look", owner=plain_user, attachments=(
        Attachment(kind="text", name="log.txt", text="ERROR disk full"),
        Attachment(kind="image", name="graph.png", url="data:image/png;base64,AAAA"),
    )))
    content = fake_upstream.chat_requests[-1].messages[-1]["content"]
    assert content[0]["type"] == "text" and "ERROR disk full" in content[0]["text"]
    assert content[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


async def test_heartbeat_is_touched_while_the_run_is_alive(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="a b c d e f", delay=0.1))
    beats = set()
    message_id = None
    with override_settings(AGENT_HEARTBEAT_SECONDS=0.1):
        async for event in turn_prepare_and_run(TurnRequest(app=chat_app, query="slow", owner=plain_user)):
            if isinstance(event, RunStarted):
                message_id = event.message_id
            elif isinstance(event, TextDelta):
                beats.add((await Message.objects.aget(pk=message_id)).heartbeat_at)
    assert len(beats) >= 2
    assert (await Message.objects.aget(pk=message_id)).heartbeat_at is None


async def test_heartbeat_saves_the_answer_so_far(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text=" ".join(f"w{i}" for i in range(20)), delay=0.1))
    saved = []
    with override_settings(AGENT_HEARTBEAT_SECONDS=0.1):
        async for event in turn_prepare_and_run(TurnRequest(app=chat_app, query="slow", owner=plain_user)):
            if isinstance(event, RunStarted):
                message_id = event.message_id
            elif isinstance(event, TextDelta):
                saved.append((await Message.objects.aget(pk=message_id)).answer)
    # While it streamed, the row held a growing prefix of the answer (what a killed worker leaves behind).
    partial = [answer for answer in saved if answer]
    assert partial and all(answer.startswith("w0") for answer in partial) and len(partial[0]) < len(partial[-1])


async def test_api_stop_is_scoped_to_the_end_user_and_app(chat_app, fake_upstream):
    fake_upstream.script(Reply(text=" ".join(f"w{i}" for i in range(30)), delay=0.1))
    events = []
    request = TurnRequest(app=chat_app, query="long", end_user="u-1", source="api")
    async for event in turn_prepare_and_run(request):
        events.append(event)
        if isinstance(event, TextDelta) and len(events) == 2:
            task_id = events[0].task_id
            assert not await run_stop(task_id=task_id, end_user="u-2", app_id=chat_app.pk)
            assert not await run_stop(task_id=task_id, end_user="u-1", app_id=uuid.uuid4())
            assert not await run_stop(task_id="not-a-uuid", end_user="u-1")
            assert await run_stop(task_id=task_id, end_user="u-1", app_id=chat_app.pk)
    assert events[-1].status == "stopped"


async def test_the_next_turn_remembers_a_stopped_partial_answer(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="alpha beta gamma delta", cut_after=2), Reply(text="Again."))
    first = await run_all(TurnRequest(app=chat_app, query="tell me", owner=plain_user))
    assert isinstance(first[-1], RunError)
    await run_all(TurnRequest(app=chat_app, query="go on", owner=plain_user, session_id=first[0].session_id))
    sent = [(m["role"], m["content"]) for m in fake_upstream.chat_requests[-1].messages]
    assert sent[1:] == [("user", "tell me"), ("assistant", "alpha beta "), ("user", "go on")]


async def _stopped_after_two_deltas(request: TurnRequest) -> list:
    """The events of a turn stopped by its owner once two text deltas arrived; it must end as stopped."""
    events = []
    async for event in turn_prepare_and_run(request):
        events.append(event)
        if isinstance(event, TextDelta) and len([e for e in events if isinstance(e, TextDelta)]) == 2:
            assert await run_stop(task_id=events[0].task_id, user=request.owner)
    assert events[-1].status == "stopped"
    return events


async def test_the_next_turn_remembers_the_question_and_answer_of_a_run_stopped_mid_stream(chat_app,
                                                                                           plain_user, fake_upstream):
    fake_upstream.script(Reply(text=" ".join(f"w{i}" for i in range(40)), delay=0.1), Reply(text="Again."))
    events = await _stopped_after_two_deltas(TurnRequest(app=chat_app, query="tell me", owner=plain_user))
    await run_all(TurnRequest(app=chat_app, query="go on", owner=plain_user, session_id=events[0].session_id))
    sent = [(m["role"], m["content"]) for m in fake_upstream.chat_requests[-1].messages]
    assert sent[1:] == [("user", "tell me"), ("assistant", "w0 w1 "), ("user", "go on")]


async def test_the_next_turn_remembers_the_tool_steps_of_a_stopped_agent_run(agent_app, plain_user, fake_upstream):
    fake_upstream.script(
        Reply(tool_calls=[ToolCall("current_time", {})]),
        Reply(text=" ".join(f"w{i}" for i in range(40)), delay=0.1),
        Reply(text="Again."),
    )
    events = await _stopped_after_two_deltas(TurnRequest(app=agent_app, query="what time?", owner=plain_user))
    await run_all(TurnRequest(app=agent_app, query="go on", owner=plain_user, session_id=events[0].session_id))
    roles = [m["role"] for m in fake_upstream.chat_requests[-1].messages]
    assert roles[1:] == ["user", "assistant", "tool", "assistant", "user"]
    assert fake_upstream.chat_requests[-1].messages[-2]["content"] == "w0 w1 "


async def test_an_agent_runs_tool_steps_are_checkpointed_while_the_run_goes_on(agent_app, plain_user, fake_upstream):
    # A tool may have changed something: its call and result are saved as soon as they happen, not when the run
    # ends, so that a server dying in the middle of the next model call does not make the agent forget them.
    from langchain_core.messages import AIMessage as LCAIMessage
    from langchain_core.messages import ToolMessage as LCToolMessage

    from agentcore.checkpoint import checkpointer
    from agentcore.graph import agent_graph

    fake_upstream.script(
        Reply(tool_calls=[ToolCall("current_time", {})]),
        Reply(text=" ".join(f"w{i}" for i in range(40)), delay=0.1),
    )
    saved = None
    async for event in turn_prepare_and_run(TurnRequest(app=agent_app, query="what time?", owner=plain_user)):
        if isinstance(event, RunStarted):
            started = event
        if isinstance(event, TextDelta) and saved is None:
            # The step's checkpoint is written while the next step runs: give it up to 2 s of the 4 s stream.
            for _ in range(40):
                async with checkpointer() as saver:
                    state = await agent_graph(checkpointer=saver).aget_state(
                        {"configurable": {"thread_id": started.session_id}})
                saved = state.values.get("messages", [])
                if len(saved) >= 3:
                    break
                await asyncio.sleep(0.05)
            assert await run_stop(task_id=started.task_id, user=plain_user)
    assert [type(m) for m in saved[1:]] == [LCAIMessage, LCToolMessage]
    assert saved[1].tool_calls[0]["name"] == "current_time"


async def test_a_turn_whose_client_leaves_during_prepare_is_closed_not_left_running(chat_app, plain_user,
                                                                                    fake_upstream):
    task = asyncio.create_task(aturn_prepare(TurnRequest(app=chat_app, query="hello?", owner=plain_user)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    message = await Message.objects.aget()
    assert message.status == Message.Status.STOPPED
    assert fake_upstream.chat_requests == []


async def test_abandoning_a_turn_that_ran_changes_nothing(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="done"))
    turn = await aturn_prepare(TurnRequest(app=chat_app, query="hi", owner=plain_user))
    [event async for event in turn_run(turn)]
    await turn_abandon(turn)

    message = await Message.objects.aget()
    assert (message.status, message.answer) == (Message.Status.NORMAL, "done")


@pytest.mark.django_db
def test_a_new_conversations_turn_writes_its_rows_in_one_statement_on_postgresql(chat_app):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from agentcore.runs import turn_prepare

    with CaptureQueriesContext(connection) as sent:
        turn = turn_prepare(TurnRequest(app=chat_app, query="disk?", end_user="u", source="api"))
    writes = [q["sql"] for q in sent.captured_queries if q["sql"].lstrip().split()[0] in ("WITH", "INSERT")]
    assert len(writes) == (1 if connection.vendor == "postgresql" else 2)
    stored = Message.objects.select_related("session").get(pk=turn.message.pk)
    assert (stored.query, stored.status, stored.session.end_user) == ("disk?", "running", "u")


@pytest.mark.django_db
def test_a_new_conversations_turn_start_opens_no_transaction_unless_it_locks_or_sweeps(chat_app, monkeypatch):
    """A new conversation's rows are one statement on PostgreSQL, atomic by itself: BEGIN and COMMIT around it were
    two more round trips on every such turn. (Inside this test's transaction, a transaction opened by the turn shows
    as a SAVEPOINT.) The app's capacity check keeps its transaction: its row lock must be held until the rows are
    written, or two turns could both take the last slot."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from agentcore import services
    from agentcore.runs import turn_prepare

    monkeypatch.setattr(services, "_last_stale_sweep", time.monotonic())  # swept a moment ago: no sweep now

    def sent_by_a_turn_start() -> list[str]:
        with CaptureQueriesContext(connection) as sent:
            turn_prepare(TurnRequest(app=chat_app, query="disk?", end_user="u", source="api"))
        return [" ".join(q["sql"].split()) for q in sent.captured_queries]

    statements = [sql for sql in sent_by_a_turn_start() if not sql.startswith("SELECT")]
    if connection.vendor == "postgresql":
        assert len(statements) == 1 and statements[0].startswith("WITH ")
    else:  # two INSERTs, in the transaction statements_together opens for them
        assert [sql.split()[0] for sql in statements] == ["SAVEPOINT", "INSERT", "INSERT", "RELEASE"]

    chat_app.max_active_requests = 5
    chat_app.save()
    statements = sent_by_a_turn_start()
    opened = next(i for i, sql in enumerate(statements) if sql.startswith("SAVEPOINT"))
    counted = next(i for i, sql in enumerate(statements) if 'COUNT(*)' in sql)
    written = next(i for i, sql in enumerate(statements) if sql.startswith(("WITH", "INSERT")))
    assert opened < counted < written
    if connection.vendor == "postgresql":  # SQLite has no row locks: its transaction serialises the writers
        assert any(sql.endswith("FOR UPDATE") for sql in statements[opened:counted])
    assert Message.objects.filter(status="running").count() == 2


@pytest.mark.django_db
def test_a_stale_sweep_falling_due_during_a_turn_start_never_runs_outside_its_transaction(chat_app, monkeypatch):
    """Whether the turn start needs a transaction and whether it sweeps are one decision: a sweep that fell due
    between two readings of the clock would have sent its UPDATE on its own, outside any transaction."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from agentcore import services
    from agentcore.runs import turn_prepare

    swept_at = time.monotonic()
    monkeypatch.setattr(services, "_last_stale_sweep", swept_at)
    readings = iter([swept_at, swept_at + 3600])  # not due at the first reading, long due at any later one

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return next(readings, swept_at + 3600)

    monkeypatch.setattr(services, "time", Clock)
    with CaptureQueriesContext(connection) as sent:
        turn_prepare(TurnRequest(app=chat_app, query="disk?", end_user="u", source="api"))
    updates = [q["sql"] for q in sent.captured_queries if q["sql"].lstrip().upper().startswith("UPDATE")]
    assert updates == []
    assert Message.objects.filter(status="running").count() == 1


def _sent_roles_and_tool_results(request) -> list[tuple[str, str | None]]:
    return [(m["role"], m["content"] if m["role"] in ("tool", "assistant") else None) for m in request.messages[1:]]


async def test_the_next_turn_remembers_an_agent_run_stopped_while_its_tool_ran(agent_app, plain_user, fake_upstream):
    """Stopped during its tool step: the call is remembered, answered as not run (the tool's result never came)."""
    from agentcore.events import ThoughtUpdate
    from agentcore.graph import NOT_RUN

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts the tool's request and never answers it
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/health"
        fake_upstream.script(Reply(text="Checking.", tool_calls=[ToolCall("http_check", {"url": url})]),
                             Reply(text="Again."))
        events = []
        async for event in turn_prepare_and_run(TurnRequest(app=agent_app, query="up?", owner=plain_user)):
            events.append(event)
            if isinstance(event, ThoughtUpdate) and event.phase == "tool_call":
                assert await run_stop(task_id=events[0].task_id, user=plain_user)
        assert events[-1].status == "stopped"
    await run_all(TurnRequest(app=agent_app, query="go on", owner=plain_user, session_id=events[0].session_id))
    assert _sent_roles_and_tool_results(fake_upstream.chat_requests[-1]) == [
        ("user", None), ("assistant", "Checking."), ("tool", NOT_RUN), ("user", None)]


async def test_the_next_turn_remembers_the_tool_step_of_an_agent_run_whose_second_call_failed(
        agent_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="Checking.", tool_calls=[ToolCall("current_time", {"timezone": 5})]),
                         Reply(status=400, error_message="bad request"), Reply(text="Again."))
    first = await run_all(TurnRequest(app=agent_app, query="time?", owner=plain_user))
    assert isinstance(first[-1], RunError)
    await run_all(TurnRequest(app=agent_app, query="go on", owner=plain_user, session_id=first[0].session_id))
    sent = _sent_roles_and_tool_results(fake_upstream.chat_requests[-1])
    assert [role for role, _ in sent] == ["user", "assistant", "tool", "user"]
    assert sent[1][1] == "Checking." and sent[2][1].startswith("Error: ValidationError")


async def test_the_next_turn_remembers_the_tool_step_and_partial_answer_of_an_agent_run_whose_client_left(
        agent_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="Checking.", tool_calls=[ToolCall("current_time", {"timezone": 5})]),
                         Reply(text=" ".join(f"w{i}" for i in range(40)), delay=0.1), Reply(text="Again."))
    seen = await _cancelled_after_two_deltas(TurnRequest(app=agent_app, query="time?", owner=plain_user),
                                             starting="w")
    await run_all(TurnRequest(app=agent_app, query="go on", owner=plain_user, session_id=seen[0].session_id))
    sent = _sent_roles_and_tool_results(fake_upstream.chat_requests[-1])
    assert [role for role, _ in sent] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent[2][1].startswith("Error: ValidationError") and sent[3][1] == "w0 w1 "
