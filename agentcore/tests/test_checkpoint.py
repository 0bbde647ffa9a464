"""Checkpoints in the project's database: a conversation survives a restart (new saver, new graph, same thread)."""
from __future__ import annotations

import asyncio
import json
import uuid

import psycopg
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from agentcore import checkpoint, graph
from agentcore.checkpoint import checkpointer
from agentcore.models import Message
from agentcore.runs import TurnRequest
from agentcore.tests.factories import checkpoint_rows, run_all
from agentcore.tools.registry import tools_for_run
from tests.fakes.upstream import Reply, ToolCall

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_new_saver_and_graph_see_the_conversation(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="Load is 0.3."))
    events = await run_all(TurnRequest(app=chat_app, query="load?", owner=plain_user))
    # As after a restart: nothing set up or compiled yet in this process.
    checkpoint._ready.clear()
    graph._compiled.cache_clear()
    async with checkpointer() as saver:
        fresh = graph.agent_graph(checkpointer=saver)
        state = await fresh.aget_state({"configurable": {"thread_id": events[0].session_id}})
    messages = state.values["messages"]
    assert [type(m) for m in messages] == [HumanMessage, AIMessage]
    assert (messages[0].content, messages[1].content) == ("load?", "Load is 0.3.")
    assert not any(isinstance(m, SystemMessage) for m in messages)  # the prompt is the app's, not the checkpoint's


async def test_history_continues_after_a_restart(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="Disk 40%."), Reply(text="Still 40%."))
    first = await run_all(TurnRequest(app=chat_app, query="disk?", owner=plain_user))
    checkpoint._ready.clear()
    await run_all(TurnRequest(app=chat_app, query="and now?", owner=plain_user,
                              session_id=first[0].session_id))
    sent = [(m["role"], m["content"]) for m in fake_upstream.chat_requests[-1].messages]
    assert sent == [("system", "Answer briefly."), ("user", "disk?"), ("assistant", "Disk 40%."),
                    ("user", "and now?")]


async def test_sessions_do_not_share_history(chat_app, plain_user, fake_upstream):
    await run_all(TurnRequest(app=chat_app, query="secret question", owner=plain_user))
    await run_all(TurnRequest(app=chat_app, query="fresh", owner=plain_user))
    assert [m["content"] for m in fake_upstream.chat_requests[-1].messages] == ["Answer briefly.", "fresh"]


@pytest.fixture
def checkpoint_pool(settings):
    if not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        pytest.skip("the checkpoint connection pool is PostgreSQL's")
    settings.AGENT_CHECKPOINT_POOL_SIZE = 2


@pytest.mark.usefixtures("checkpoint_pool")
async def test_runs_on_one_loop_share_pooled_checkpoint_connections(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="Disk 40%."), Reply(text="Still 40%."), Reply(text="Load 0.1."))
    try:
        first = await run_all(TurnRequest(app=chat_app, query="disk?", owner=plain_user))
        [pool] = checkpoint._pools[asyncio.get_running_loop()].values()
        second = await run_all(TurnRequest(app=chat_app, query="and now?", owner=plain_user,
                                           session_id=first[0].session_id))
        await run_all(TurnRequest(app=chat_app, query="load?", owner=plain_user))
        assert [e.status for e in (first[-1], second[-1])] == ["normal", "normal"]
        sent = [(m["role"], m["content"]) for m in fake_upstream.chat_requests[1].messages]
        assert sent == [("system", "Answer briefly."), ("user", "disk?"), ("assistant", "Disk 40%."),
                        ("user", "and now?")]
        # The same pool served all three runs, and they reused its connections.
        assert list(checkpoint._pools[asyncio.get_running_loop()].values()) == [pool]
        stats = pool.get_stats()
        assert stats["connections_num"] <= 2  # connections opened in all
    finally:
        await checkpoint.checkpoint_pools_close()
    assert asyncio.get_running_loop() not in checkpoint._pools


@pytest.mark.usefixtures("checkpoint_pool")
async def test_pooled_checkpoint_connections_prepare_no_statement_on_the_server(chat_app, plain_user, fake_upstream):
    """Server-side prepared statements break behind PgBouncer in transaction mode (docs/deployment.md), as Django's
    own connections know (their psycopg prepare_threshold is None): the checkpoint connections prepare none either,
    however often the saver runs the same statements."""
    fake_upstream.script(*(Reply(text=f"Disk {n}0%.") for n in range(4)))
    try:
        first = await run_all(TurnRequest(app=chat_app, query="disk?", owner=plain_user))
        for query in ("and now?", "again?", "once more?"):
            await run_all(TurnRequest(app=chat_app, query=query, owner=plain_user, session_id=first[0].session_id))
        [pool] = checkpoint._pools[asyncio.get_running_loop()].values()
        prepared = []
        for _ in range(pool.max_size):
            async with pool.connection() as lent:
                found = await lent.execute("SELECT name, statement FROM pg_prepared_statements")
                prepared += await found.fetchall()
    finally:
        await checkpoint.checkpoint_pools_close()
    assert prepared == []


async def _backend_last_query(pid: int) -> str:
    """What the server last saw backend `pid` run, asked on a connection of its own."""
    async with await psycopg.AsyncConnection.connect(checkpoint._postgres_conninfo(), autocommit=True) as observer:
        found = await observer.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid])
        return (await found.fetchone())[0]


@pytest.mark.usefixtures("checkpoint_pool")
async def test_a_quiet_pooled_checkpoint_connection_is_lent_without_a_query(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="Disk 40%."))
    try:
        await run_all(TurnRequest(app=chat_app, query="disk?", owner=plain_user))
        [pool] = checkpoint._pools[asyncio.get_running_loop()].values()
        async with pool.connection() as marked:
            pid = marked.info.backend_pid
            await marked.execute("SELECT 'marked'")
        last = None
        for _ in range(pool.max_size):  # until the pool lends that connection again
            async with pool.connection() as lent:
                if lent.info.backend_pid == pid:
                    last = await _backend_last_query(pid)
                    break
    finally:
        await checkpoint.checkpoint_pools_close()
    assert last == "SELECT 'marked'"  # not the check's empty query


@pytest.mark.usefixtures("checkpoint_pool")
async def test_a_pooled_checkpoint_connection_the_server_ended_is_replaced(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="Disk 40%."), Reply(text="Still 40%."))
    try:
        first = await run_all(TurnRequest(app=chat_app, query="disk?", owner=plain_user))
        [pool] = checkpoint._pools[asyncio.get_running_loop()].values()
        async with pool.connection() as lent:
            pid = lent.info.backend_pid
        async with await psycopg.AsyncConnection.connect(checkpoint._postgres_conninfo(), autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        await asyncio.sleep(0.2)  # the server's goodbye reaches the pooled socket
        second = await run_all(TurnRequest(app=chat_app, query="and now?", owner=plain_user,
                                           session_id=first[0].session_id))
    finally:
        await checkpoint.checkpoint_pools_close()
    assert second[-1].status == "normal"
    assert second[-1].answer == "Still 40%."


@pytest.fixture
def shared_sqlite_checkpoints(settings):
    if settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        pytest.skip("SQLite's shared checkpoint connection")
    settings.AGENT_CHECKPOINT_POOL_SIZE = 1


@pytest.mark.usefixtures("shared_sqlite_checkpoints")
async def test_runs_on_one_loop_share_one_sqlite_checkpoint_connection(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="Disk 40%."), Reply(text="Still 40%."), Reply(text="Load 0.1."),
                         Reply(text="Up 3 days."))
    loop = asyncio.get_running_loop()
    try:
        first = await run_all(TurnRequest(app=chat_app, query="disk?", owner=plain_user))
        [opening] = checkpoint._sqlite_connections[loop].values()
        conn = opening.result()
        # A follow-up and two new conversations at once, all on the one connection.
        second, third, fourth = await asyncio.gather(
            run_all(TurnRequest(app=chat_app, query="and now?", owner=plain_user,
                                session_id=first[0].session_id)),
            run_all(TurnRequest(app=chat_app, query="load?", owner=plain_user)),
            run_all(TurnRequest(app=chat_app, query="uptime?", owner=plain_user)),
        )
        assert [e[-1].status for e in (first, second, third, fourth)] == ["normal"] * 4
        assert [o.result() for o in checkpoint._sqlite_connections[loop].values()] == [conn]
        for events in (second, third, fourth):
            async with checkpointer() as saver:
                state = await graph.agent_graph(checkpointer=saver).aget_state(
                    {"configurable": {"thread_id": events[0].session_id}})
            assert state.values["messages"][-1].content == events[-1].answer
        async with checkpointer() as saver:
            state = await graph.agent_graph(checkpointer=saver).aget_state(
                {"configurable": {"thread_id": first[0].session_id}})
        assert [m.content for m in state.values["messages"]] == ["disk?", "Disk 40%.", "and now?", second[-1].answer]
    finally:
        await checkpoint.checkpoint_pools_close()
    assert loop not in checkpoint._sqlite_connections
    with pytest.raises(ValueError, match="^no active connection$"):  # closed, not merely failing
        await conn.execute("SELECT 1")


async def test_an_opening_closed_at_any_point_leaves_no_connection_thread(settings):
    # A client that leaves while its turn is prepared closes the run's checkpointer while it is still connecting.
    # An aiosqlite connection left open would keep its worker thread (not a daemon) and the process alive.
    import threading

    from agentcore.checkpoint import SaverOpening

    if settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        pytest.skip("SQLite's checkpoint connections are threads")

    def worker_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if "_connection_worker_thread" in t.name and t.is_alive()]

    # Opening takes a few tenths of a millisecond on the connection's thread: close after 0 to 6 ms, in small steps.
    # The openings stay referenced, as a request holds its own until it ends: garbage collection must not be what
    # stops a connection's thread.
    openings = []
    for step in range(40):
        openings.append(opening := SaverOpening())
        await asyncio.sleep(step * 0.00015)
        await opening.aclose()
    for _ in range(100):
        if not worker_threads():
            break
        await asyncio.sleep(0.02)
    assert worker_threads() == []


async def test_a_conversation_keeps_only_its_latest_checkpoint(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="Disk 40%."), Reply(text="Still 40%."), Reply(text="Load 0.1."))
    first = await run_all(TurnRequest(app=chat_app, query="disk?", owner=plain_user))
    session_id = first[0].session_id
    for query in ("and now?", "load?"):
        await run_all(TurnRequest(app=chat_app, query=query, owner=plain_user, session_id=session_id))
    assert (await checkpoint_rows(session_id))[0] == 1
    async with checkpointer() as saver:
        state = await graph.agent_graph(checkpointer=saver).aget_state({"configurable": {"thread_id": session_id}})
    assert [m.content for m in state.values["messages"]] == ["disk?", "Disk 40%.", "and now?", "Still 40%.",
                                                             "load?", "Load 0.1."]


@pytest.mark.parametrize("cut", [False, True], ids=["answered", "cut-mid-answer"])
async def test_the_first_chat_turn_of_a_conversation_leaves_one_checkpoint(chat_app, plain_user, fake_upstream, cut):
    # A first chat turn writes its conversation's one checkpoint; cut mid-answer, its partial answer is added after it.
    fake_upstream.script(Reply(text="alpha beta gamma delta", cut_after=2 if cut else None))
    events = await run_all(TurnRequest(app=chat_app, query="hi", owner=plain_user))
    session_id = events[0].session_id
    assert await checkpoint_rows(session_id) == (1, 0)
    async with checkpointer() as saver:
        state = await graph.agent_graph(checkpointer=saver).aget_state({"configurable": {"thread_id": session_id}})
    answer = "alpha beta " if cut else "alpha beta gamma delta"
    assert [m.content for m in state.values["messages"]] == ["hi", answer]


async def test_an_agent_turn_leaves_one_checkpoint_and_no_writes_of_older_ones(agent_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(tool_calls=[ToolCall("current_time", {})]), Reply(text="Noon."),
                         Reply(tool_calls=[ToolCall("current_time", {})]), Reply(text="Still noon."))
    first = await run_all(TurnRequest(app=agent_app, query="time?", owner=plain_user))
    await run_all(TurnRequest(app=agent_app, query="again?", owner=plain_user, session_id=first[0].session_id))
    assert await checkpoint_rows(first[0].session_id) == (1, 0)  # a finished run leaves nothing pending
    roles = [m["role"] for m in fake_upstream.chat_requests[-1].messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user", "assistant", "tool"]


async def test_the_model_is_given_the_window_and_the_checkpoint_keeps_only_that(settings, chat_app,
                                                                               plain_user, fake_upstream):
    settings.AGENT_HISTORY_MAX_MESSAGES = 5
    fake_upstream.script(*(Reply(text=f"answer {n}") for n in range(5)))
    first = await run_all(TurnRequest(app=chat_app, query="question 0", owner=plain_user))
    session_id = first[0].session_id
    for n in range(1, 5):
        await run_all(TurnRequest(app=chat_app, query=f"question {n}", owner=plain_user, session_id=session_id))
    sent = [(m["role"], m["content"]) for m in fake_upstream.chat_requests[-1].messages]
    assert sent == [("system", "Answer briefly."), ("user", "question 2"), ("assistant", "answer 2"),
                    ("user", "question 3"), ("assistant", "answer 3"), ("user", "question 4")]
    async with checkpointer() as saver:
        state = await graph.agent_graph(checkpointer=saver).aget_state({"configurable": {"thread_id": session_id}})
    assert [m.content for m in state.values["messages"]] == [
        "question 2", "answer 2", "question 3", "answer 3", "question 4", "answer 4"]
    # The whole conversation stays in the history that clients read.
    assert await Message.objects.filter(session_id=session_id).acount() == 5


# Run by each worker process of the test below: set the checkpoint tables up at the same moment as the others.
SETUP_RACE = """
import asyncio, sys, time
import django
django.setup()
from agentcore import checkpoint
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

async def main():
    conninfo = checkpoint._postgres_conninfo()
    async with AsyncPostgresSaver.from_conn_string(conninfo) as saver:
        time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
        await checkpoint._set_up(saver, conninfo)

asyncio.run(main())
"""


def test_workers_starting_together_on_a_new_database_set_the_tables_up_once(settings):
    """Four processes set up the checkpoint tables of an empty database at the same instant: none may fail (without
    the setup lock they race on checkpoint_migrations' primary key)."""
    import os
    import subprocess
    import sys
    import time

    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("SQLite's setup is one transaction on one file")
    db = settings.DATABASES["default"]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"}
    for _ in range(3):
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS checkpoint_writes, checkpoint_blobs, checkpoints, "
                           "checkpoint_migrations")
        start = time.time() + 4  # every process has imported Django and connected by then
        workers = [subprocess.Popen([sys.executable, "-c", SETUP_RACE, str(start)], env=env, stderr=subprocess.PIPE)
                   for _ in range(4)]
        try:
            failures = [error.decode()[-1500:] for worker in workers
                        if (error := worker.communicate(timeout=120)[1]) and worker.returncode != 0]
        finally:
            for worker in workers:
                worker.kill()
        assert failures == []
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*), count(DISTINCT v) FROM checkpoint_migrations")
        total, distinct = cursor.fetchone()
    assert total == distinct > 0
    checkpoint._ready.clear()


# A chat turn runs without the graph (agentcore.runs.lifecycle._Run._answer) but leaves the checkpoint as the
# graph would: an app switched between chat and agent-chat keeps its conversations, in both directions.

async def test_a_conversation_goes_on_when_its_app_switches_between_chat_and_agent_chat(chat_app, plain_user,
                                                                                        fake_upstream):
    from agentcore.models import AgentApp

    fake_upstream.script(Reply(text="One."), Reply(text="Two."), Reply(text="Three."), Reply(text="Four."))
    first = await run_all(TurnRequest(app=chat_app, query="q1", owner=plain_user))
    session_id = first[0].session_id
    await run_all(TurnRequest(app=chat_app, query="q2", owner=plain_user, session_id=session_id))
    await AgentApp.objects.filter(pk=chat_app.pk).aupdate(mode=AgentApp.Mode.AGENT_CHAT)
    agent = await AgentApp.objects.aget(pk=chat_app.pk)
    third = await run_all(TurnRequest(app=agent, query="q3", owner=plain_user, session_id=session_id))
    assert third[-1].status == "normal" and third[-1].answer == "Three."
    history = [("user", "q1"), ("assistant", "One."), ("user", "q2"), ("assistant", "Two."), ("user", "q3")]
    sent = [(m["role"], m["content"]) for m in fake_upstream.chat_requests[-1].messages if m["role"] != "system"]
    assert sent == history
    await AgentApp.objects.filter(pk=chat_app.pk).aupdate(mode=AgentApp.Mode.CHAT)
    chat = await AgentApp.objects.aget(pk=chat_app.pk)
    await run_all(TurnRequest(app=chat, query="q4", owner=plain_user, session_id=session_id))
    sent = [(m["role"], m["content"]) for m in fake_upstream.chat_requests[-1].messages if m["role"] != "system"]
    assert sent == [*history, ("assistant", "Three."), ("user", "q4")]
    assert await checkpoint_rows(session_id) == (1, 0)


async def test_a_failed_chat_turn_leaves_its_question_in_the_conversation(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(status=500, error_message="backend down"), Reply(text="Recovered."))
    first = await run_all(TurnRequest(app=chat_app, query="first try", owner=plain_user))
    assert type(first[-1]).__name__ == "RunError", first[-1]
    second = await run_all(TurnRequest(app=chat_app, query="again", owner=plain_user,
                                       session_id=first[0].session_id))
    assert second[-1].answer == "Recovered."
    sent = [(m["role"], m["content"]) for m in fake_upstream.chat_requests[-1].messages if m["role"] != "system"]
    assert sent == [("user", "first try"), ("user", "again")]


# An agent turn whose first answer calls no tool runs without the graph's steps (lifecycle._Run._answer): one
# checkpoint write instead of one per step (the input, the model step's writes and its checkpoint), and the
# conversation left as the graph leaves it.

async def _checkpoint_writes_counted(monkeypatch) -> list[tuple[str, str]]:
    """(thread id, metadata source) of every checkpoint the saver writes from now on (this test's database's saver
    class): the source is "update" for a write of `aupdate_state` and "loop" for the checkpoint of a step the graph
    ran."""
    async with checkpointer() as saver:
        saver_class = type(saver)
    written: list[tuple[str, str]] = []
    aput = saver_class.aput

    async def counted_aput(self, config, checkpoint, metadata, *args, **kwargs):
        written.append((config["configurable"]["thread_id"], metadata.get("source")))
        return await aput(self, config, checkpoint, metadata, *args, **kwargs)

    monkeypatch.setattr(saver_class, "aput", counted_aput)
    return written


async def test_an_agent_turn_answered_without_a_tool_writes_its_checkpoint_once_as_the_graph_would(
        agent_app, plain_user, fake_upstream, monkeypatch):
    from langchain_core.messages import HumanMessage

    from agentcore.runs.chat_models import run_chat_model
    from llmconfigs.models import LLMConfig

    written = await _checkpoint_writes_counted(monkeypatch)
    fake_upstream.script(Reply(text="It is noon."), Reply(text="It is noon."))
    events = await run_all(TurnRequest(app=agent_app, query="time?", owner=plain_user))
    session_id = events[0].session_id
    assert events[-1].answer == "It is noon."
    assert written == [(session_id, "update")]
    assert await checkpoint_rows(session_id) == (1, 0)

    # The same question through the graph, on a thread of its own.
    config = await LLMConfig.objects.aget(is_default=True, is_embedding=False)
    context = graph.AgentContext(model=run_chat_model([config], {}), on_delta=lambda delta: asyncio.sleep(0),
                                 system_prompt=agent_app.system_prompt, max_history_messages=100,
                                 max_history_chars=100_000)
    thread = {"configurable": {"thread_id": "through-the-graph"}}
    async with checkpointer() as saver:
        compiled = graph.agent_graph(checkpointer=saver)
        await compiled.ainvoke({"messages": [HumanMessage("time?")], "iterations": 0}, thread, context=context)
        by_graph = await compiled.aget_state(thread)
        by_run = await compiled.aget_state({"configurable": {"thread_id": session_id}})

    def seen(state):
        return ([(type(m).__name__, m.content, getattr(m, "tool_calls", None), m.response_metadata.get("finish_reason"))
                 for m in state.values["messages"]], state.values["iterations"], state.next)

    assert seen(by_run) == seen(by_graph)
    assert seen(by_run)[1:] == (1, ())


def _calls(*calls: ToolCall) -> Reply:
    return Reply(text="Let me look.", tool_calls=list(calls))


_UTC = ToolCall("current_time", {"timezone": "UTC"})


@pytest.mark.parametrize(("script", "max_iterations", "writes"), [
    # The tool steps run in the run itself: each writes one checkpoint, as the graph's tool step leaves it, and the
    # answer one more; no graph step runs (the graph: its input, then a checkpoint per step).
    ([_calls(_UTC), Reply(text="It is noon.")], 8, ["update"] * 2),
    ([_calls(_UTC), _calls(ToolCall("current_time", {"timezone": "Asia/Tokyo"})), Reply(text="It is noon.")], 8,
     ["update"] * 3),
    ([_calls(_UTC, ToolCall("current_time", {"timezone": "Europe/Paris"}), ToolCall("system_status")),
      Reply(text="It is noon.")], 8, ["update"] * 2),
    ([_calls(ToolCall("current_time", {"timezone": 5})), Reply(text="It is noon.")], 8, ["update"] * 2),
    ([_calls(ToolCall("no_such_tool", {"x": 1})), Reply(text="It is noon.")], 8, ["update"] * 2),
    # At the iteration limit the graph takes the answer over: its model step writes it, its limit step the refusals.
    ([_calls(_UTC), _calls(_UTC)], 2, ["update", "loop", "loop"]),
], ids=["one-call", "two-rounds", "several-calls", "tool-error", "unknown-tool", "limit"])
async def test_an_agent_turn_runs_its_tool_steps_itself_and_leaves_the_state_a_graph_run_leaves(
        agent_app, plain_user, fake_upstream, monkeypatch, script, max_iterations, writes):
    """The run's own loop (model call, tools, model call...) writes fewer checkpoints than the graph's steps and
    leaves the state a pure graph run leaves: messages, iterations, next."""
    from langchain_core.messages import HumanMessage

    from agentcore.runs.chat_models import run_chat_model
    from llmconfigs.models import LLMConfig

    agent_app.max_iterations = max_iterations
    await agent_app.asave()
    written = await _checkpoint_writes_counted(monkeypatch)
    fake_upstream.script(*script, *script)
    events = await run_all(TurnRequest(app=agent_app, query="time?", owner=plain_user))
    session_id = events[0].session_id
    assert events[-1].status == "normal"
    assert written == [(session_id, source) for source in writes]
    monkeypatch.undo()

    # The same question through the graph, on a thread of its own.
    graph_thread = f"through-the-graph-{uuid.uuid4()}"
    config = await LLMConfig.objects.aget(is_default=True, is_embedding=False)
    tools, rules = await tools_for_run(app=agent_app, session_id=graph_thread, subset=None, setup=None)
    context = graph.AgentContext(model=run_chat_model([config], {}), on_delta=lambda delta: asyncio.sleep(0),
                                 tools=tools, rules=rules, system_prompt=agent_app.system_prompt,
                                 max_iterations=max_iterations, max_history_messages=100, max_history_chars=100_000)
    thread = {"configurable": {"thread_id": graph_thread}}
    async with checkpointer() as saver:
        compiled = graph.agent_graph(checkpointer=saver)
        await compiled.ainvoke({"messages": [HumanMessage("time?")], "iterations": 0}, thread, context=context)
        by_graph = await compiled.aget_state(thread)
        by_run = await compiled.aget_state({"configurable": {"thread_id": session_id}})

    def seen(state):  # a tool's result holds the time it ran: only a failed one's text is compared
        return ([(type(m).__name__, m.name if isinstance(m, ToolMessage) else m.content,
                  [(c["name"], c["args"]) for c in getattr(m, "tool_calls", None) or []],
                  m.artifact if isinstance(m, ToolMessage) else m.response_metadata.get("finish_reason"),
                  m.content if isinstance(m, ToolMessage) and m.artifact["status"] == "error" else None)
                 for m in state.values["messages"]], state.values["iterations"], state.next)

    assert seen(by_run) == seen(by_graph)
    assert seen(by_run)[1:] == (len(script), ())
    assert any(isinstance(m, ToolMessage) for m in by_run.values["messages"])


def test_the_connection_string_is_built_once_while_the_settings_stay(monkeypatch, settings):
    """Every run opens its saver with _postgres_conninfo: psycopg's make_conninfo (about 35 us) runs once per set of
    connection settings, not per run; other settings (another database) get their own."""
    built = []
    make = checkpoint.make_conninfo
    monkeypatch.setattr(checkpoint, "make_conninfo", lambda **params: built.append(params) or make(**params))
    settings.DATABASES = {"default": {**settings.DATABASES["default"], "NAME": "one-database"}}  # never built yet
    first = checkpoint._postgres_conninfo()
    assert checkpoint._postgres_conninfo() == first and len(built) == 1
    settings.DATABASES = {"default": {**settings.DATABASES["default"], "NAME": "another"}}
    assert "another" in checkpoint._postgres_conninfo() and len(built) == 2


# The prune after a run (checkpoint_prune): what it keeps, what it deletes, and on PostgreSQL in how many round trips.

async def _thread_with_superseded_checkpoints(app) -> tuple[str, str]:
    """A thread the graph answered twice on, without a prune: several checkpoints, each with its writes, and (on
    PostgreSQL) the blobs of every version of the conversation. A write is left pending on the latest checkpoint, as
    a stopped run or an approval's interrupt leaves one. Returns the thread and its latest checkpoint's id."""
    from langchain_core.messages import HumanMessage

    from agentcore.runs.chat_models import run_chat_model
    from llmconfigs.models import LLMConfig

    config = await LLMConfig.objects.aget(is_default=True, is_embedding=False)
    context = graph.AgentContext(model=run_chat_model([config], {}), on_delta=lambda delta: asyncio.sleep(0),
                                 system_prompt=app.system_prompt, max_history_messages=100, max_history_chars=100_000)
    thread = f"unpruned-{uuid.uuid4()}"
    configurable = {"configurable": {"thread_id": thread}}
    async with checkpointer() as saver:
        compiled = graph.agent_graph(checkpointer=saver)
        for query in ("disk?", "and now?"):
            await compiled.ainvoke({"messages": [HumanMessage(query)], "iterations": 0}, configurable,
                                   context=context)
        latest = await saver.aget_tuple(configurable)
        await saver.aput_writes(latest.config, [("iterations", 7)], task_id=str(uuid.uuid4()))
    return thread, latest.checkpoint["id"]


async def _stored(thread: str) -> dict:
    """What the checkpoint tables hold for `thread`: checkpoint ids, (checkpoint id, channel) of the writes, and on
    PostgreSQL the blobs' (channel, version) and the versions each checkpoint references."""
    from channels.db import database_sync_to_async
    from django.db import connection

    def read():
        postgres = connection.vendor == "postgresql"
        with connection.cursor() as cursor:
            cursor.execute("SELECT checkpoint_id FROM checkpoints WHERE thread_id = %s", [thread])
            ids = {row[0] for row in cursor.fetchall()}
            cursor.execute(f"SELECT checkpoint_id, channel FROM {'checkpoint_writes' if postgres else 'writes'} "
                           "WHERE thread_id = %s", [thread])
            writes = {tuple(row) for row in cursor.fetchall()}
            blobs, versions = set(), {}
            if postgres:
                cursor.execute("SELECT channel, version FROM checkpoint_blobs WHERE thread_id = %s", [thread])
                blobs = {tuple(row) for row in cursor.fetchall()}
                cursor.execute("SELECT checkpoint_id, checkpoint -> 'channel_versions' FROM checkpoints "
                               "WHERE thread_id = %s", [thread])
                versions = {row[0]: set(json.loads(row[1]).items()) for row in cursor.fetchall()}
        return {"ids": ids, "writes": writes, "blobs": blobs, "versions": versions}

    return await database_sync_to_async(read)()


async def _state(thread: str):
    async with checkpointer() as saver:
        state = await graph.agent_graph(checkpointer=saver).aget_state({"configurable": {"thread_id": thread}})
    return [(type(m).__name__, m.content) for m in state.values["messages"]], state.values["iterations"], state.next


@pytest.mark.usefixtures("checkpoint_pool")
async def test_a_prune_on_postgresql_is_one_round_trip_and_keeps_the_latest_checkpoint_its_writes_and_blobs(
        chat_app, fake_upstream):
    """The superseded checkpoints, their writes and the blobs only they used go in one statement, where
    langgraph-checkpoint-postgres' prune takes a transaction of a dozen round trips."""
    fake_upstream.script(Reply(text="Disk 40%."), Reply(text="Still 40%."))
    try:
        await _pruned_in_one_round_trip(chat_app)
    finally:
        await checkpoint.checkpoint_pools_close()


async def _pruned_in_one_round_trip(app) -> None:
    thread, latest = await _thread_with_superseded_checkpoints(app)
    before, state = await _stored(thread), await _state(thread)
    assert len(before["ids"]) > 1 and {i for i, _ in before["writes"]} - {latest}
    assert before["blobs"] - before["versions"][latest]  # some blobs are only older checkpoints'

    waits = []
    wait = psycopg.AsyncConnection.wait

    async def counted(self, gen, *args, **kwargs):
        # A commit outside a transaction (the pool's, when it takes a connection back) sends nothing.
        if not (gen.gi_code.co_name == "_commit_gen"
                and self.info.transaction_status == psycopg.pq.TransactionStatus.IDLE):
            waits.append(gen.gi_code.co_name)
        return await wait(self, gen, *args, **kwargs)

    async with checkpointer():
        pass  # the pool is open and its connection made: what is counted is the prune's own
    psycopg.AsyncConnection.wait = counted
    try:
        await checkpoint.checkpoint_prune(thread_id=thread)
    finally:
        psycopg.AsyncConnection.wait = wait

    after = await _stored(thread)
    assert after["ids"] == {latest}
    assert after["writes"] == {(i, channel) for i, channel in before["writes"] if i == latest}
    assert after["blobs"] == before["blobs"] & before["versions"][latest]
    assert await _state(thread) == state
    assert len(waits) == 1, waits


@pytest.mark.usefixtures("checkpoint_pool")
async def test_a_prune_never_deletes_what_a_run_of_the_thread_is_saving_meanwhile(chat_app, fake_upstream):
    """A run of the thread saves a newer checkpoint (its blobs, its pending writes) in a transaction the prune does
    not see: the prune leaves all of it, and the next prune keeps it as the latest, with every blob it references."""
    from langchain_core.messages import AIMessage
    from langgraph.checkpoint.base import copy_checkpoint
    from langgraph.checkpoint.base.id import uuid6
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    fake_upstream.script(Reply(text="Disk 40%."), Reply(text="Still 40%."))
    try:
        thread, latest = await _thread_with_superseded_checkpoints(chat_app)
        before = await _stored(thread)
        async with checkpointer() as saver:
            head = await saver.aget_tuple({"configurable": {"thread_id": thread}})
        newer = copy_checkpoint(head.checkpoint)
        newer["id"] = str(uuid6())
        version = saver.get_next_version(newer["channel_versions"]["messages"], None)
        newer["channel_versions"]["messages"] = version
        newer["channel_values"] = {**head.checkpoint["channel_values"],
                                   "messages": [*head.checkpoint["channel_values"]["messages"], AIMessage("Later.")]}
        async with await psycopg.AsyncConnection.connect(checkpoint._postgres_conninfo(),
                                                         row_factory=psycopg.rows.dict_row) as run_conn:
            run = AsyncPostgresSaver(run_conn)  # not autocommit: its writes stay unseen until the commit
            saved = await run.aput(head.config, newer, {"source": "loop", "step": 9, "parents": {}},
                                   {"messages": version})
            await run.aput_writes(saved, [("iterations", 3)], task_id=str(uuid.uuid4()))
            await asyncio.wait_for(checkpoint.checkpoint_prune(thread_id=thread), 10)
            await run_conn.commit()
        after = await _stored(thread)
        assert after["ids"] == {latest, newer["id"]}
        assert {i for i, _ in after["writes"]} == {latest, newer["id"]}
        referenced = set(newer["channel_versions"].items())
        assert (before["blobs"] & referenced) | {("messages", version)} <= after["blobs"]

        await checkpoint.checkpoint_prune(thread_id=thread)
        after = await _stored(thread)
        assert after["ids"] == {newer["id"]}
        assert {i for i, _ in after["writes"]} == {newer["id"]}
        assert (before["blobs"] & referenced) | {("messages", version)} <= after["blobs"]
        assert ("messages", head.checkpoint["channel_versions"]["messages"]) not in after["blobs"]  # superseded
        messages, _, _ = await _state(thread)
        assert messages == [("HumanMessage", "disk?"), ("AIMessage", "Disk 40%."), ("HumanMessage", "and now?"),
                            ("AIMessage", "Still 40%."), ("AIMessage", "Later.")]
    finally:
        await checkpoint.checkpoint_pools_close()


@pytest.mark.parametrize("version", [2, 4], ids=["format-2", "format-4"])
@pytest.mark.parametrize("sends", [False, True], ids=["no-sends", "sends-on-parent"])
@pytest.mark.usefixtures("checkpoint_pool")
async def test_the_postgresql_prune_keeps_what_langgraphs_keep_latest_keeps(version, sends):
    """Against aprune(strategy="keep_latest") on two identical threads: the same checkpoints, writes, blobs and
    parent pointers are left, also for checkpoints of formats before 4, whose parent is kept when its pending sends
    (a `__pregel_tasks` write) are there."""
    from langchain_core.messages import HumanMessage
    from langgraph.checkpoint.base import copy_checkpoint, empty_checkpoint
    from langgraph.checkpoint.base.id import uuid6

    async def thread(saver) -> str:
        thread_id = f"format-{uuid.uuid4()}"
        config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        state, messages = empty_checkpoint(), []
        state["v"] = version
        for step in range(4):
            state = copy_checkpoint(state)
            state["id"], messages = str(uuid6()), [*messages, HumanMessage(f"message {step}")]
            new = saver.get_next_version(state["channel_versions"].get("messages"), None)
            state["channel_versions"]["messages"], state["channel_values"]["messages"] = new, messages
            config = await saver.aput(config, state, {"source": "loop", "step": step, "parents": {}},
                                      {"messages": new})
            if step == 2 and sends:
                await saver.aput_writes(config, [("__pregel_tasks", {"send": step})], task_id=str(uuid.uuid4()))
            await saver.aput_writes(config, [("iterations", step)], task_id=str(uuid.uuid4()))
        return thread_id

    async def left(thread_id: str):
        async with checkpointer() as saver, saver.conn.connection() as conn:
            rows = []
            for sql in ("SELECT parent_checkpoint_id IS NULL AS root FROM checkpoints WHERE thread_id = %s "
                        "ORDER BY checkpoint_id",
                        "SELECT channel FROM checkpoint_writes WHERE thread_id = %s ORDER BY channel",
                        "SELECT channel FROM checkpoint_blobs WHERE thread_id = %s ORDER BY channel"):
                rows.append([tuple(row.values()) for row in await (await conn.execute(sql, (thread_id,))).fetchall()])
        return rows

    try:
        async with checkpointer() as saver:
            by_aprune, by_statement = await thread(saver), await thread(saver)
            await saver.aprune([by_aprune], strategy="keep_latest")
        await checkpoint.checkpoint_prune(thread_id=by_statement)
        kept = await left(by_statement)
        assert kept == await left(by_aprune)
        assert len(kept[0]) == (2 if version < 4 and sends else 1)
    finally:
        await checkpoint.checkpoint_pools_close()


async def test_a_tool_turn_reads_back_none_of_its_own_checkpoint_writes(agent_app, plain_user, fake_upstream,
                                                                        monkeypatch):
    """Every write of the run's own steps (aupdate_state) reads the thread's latest checkpoint first: the one this run
    just wrote, answered from memory as the graph's loop goes on from the checkpoint it holds. Only an existing
    conversation's opening reads go to the database (its history, then its first write's); the state left is the
    same (compared with a graph run above)."""
    async with checkpointer() as saver:
        saver_class = type(saver)
    reads: list[str] = []
    aget_tuple = saver_class.aget_tuple

    async def counted_aget_tuple(self, config):
        reads.append(config["configurable"]["thread_id"])
        return await aget_tuple(self, config)

    monkeypatch.setattr(saver_class, "aget_tuple", counted_aget_tuple)
    calls_the_tool = Reply(text="Let me look.", tool_calls=[_UTC])
    fake_upstream.script(calls_the_tool, calls_the_tool, Reply(text="It is noon."),
                         calls_the_tool, calls_the_tool, Reply(text="Still noon."))
    first = await run_all(TurnRequest(app=agent_app, query="time?", owner=plain_user))
    session_id = first[0].session_id
    assert first[-1].status == "normal" and reads == []
    second = await run_all(TurnRequest(app=agent_app, query="again?", owner=plain_user, session_id=session_id))
    assert second[-1].answer == "Let me look.\nLet me look.\nStill noon." and reads == [session_id] * 2
    monkeypatch.undo()
    async with checkpointer() as saver:
        state = await graph.agent_graph(checkpointer=saver).aget_state({"configurable": {"thread_id": session_id}})
    assert [type(m).__name__ for m in state.values["messages"]] == [
        "HumanMessage", "AIMessage", "ToolMessage", "AIMessage", "ToolMessage", "AIMessage",
        "HumanMessage", "AIMessage", "ToolMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert (state.values["iterations"], state.next) == (3, ())
