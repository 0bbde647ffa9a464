"""Django's SQLite backend, keeping a few idle connections per process for the next hop.

`CONN_MAX_AGE` stays 0, as ASGI needs: Django still closes the connection at the end of every database hop. As its
PostgreSQL pool does, this backend then hands the connection back to the process instead of closing it, and the next
hop (in any thread) takes it. A new SQLite connection is cheap to open but slow to use: its first statement maps the
WAL index and its first write opens the WAL, about a millisecond on every request's way to its first token, against
microseconds on a connection that has done it before.

Only a clean connection goes back: no atomic block, no transaction left open (one left by `set_autocommit(False)`
is rolled back first), no database error seen. Anything else is closed as before. Django finishes or closes every
cursor it opens, so a returned connection holds no read snapshot either. In-memory databases are never pooled
(Django keeps those open anyway). `OPTIONS["pool_size"]`: idle connections kept per database file (default 4, 0 turns
the pool off).
"""
from __future__ import annotations

import sqlite3
import threading

from django.db.backends.sqlite3 import base, creation

DEFAULT_POOL_SIZE = 4


class IdleConnections:
    """Idle raw connections per database (keyed by their connection parameters), most recently used first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[str, list[sqlite3.Connection]] = {}

    def take(self, key: str) -> sqlite3.Connection | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def give(self, key: str, conn: sqlite3.Connection, limit: int) -> bool:
        """Keep `conn` for the next taker; False when `limit` connections are idle already."""
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) >= limit:
                return False
            idle.append(conn)
            return True

    def count(self, key: str) -> int:
        with self._lock:
            return len(self._idle.get(key, ()))

    def close_all(self) -> None:
        with self._lock:
            connections = [conn for idle in self._idle.values() for conn in idle]
            self._idle.clear()
        for conn in connections:
            conn.close()


idle_connections = IdleConnections()


class DatabaseCreation(creation.DatabaseCreation):
    # A test database file is deleted and created again under the same name: idle connections to the old file
    # would keep reading the deleted one.
    def _create_test_db(self, *args, **kwargs):
        idle_connections.close_all()
        return super()._create_test_db(*args, **kwargs)

    def _destroy_test_db(self, *args, **kwargs):
        idle_connections.close_all()
        return super()._destroy_test_db(*args, **kwargs)


class DatabaseWrapper(base.DatabaseWrapper):
    creation_class = DatabaseCreation
    pool_key = ""
    pool_size = DEFAULT_POOL_SIZE

    def get_connection_params(self):
        params = super().get_connection_params()
        self.pool_size = int(params.pop("pool_size", DEFAULT_POOL_SIZE))
        return params

    def get_new_connection(self, conn_params):
        self.pool_key = repr(sorted(conn_params.items()))
        if self._pooled():
            conn = idle_connections.take(self.pool_key)
            if conn is not None:
                return conn
        return super().get_new_connection(conn_params)

    def _pooled(self) -> bool:
        return self.pool_size > 0 and not self.is_in_memory_db()

    def _close(self):
        conn = self.connection
        if conn is None:
            return
        if self._pooled() and not self.in_atomic_block and not self.errors_occurred and self._rolled_back(conn):
            if idle_connections.give(self.pool_key, conn, self.pool_size):
                return
        with self.wrap_database_errors:
            conn.close()

    @staticmethod
    def _rolled_back(conn: sqlite3.Connection) -> bool:
        """Whether `conn` is outside any transaction (after rolling back one left open)."""
        try:
            if conn.in_transaction:
                conn.rollback()
        except sqlite3.Error:
            return False
        return not conn.in_transaction
