"""Whether a pooled PostgreSQL connection needs a query to tell that it is alive (Django's pool and the checkpoint
pool both ask before they lend one)."""
from __future__ import annotations

import select

import psycopg
from psycopg.pq import TransactionStatus


def connection_quiet(connection: psycopg.Connection | psycopg.AsyncConnection) -> bool:
    """Whether an idle pooled connection looks alive without asking the server: open, outside a transaction, and
    nothing waiting on its socket. The server closing it (a restart, a terminated backend, a proxy cutting it)
    makes the socket readable, as would a notice it sent; either way the caller checks it with a query."""
    if connection.closed or connection.info.transaction_status != TransactionStatus.IDLE:
        return False
    poller = select.poll()  # not select(): a busy worker's descriptors run past FD_SETSIZE
    poller.register(connection.pgconn.socket, select.POLLIN | select.POLLPRI)
    return not poller.poll(0)
