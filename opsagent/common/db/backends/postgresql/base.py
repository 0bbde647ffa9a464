"""Django's PostgreSQL backend and its psycopg pool, failing fast while the database is down and recovering at once.

Django's pool makes a request wait up to the pool's timeout (DATABASE_POOL_TIMEOUT) for a connection, whether the
pool is only busy or the database is gone, and it hands out connections that died with the server. Once the database
is back, the pool reconnects on its own doubling delay, so the first requests waited again. Here:
- while the database is known down (opsagent.common.dependencies.database), a connection is refused at once (a 503);
- a borrowed connection that may have died is checked first (an empty query): a dead one is dropped and the next
  one taken. An idle connection whose socket has nothing to read is alive as far as a check could tell (a server
  that closed it, or went away with a reset, leaves it readable), so that one is handed out without the round trip;
- a request the pool keeps waiting asks the database itself (a direct connection, DATABASE_CONNECT_TIMEOUT): when
  that fails the database is down, and the request fails now instead of at the pool's timeout;
- when the retry time comes, one request connects directly; if that works, the pool is replaced by a fresh one, so
  no request waits for the old pool's reconnection delay.
"""
from __future__ import annotations

import threading
import time

import psycopg
from django.db.backends.postgresql import base
from psycopg_pool import PoolClosed, PoolTimeout

from opsagent.common.db.liveness import connection_quiet
from opsagent.common.dependencies import DependencyUnavailable, database

# How long a request waits for the pool before it checks that the database is there at all.
POOL_WAIT_SLICE = 1.0


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params):
        if database.check():
            self._probe(conn_params)
            self._replace_pool()
            database.up()
        if self.pool is None:
            return self._connect_directly(conn_params)
        return self._borrow(conn_params)

    def _replace_pool(self) -> None:
        """Drop the pool: its connections died with the server, and it may be waiting out a reconnection delay. The
        next use makes a fresh one. The old one closes in the background (closing waits for its worker threads)."""
        old = self._connection_pools.pop(self.alias, None)
        if old is not None:
            threading.Thread(target=old.close, name="close-db-pool", daemon=True).start()

    def _connect_directly(self, conn_params):
        try:
            return self.Database.connect(**conn_params)
        except psycopg.OperationalError as exc:
            database.down(exc)
            raise DependencyUnavailable(database.name) from exc

    def _probe(self, conn_params) -> None:
        """Connect without the pool (or raise DependencyUnavailable, the database marked down)."""
        self._connect_directly(conn_params).close()

    def _borrow(self, conn_params):
        deadline = time.monotonic() + self.pool.timeout
        while True:
            pool = self.pool
            pool.open()
            try:
                connection = pool.getconn(timeout=max(0.001, min(POOL_WAIT_SLICE, deadline - time.monotonic())))
            except PoolClosed:
                continue  # replaced by another request that saw the database come back
            except PoolTimeout as exc:
                if time.monotonic() >= deadline:
                    raise DependencyUnavailable(database.name) from exc  # busy, not down: nothing is marked
                self._probe(conn_params)
                continue
            if not connection_quiet(connection):
                try:
                    connection.execute("")
                except psycopg.Error:
                    pool.putconn(connection)  # broken: the pool closes it and opens another
                    continue
            return connection

