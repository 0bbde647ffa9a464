"""The LangGraph checkpointer in the project's own database (PostgreSQL or SQLite): a saver per run, over connections
kept per event loop, and the pruning of a conversation's superseded checkpoints."""
from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import weakref
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import aiosqlite
import psycopg
from django.conf import settings
from langgraph.checkpoint.base import BaseCheckpointSaver, CheckpointTuple, get_checkpoint_metadata
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from opsagent.common.db.liveness import connection_quiet
from opsagent.common.dependencies import DependencyUnavailable, database

logger = logging.getLogger(__name__)

# Databases whose checkpoint tables exist already (the name changes under pytest-django, so it is part of the key).
_ready: set[str] = set()
_setup_lock = asyncio.Lock()


def _postgres_conninfo() -> str:
    db = settings.DATABASES["default"]
    params = {
        "dbname": db["NAME"],
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
        "host": db.get("HOST") or None,
        "port": str(db["PORT"]) if db.get("PORT") else None,
        "connect_timeout": str(settings.DATABASE_CONNECT_TIMEOUT),
    }
    return _conninfo(tuple((k, v) for k, v in params.items() if v is not None))


@functools.lru_cache(maxsize=16)
def _conninfo(params: tuple[tuple[str, str], ...]) -> str:
    """The connection string of `params`, built once: every run asks for it, and psycopg's make_conninfo parses and
    quotes each time (about 50 us of a streamed chat turn's CPU)."""
    return make_conninfo(**dict(params))


# The key of the PostgreSQL advisory lock that serialises the checkpoint tables' setup across processes.
SETUP_LOCK_KEY = 0x6F70736167656E74  # "opsagent"


async def _set_up(saver: AsyncPostgresSaver, conninfo: str) -> None:
    """Create or migrate the checkpoint tables once per process. Workers starting together on a new database would
    each insert the same version into checkpoint_migrations (a unique violation: a failed first turn), so the setup
    runs under an advisory lock held on a connection of its own; the next worker waits and finds the work done.

    The others poll for the lock instead of blocking on it: a session blocked in pg_advisory_lock is a running
    statement with a snapshot, and the setup's CREATE INDEX CONCURRENTLY waits for every such snapshot to end."""
    if conninfo not in _ready:
        async with _setup_lock:
            if conninfo not in _ready:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as lock:
                    while not (await (await lock.execute("SELECT pg_try_advisory_lock(%s)",
                                                         (SETUP_LOCK_KEY,))).fetchone())[0]:
                        await asyncio.sleep(0.05)
                    await saver.setup()  # closing `lock` releases the lock, whatever happens here
                _ready.add(conninfo)


# PostgreSQL connections for checkpoints, per event loop (a psycopg async pool belongs to the loop that opened it):
# daphne runs one loop, so a server reuses its connections instead of connecting for every run (several ms, and a
# backend process started on the server each time). Processes that run many short loops (tests, commands) can set
# AGENT_CHECKPOINT_POOL_SIZE=0 to connect per run instead.
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncConnectionPool]] = (
    weakref.WeakKeyDictionary()
)


# Pools being closed in the background (referenced so that their tasks are not garbage-collected).
_closing: set[asyncio.Task] = set()


def _pool_timeout() -> float:
    """How long a run waits for a checkpoint connection: as long as a request waits for Django's pool."""
    options = settings.DATABASES["default"].get("OPTIONS", {}).get("pool")
    return float(options.get("timeout", 30.0)) if isinstance(options, dict) else 30.0


async def _check_unless_quiet(connection: psycopg.AsyncConnection) -> None:
    """The pool's check of a connection it lends: a query only when the connection may have died (see
    connection_quiet), so that a healthy one costs no round trip."""
    if not connection_quiet(connection):
        await AsyncConnectionPool.check_connection(connection)


async def _pool_of_this_loop(conninfo: str) -> AsyncConnectionPool:
    pools = _pools.setdefault(asyncio.get_running_loop(), {})
    pool = pools.get(conninfo)
    if pool is not None and pool.recoveries != database.recoveries:
        # Made before the database last came back: its connections are dead and it may be waiting out a
        # reconnection delay. A fresh pool connects at once; the old one closes in the background.
        del pools[conninfo]
        _closing.add(task := asyncio.create_task(pool.close()))
        task.add_done_callback(_closing.discard)
        pool = None
    if pool is None:
        pool = pools[conninfo] = AsyncConnectionPool(
            conninfo, min_size=1, max_size=settings.AGENT_CHECKPOINT_POOL_SIZE, open=False,
            # What the saver needs of its connections: each write commits at once; no server-side prepared
            # statements (they break behind PgBouncer); rows as dicts.
            kwargs={"autocommit": True, "prepare_threshold": None, "row_factory": dict_row},
            # As Django's pool (opsagent/common/db/backends/postgresql): connections that died with the server are
            # dropped when borrowed, and reconnecting never waits long between attempts.
            check=_check_unless_quiet, reconnect_timeout=settings.DEPENDENCY_RETRY_SECONDS,
            timeout=_pool_timeout(),
        )
        pool.recoveries = database.recoveries
    await pool.open()  # a no-op once open; concurrent first runs wait for the same opening
    return pool


# On SQLite, one checkpoint connection per event loop and database file, shared by the loop's runs (as the
# PostgreSQL pool above): an aiosqlite connection is a thread of its own plus a new SQLite connection, whose first
# statement and first write are its slowest, and under a burst every run would start both. The runs' savers share
# the connection's lock too. A saver holds its lock for the whole of each operation, and that is what makes sharing
# safe: a read still stepping through its rows holds a snapshot, and another saver writing on the same connection
# meanwhile would fail at once ("database is locked") instead of waiting.
_sqlite_connections: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Future]] = (
    weakref.WeakKeyDictionary()
)


async def _sqlite_connect(path: str, timeout: float, *, shared: bool = False) -> aiosqlite.Connection:
    # Autocommit: a run cancelled between an INSERT and its COMMIT (a stop, a disconnect) must not leave a
    # transaction holding the database's write lock. The busy timeout is Django's, so the saver waits for the ORM's
    # write lock instead of failing.
    conn = aiosqlite.connect(path, timeout=timeout, isolation_level=None)
    if shared:
        # The shared connection lives as long as its loop, a server's whole life, and nothing closes it at exit:
        # aiosqlite's worker thread would then keep the process from exiting. Each write is committed when made.
        conn._thread.daemon = True
    opening = asyncio.ensure_future(_sqlite_opened(conn))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        # Cancelled (a client gone) while the connection's thread opens it: the opening finishes and is closed
        # before this gives up, a millisecond later. A connection left behind would keep its thread alive, working
        # for a loop that may be closed by then.
        await asyncio.wait([opening])
        if not opening.cancelled() and opening.exception() is None:
            await opening.result().close()
        raise


async def _sqlite_opened(conn: aiosqlite.Connection) -> aiosqlite.Connection:
    await conn
    try:
        await conn.execute("PRAGMA synchronous=NORMAL")  # as Django's connections: WAL makes this durable enough
    except BaseException:
        await conn.close()
        raise
    return conn


async def _sqlite_connection_of_this_loop(path: str, timeout: float) -> aiosqlite.Connection:
    connections = _sqlite_connections.setdefault(asyncio.get_running_loop(), {})
    opening = connections.get(path)
    if opening is None or (opening.done() and (opening.cancelled() or opening.exception() is not None)):
        opening = connections[path] = asyncio.ensure_future(_sqlite_connect(path, timeout, shared=True))
    # Shielded: a run cancelled while the connection opens leaves the opening to the runs that wait for it too.
    return await asyncio.shield(opening)


_sqlite_locks: weakref.WeakKeyDictionary[aiosqlite.Connection, asyncio.Lock] = weakref.WeakKeyDictionary()


def _sqlite_saver(conn: aiosqlite.Connection, *, shared: bool) -> AsyncSqliteSaver:
    saver = AsyncSqliteSaver(conn)
    if shared:
        saver.lock = _sqlite_locks.setdefault(conn, asyncio.Lock())
    return saver


async def checkpoint_pools_close() -> None:
    """Close this loop's checkpoint connections (for processes that end a loop and keep running), once the prunes
    still running on it are done."""
    prunes = _prunes.pop(asyncio.get_running_loop(), set())
    if prunes:
        await asyncio.wait(prunes)
    for pool in _pools.pop(asyncio.get_running_loop(), {}).values():
        await pool.close()
    for opening in _sqlite_connections.pop(asyncio.get_running_loop(), {}).values():
        if opening.done() and not opening.cancelled() and opening.exception() is None:
            await opening.result().close()


@asynccontextmanager
async def checkpointer() -> AsyncIterator[BaseCheckpointSaver]:
    """A saver for the duration of one run, on this event loop's checkpoint connections (a pool on PostgreSQL, one
    shared connection on SQLite), or on a connection of its own when AGENT_CHECKPOINT_POOL_SIZE is 0."""
    db = settings.DATABASES["default"]
    pooled = settings.AGENT_CHECKPOINT_POOL_SIZE > 0
    if db["ENGINE"].endswith("postgresql"):
        conninfo = _postgres_conninfo()
        # While the database is (or was until this moment) down, the pool's connections are suspect: a connection of
        # the run's own fails at once if the server is gone, and does not wait out the pool's reconnection delay.
        if pooled and not database.is_down:
            saver = AsyncPostgresSaver(await _pool_of_this_loop(conninfo))
            await _set_up(saver, conninfo)
            yield saver
            return
        async with AsyncPostgresSaver.from_conn_string(conninfo) as saver:
            await _set_up(saver, conninfo)
            yield saver
        return
    timeout = float(db.get("OPTIONS", {}).get("timeout", 20))
    path = str(db["NAME"])
    conn = await (_sqlite_connection_of_this_loop(path, timeout) if pooled else _sqlite_connect(path, timeout))
    try:
        saver = _sqlite_saver(conn, shared=pooled)
        # A new saver runs its setup script (a write transaction on the shared file) before its first read or write,
        # in the middle of the run's stream: once a run has set the tables up, later savers skip it. The first one
        # sets up lazily, in its run: a saver opened ahead must not write while the turn's rows are being written.
        if path in _ready:
            saver.is_setup = True
        yield saver
        if saver.is_setup:
            _ready.add(path)
    finally:
        if not pooled:
            await asyncio.shield(conn.close())


# Prunes running on each loop: referenced until they end (a task only the loop knows of may be garbage-collected
# while it runs), and waited for before the loop's connections close.
_prunes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[asyncio.Task]] = weakref.WeakKeyDictionary()

# SQLite: the checkpoints of a thread older than the latest of their namespace, and the writes pending on them. Each
# statement stands alone: a checkpoint saved between the two only leaves writes that the next prune deletes, and
# writes saved before their own checkpoint (a run saves both in the background) belong to a newer checkpoint than
# the latest one saved, so they stay.
_SQLITE_PRUNE = (
    """DELETE FROM writes WHERE thread_id = ?1 AND checkpoint_id < (
        SELECT max(c.checkpoint_id) FROM checkpoints c
        WHERE c.thread_id = ?1 AND c.checkpoint_ns = writes.checkpoint_ns)""",
    """DELETE FROM checkpoints WHERE thread_id = ?1 AND checkpoint_id < (
        SELECT max(c.checkpoint_id) FROM checkpoints c
        WHERE c.thread_id = ?1 AND c.checkpoint_ns = checkpoints.checkpoint_ns)""",
)


# PostgreSQL: the same in one statement, and the blobs only the deleted checkpoints used. langgraph-checkpoint-postgres'
# own prune (aprune, strategy "keep_latest") takes a REPEATABLE READ transaction of a dozen round trips and more for
# the same rows (with checks for what this project's graph never has: DeltaChannels, subgraph calls); every run that
# steps the graph ends with one. One statement reads one snapshot, as that transaction did, so what a run of the
# thread saves meanwhile is neither seen nor deleted: its checkpoints are newer than the latest seen, its writes go
# with them, and its blobs are new versions or ones the latest seen references, which stay. What is kept: per
# namespace the latest checkpoint (and, before checkpoint format 4, its parent when its pending sends are there), with
# their writes; a kept checkpoint's parent pointer is cleared once the parent is gone, as aprune does. A second prune
# of the thread at the same moment finds the rows gone and leaves them (no serialization failure to log). A subgraph
# call's namespace keeps its latest checkpoint too (aprune drops the whole call once its root checkpoint is saved):
# this project's graph has none.
_POSTGRES_PRUNE = """
WITH latest AS (
    SELECT DISTINCT ON (checkpoint_ns) checkpoint_ns, checkpoint_id, parent_checkpoint_id,
        (checkpoint ->> 'v')::int AS v
    FROM checkpoints WHERE thread_id = %(thread)s
    ORDER BY checkpoint_ns DESC, checkpoint_id DESC
), heads AS (
    SELECT l.checkpoint_ns, l.checkpoint_id AS head,
        CASE WHEN l.v < 4 AND EXISTS (
            SELECT 1 FROM checkpoint_writes w
            WHERE w.thread_id = %(thread)s AND w.checkpoint_ns = l.checkpoint_ns
                AND w.checkpoint_id = l.parent_checkpoint_id AND w.channel = '__pregel_tasks'
        ) THEN l.parent_checkpoint_id END AS sends_parent
    FROM latest l
), deleted AS (
    DELETE FROM checkpoints c USING heads h
    WHERE c.thread_id = %(thread)s AND c.checkpoint_ns = h.checkpoint_ns AND c.checkpoint_id < h.head
        AND c.checkpoint_id IS DISTINCT FROM h.sends_parent
    RETURNING c.checkpoint_ns, c.checkpoint_id, c.checkpoint -> 'channel_versions' AS versions
), writes AS (
    DELETE FROM checkpoint_writes w USING deleted d
    WHERE w.thread_id = %(thread)s AND w.checkpoint_ns = d.checkpoint_ns AND w.checkpoint_id = d.checkpoint_id
), parents AS (
    UPDATE checkpoints c SET parent_checkpoint_id = NULL FROM heads h
    WHERE c.thread_id = %(thread)s AND c.checkpoint_ns = h.checkpoint_ns AND c.checkpoint_id IN (h.head, h.sends_parent)
        AND c.parent_checkpoint_id IN (SELECT d.checkpoint_id FROM deleted d WHERE d.checkpoint_ns = h.checkpoint_ns)
), kept AS (
    SELECT c.checkpoint_ns, v.key AS channel, v.value AS version
    FROM heads h
    JOIN checkpoints c ON c.thread_id = %(thread)s AND c.checkpoint_ns = h.checkpoint_ns
        AND c.checkpoint_id IN (h.head, h.sends_parent)
    CROSS JOIN LATERAL jsonb_each_text(c.checkpoint -> 'channel_versions') AS v
), freed AS (
    SELECT DISTINCT d.checkpoint_ns, v.key AS channel, v.value AS version
    FROM deleted d CROSS JOIN LATERAL jsonb_each_text(d.versions) AS v
    EXCEPT
    SELECT checkpoint_ns, channel, version FROM kept
)
DELETE FROM checkpoint_blobs b USING freed f
WHERE b.thread_id = %(thread)s AND b.checkpoint_ns = f.checkpoint_ns AND b.channel = f.channel
    AND b.version = f.version
"""


async def checkpoint_prune(*, thread_id: str) -> None:
    """Delete what a conversation no longer needs from the checkpoint tables: every checkpoint but the latest, and
    the writes pending on them (on PostgreSQL also the channel blobs only they used). Resuming reads the latest
    checkpoint and its pending writes only: the next turn's history, a stopped run's partial answer and a pending
    approval's interrupt are all there. Without this, every step's checkpoint stays, each with the history as it
    was then: storage quadratic in the length of the conversation.

    The prune runs in a task of its own that a cancelled caller (a client gone) does not cancel. It is best effort:
    one that fails (the database gone meanwhile) is logged, and the next one of the thread deletes everything
    superseded, its own run's checkpoints and any left before. On PostgreSQL it is one statement (_POSTGRES_PRUNE)."""
    task = asyncio.ensure_future(_prune(thread_id))
    prunes = _prunes.setdefault(asyncio.get_running_loop(), set())
    prunes.add(task)
    task.add_done_callback(prunes.discard)
    await asyncio.shield(task)


async def _prune(thread_id: str) -> None:
    try:
        async with checkpointer() as saver:
            if isinstance(saver, AsyncPostgresSaver):
                async with _postgres_connection(saver) as conn:
                    await conn.execute(_POSTGRES_PRUNE, {"thread": thread_id})
                return
            await saver.setup()
            async with saver.lock:
                for sql in _SQLITE_PRUNE:
                    await saver.conn.execute(sql, (thread_id,))
    except (psycopg.OperationalError, sqlite3.OperationalError, OSError, DependencyUnavailable) as exc:
        # The database went away (or is busy): an outage the dependency checks already report, not a fault of ours.
        logger.warning("could not prune the checkpoints of thread %s: %s: %s", thread_id, type(exc).__name__,
                       str(exc).splitlines()[0][:200] if str(exc) else "")
    except Exception:
        logger.warning("could not prune the checkpoints of thread %s", thread_id, exc_info=True)


@asynccontextmanager
async def _postgres_connection(saver: AsyncPostgresSaver) -> AsyncIterator[psycopg.AsyncConnection]:
    """The saver's connection, as the saver itself takes it: one from its pool, or its own under its lock."""
    if isinstance(saver.conn, AsyncConnectionPool):
        async with saver.conn.connection() as conn:
            yield conn
    else:
        async with saver.lock:
            yield saver.conn


def own_writes_read_back(saver: BaseCheckpointSaver, *, thread_id: str, known_empty: bool) -> BaseCheckpointSaver:
    """`saver` for a run that writes its conversation's checkpoints itself (agentcore.runs.lifecycle: each step it
    runs is one `aupdate_state`, which reads the thread's latest checkpoint before it writes): a read of that thread's
    latest checkpoint is answered without a query (a round trip, and loading and deserialising the history) when this
    saver knows it:
    - `known_empty`: the first run of a conversation created by its own turn, whose thread has no checkpoint yet, so
      the opening read (several ms on the critical path of a new conversation's first token) answers None;
    - right after this saver wrote the thread's checkpoint with `aupdate_state` (metadata source "update"): the
      checkpoint it wrote, as the graph's own loop goes on from the checkpoint it holds rather than reading it back.
    Each answer is given once (the reader may change what it is given). A write of a graph step, pending writes, or a
    read of another thread, namespace or checkpoint go to the database. The saver is the run's own, so this is set on
    this instance only."""
    saver_class = type(saver)
    known: list[CheckpointTuple | None] = [None] if known_empty else []

    def ours(configurable: dict) -> bool:
        return (str(configurable.get("thread_id")) == thread_id and not configurable.get("checkpoint_ns")
                and not configurable.get("checkpoint_id"))

    async def aget_tuple(config):
        if known and ours(config.get("configurable", {})):
            return known.pop()
        return await saver_class.aget_tuple(saver, config)

    async def aput(config, checkpoint, metadata, new_versions):
        known.clear()
        written = await saver_class.aput(saver, config, checkpoint, metadata, new_versions)
        configurable = config["configurable"]
        if (metadata.get("source") == "update" and str(configurable.get("thread_id")) == thread_id
                and not configurable.get("checkpoint_ns")):
            parent = configurable.get("checkpoint_id")
            known.append(CheckpointTuple(
                config=written, checkpoint=checkpoint, metadata=get_checkpoint_metadata(config, metadata),
                parent_config={"configurable": {"thread_id": thread_id, "checkpoint_ns": "", "checkpoint_id": parent}}
                if parent else None,
                pending_writes=[],
            ))
        return written

    async def aput_writes(config, writes, task_id, task_path=""):
        known.clear()
        return await saver_class.aput_writes(saver, config, writes, task_id, task_path)

    saver.aget_tuple = aget_tuple
    saver.aput = aput
    saver.aput_writes = aput_writes
    return saver


class SaverOpening:
    """A run's checkpointer, opened ahead of the run (start it before the turn's rows are written, so that the
    connection is made meanwhile: a few ms on PostgreSQL). The run uses it once with `use()`; `aclose()` releases it
    whether or not a run used it, and may be called any number of times.

    Only EARLY_LIMIT openings per process run ahead at a time: under a burst of requests the others would hold
    connections while they wait for the ORM thread, and PostgreSQL's connection limit is shared by every worker.
    The rest open when their run starts, as without this."""

    EARLY_LIMIT = 4
    _early = 0

    def __init__(self) -> None:
        self._stack = AsyncExitStack()
        self._task: asyncio.Task | None = None
        self._counted = SaverOpening._early < self.EARLY_LIMIT
        if self._counted:
            SaverOpening._early += 1
            self._open()

    def _open(self) -> None:
        self._task = asyncio.create_task(self._stack.enter_async_context(checkpointer()))

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            SaverOpening._early -= 1

    @asynccontextmanager
    async def use(self) -> AsyncIterator[BaseCheckpointSaver]:
        self._uncount()
        if self._task is None:
            self._open()
        try:
            yield await self._task
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        self._uncount()
        if self._task is None:
            return
        if not self._task.done():
            self._task.cancel()
        await asyncio.wait([self._task])  # never raises: the opening's own error was (or is never) wanted
        if not self._task.cancelled():
            self._task.exception()  # retrieved, so a failed opening that no run used is not logged as lost
        await self._stack.aclose()
