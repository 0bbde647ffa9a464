"""The SQLite backend keeps clean connections for the next hop (CONN_MAX_AGE stays 0) and closes everything else."""
from __future__ import annotations

import sqlite3
import threading

import pytest
from channels.db import database_sync_to_async
from django.db import connection, connections
from django.db.utils import OperationalError

from opsagent.common.db.backends.sqlite3.base import DatabaseWrapper, idle_connections


@pytest.fixture
def make_wrapper(tmp_path, django_db_blocker):
    """Wrappers on a database file of their own (not the test database), as Django builds one per thread."""
    made: list[DatabaseWrapper] = []

    def make(pool_size: int = 2, name: str | None = None) -> DatabaseWrapper:
        settings_dict = connections.configure_settings({"default": {}, "pooltest": {
            "ENGINE": "opsagent.common.db.backends.sqlite3",
            "NAME": name or str(tmp_path / "pool.sqlite3"),
            "CONN_MAX_AGE": 0,
            "OPTIONS": {"pool_size": pool_size, "init_command": "PRAGMA journal_mode=WAL;"},
        }})["pooltest"]
        wrapper = DatabaseWrapper(settings_dict, alias="pooltest")
        made.append(wrapper)
        return wrapper

    with django_db_blocker.unblock():
        yield make
    for wrapper in made:
        wrapper.close()
    idle_connections.close_all()


def _raw(wrapper: DatabaseWrapper) -> sqlite3.Connection:
    wrapper.ensure_connection()
    return wrapper.connection


def _closed(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return True
    return False


def test_a_closed_connection_is_handed_to_the_next_hop_with_what_it_wrote(make_wrapper):
    first = make_wrapper()
    raw = _raw(first)
    with first.cursor() as cursor:
        cursor.execute("CREATE TABLE t (v TEXT)")
        cursor.execute("INSERT INTO t VALUES ('kept')")
    first.close()
    assert first.connection is None  # Django's side of the close happened as with CONN_MAX_AGE=0

    # The next hop runs in another thread, as database_sync_to_async hops may.
    second = make_wrapper()
    taken = []
    thread = threading.Thread(target=lambda: taken.append(_raw(second)))
    thread.start()
    thread.join()
    assert taken == [raw]
    second.inc_thread_sharing()
    with second.cursor() as cursor:
        cursor.execute("SELECT v FROM t")
        assert cursor.fetchall() == [("kept",)]


def test_a_transaction_left_open_is_rolled_back_before_the_connection_is_reused(make_wrapper):
    first = make_wrapper()
    with first.cursor() as cursor:
        cursor.execute("CREATE TABLE t (v TEXT)")
    first.set_autocommit(False)
    with first.cursor() as cursor:
        cursor.execute("INSERT INTO t VALUES ('never committed')")
    raw = first.connection
    assert raw.in_transaction
    first.close()

    second = make_wrapper()
    assert _raw(second) is raw and not raw.in_transaction
    with second.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM t")
        assert cursor.fetchone() == (0,)


def test_a_connection_that_saw_a_database_error_is_closed_not_reused(make_wrapper):
    first = make_wrapper()
    raw = _raw(first)
    with pytest.raises(OperationalError), first.cursor() as cursor:
        cursor.execute("SELECT * FROM no_such_table")
    first.close()
    assert _closed(raw)
    assert _raw(make_wrapper()) is not raw


def test_a_connection_closed_inside_an_atomic_block_is_closed_not_reused(make_wrapper):
    first = make_wrapper()
    raw = _raw(first)
    first.set_autocommit(False)
    first.in_atomic_block = True  # what transaction.atomic() sets; close() then only marks the block as broken
    first.close()
    assert _closed(raw)
    assert idle_connections.count(first.pool_key) == 0


def test_only_pool_size_connections_stay_idle(make_wrapper):
    wrappers = [make_wrapper(pool_size=2) for _ in range(3)]
    raws = [_raw(w) for w in wrappers]
    for wrapper in wrappers:
        wrapper.close()
    assert idle_connections.count(wrappers[0].pool_key) == 2
    assert [_closed(r) for r in raws] == [False, False, True]


def test_pool_size_zero_closes_every_connection(make_wrapper):
    first = make_wrapper(pool_size=0)
    raw = _raw(first)
    first.close()
    assert _closed(raw)
    assert _raw(make_wrapper(pool_size=0)) is not raw


def test_an_in_memory_database_is_never_pooled(make_wrapper):
    wrapper = make_wrapper(name=":memory:")
    assert not wrapper._pooled()


@pytest.mark.skipif(connection.vendor != "sqlite", reason="the project's SQLite backend")
@pytest.mark.django_db(transaction=True)
async def test_the_projects_hops_close_their_connection_and_the_next_hop_reuses_it():
    assert isinstance(connections["default"], DatabaseWrapper)

    def hop():
        return _raw(connection)

    first = await database_sync_to_async(hop)()  # which closes Django's connection after the hop
    second = await database_sync_to_async(hop)()
    assert second is first and not _closed(first)
