"""The LangGraph checkpointer in the project's own database (PostgreSQL or SQLite), opened per run."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiosqlite
from django.conf import settings
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from psycopg.conninfo import make_conninfo

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
    }
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


@asynccontextmanager
async def checkpointer() -> AsyncIterator[BaseCheckpointSaver]:
    """A saver on its own connection for the duration of one run.

    A connection per run (not a process-wide pool) keeps the saver bound to the event loop that uses it: daphne
    runs one loop, but tests and management commands start many. Opening costs ~1 ms on SQLite, a few on PostgreSQL.
    """
    db = settings.DATABASES["default"]
    if db["ENGINE"] == "django.db.backends.postgresql":
        conninfo = _postgres_conninfo()
        async with AsyncPostgresSaver.from_conn_string(conninfo) as saver:
            if conninfo not in _ready:
                async with _setup_lock:
                    if conninfo not in _ready:
                        await saver.setup()
                        _ready.add(conninfo)
            yield saver
        return
    # The same busy timeout as Django's connection, so the saver waits for the ORM's write lock instead of failing.
    # Autocommit: each of the saver's writes is one statement, and a run cancelled between its INSERT and its COMMIT
    # (a stop, a disconnect) must not leave a transaction holding the database's write lock.
    timeout = float(db.get("OPTIONS", {}).get("timeout", 20))
    conn = await aiosqlite.connect(str(db["NAME"]), timeout=timeout, isolation_level=None)
    try:
        yield AsyncSqliteSaver(conn)
    finally:
        await asyncio.shield(conn.close())
