"""The PostgreSQL backend's pool (opsagent/common/db/backends/postgresql): what a borrowed connection costs, and
that one the server ended is never lent."""
import time

import psycopg
import pytest
from django.db import connection

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="the pool of the PostgreSQL backend"),
]


def _observer() -> psycopg.Connection:
    """A connection of its own, outside the pool, to watch the pool's connections from the server's side."""
    db = connection.settings_dict
    return psycopg.connect(dbname=db["NAME"], user=db["USER"], password=db["PASSWORD"] or None,
                           host=db["HOST"] or None, port=db["PORT"] or None, autocommit=True)


def _lent_backend() -> int:
    connection.close()  # back to the pool: the next use borrows one
    connection.ensure_connection()
    return connection.connection.info.backend_pid


def test_a_quiet_pooled_connection_is_lent_without_a_query(transactional_db):
    with connection.cursor() as cursor:
        cursor.execute("SELECT 'marked'")
        marked = connection.connection.info.backend_pid
    last = None
    with _observer() as observer:
        for _ in range(connection.pool.max_size + 1):  # until the pool lends that connection again
            if _lent_backend() == marked:
                # The last statement it ran is still the one before it was lent: no check query.
                last = observer.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [marked]).fetchone()[0]
                break
    connection.close()
    assert last == "SELECT 'marked'"


def test_a_pooled_connection_the_server_ended_is_replaced_when_lent(transactional_db):
    _lent_backend()
    connection.close()
    with _observer() as observer:
        ended = observer.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'").fetchall()
    assert ended
    time.sleep(0.2)  # the server's goodbye reaches the pooled sockets
    for _ in range(3):  # every connection the pool held was ended
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
        connection.close()
