"""Writes on the hot path whose SQL is written once per model and shape instead of compiled by the ORM on every
call: what QuerySet.update() with F() additions and bulk_create() send, without their per-call compilation (which
costs more CPU than running the statement, at the end of every turn). Values go through each field's own
get_db_prep_save, so every backend gets what the ORM would send it; no model signals are sent, as with update() and
bulk_create()."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

from django.db import connections, models, transaction

DEFAULT_DB = "default"

# Inside statements_together: the writes waiting to be sent, as (database alias, SQL, parameters).
_together: ContextVar[list[tuple[str, str, list[Any]]] | None] = ContextVar("statements_together", default=None)


@contextlib.contextmanager
def statements_together(*, using: str = DEFAULT_DB) -> Iterator[None]:
    """The row_update and rows_insert calls inside are sent together when the block ends (nothing is sent if it
    raises). On PostgreSQL as one statement, each write a data-modifying WITH clause: atomic by itself, so no
    transaction around it, one round trip instead of one per write plus BEGIN and COMMIT, and the rows it updates
    are locked only while it runs. Elsewhere one after another in one transaction. For writes whose callers need
    nothing back: row_update returns None inside."""
    if _together.get() is not None:
        yield
        return
    waiting: list[tuple[str, str, list[Any]]] = []
    token = _together.set(waiting)
    try:
        yield
    finally:
        _together.reset(token)
    if any(alias != using for alias, _, _ in waiting):
        raise ValueError(f"statements_together(using={using!r}) got a write for another database")
    connection = connections[using]
    if len(waiting) > 1 and connection.vendor == "postgresql":
        clauses = ", ".join(f"w{i} AS ({sql})" for i, (_, sql, _) in enumerate(waiting[:-1]))
        sql = f"WITH {clauses} {waiting[-1][1]}"
        with connection.cursor() as cursor:
            cursor.execute(sql, [param for _, _, params in waiting for param in params])
        return
    with transaction.atomic(using=using) if len(waiting) > 1 else contextlib.nullcontext():
        with connection.cursor() as cursor:
            for _, sql, params in waiting:
                cursor.execute(sql, params)


def _send(using: str, sql: str, params: list[Any]) -> int | None:
    """Run one write now (its row count), or keep it for the statements_together block around it (None)."""
    waiting = _together.get()
    if waiting is not None:
        waiting.append((using, sql, params))
        return None
    with connections[using].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def row_update(model: type[models.Model], pk: Any, *, values: Mapping[str, Any],
               increments: Mapping[str, Any] | None = None, using: str = DEFAULT_DB) -> int | None:
    """UPDATE the row `pk` of `model`: `values` set (field names or attnames), `increments` added to the stored
    value in the database (`F(name) + amount`). Returns the number of rows changed (0 or 1), or None inside
    statements_together (sent later)."""
    increments = increments or {}
    connection = connections[using]
    sql = _update_sql(model, tuple(values), tuple(increments), connection.vendor, using)
    meta = model._meta
    params = [meta.get_field(name).get_db_prep_save(value, connection) for name, value in values.items()]
    params += [meta.get_field(name).get_db_prep_save(amount, connection) for name, amount in increments.items()]
    params.append(meta.pk.get_db_prep_save(pk, connection))
    return _send(using, sql, params)


def rows_insert(model: type[models.Model], rows: Sequence[Mapping[str, Any]], *, using: str = DEFAULT_DB) -> None:
    """INSERT `rows` (each the same field names or attnames; the primary key left to the database or a field
    default when absent) in one statement."""
    if not rows:
        return
    connection = connections[using]
    names = tuple(rows[0])
    meta = model._meta
    fields = [meta.get_field(name) for name in names]
    sql = _insert_sql(model, names, len(rows), connection.vendor, using)
    params = [field.get_db_prep_save(row[name], connection) for row in rows for name, field in zip(names, fields,
                                                                                                      strict=True)]
    _send(using, sql, params)


@lru_cache(maxsize=64)
def _update_sql(model: type[models.Model], values: tuple[str, ...], increments: tuple[str, ...], vendor: str,
                using: str) -> str:
    quote = connections[using].ops.quote_name
    meta = model._meta
    column = {name: quote(meta.get_field(name).column) for name in (*values, *increments)}
    sets = [f"{column[name]} = %s" for name in values]
    sets += [f"{column[name]} = {column[name]} + %s" for name in increments]
    return f"UPDATE {quote(meta.db_table)} SET {', '.join(sets)} WHERE {quote(meta.pk.column)} = %s"


@lru_cache(maxsize=64)
def _insert_sql(model: type[models.Model], names: tuple[str, ...], count: int, vendor: str, using: str) -> str:
    quote = connections[using].ops.quote_name
    meta = model._meta
    columns = ", ".join(quote(meta.get_field(name).column) for name in names)
    row = f"({', '.join(['%s'] * len(names))})"
    return f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES {', '.join([row] * count)}"


def instance_insert(instance: models.Model, *, using: str = DEFAULT_DB) -> None:
    """Save a new `instance` (its primary key set by a field default) with one INSERT written once per model, as
    `Model.save()` would for a new row: fields prepared by their pre_save (auto_now_add times), no signals sent (the
    models written this way have no receivers)."""
    instances_insert([instance], using=using)


def instances_insert(instances: Sequence[models.Model], *, using: str = DEFAULT_DB) -> None:
    """Save new `instances` of one model (each with its primary key set) with one INSERT, as instance_insert does
    for one: what `bulk_create` sends, without its per-call compilation and, on its own, without the transaction
    bulk_create opens around a statement that is atomic by itself."""
    if not instances:
        return
    model = type(instances[0])
    meta = model._meta
    rows = []
    for instance in instances:
        if type(instance) is not model:
            raise ValueError("instances_insert takes instances of one model")
        if getattr(instance, meta.pk.attname) is None:
            raise ValueError(f"{meta.label} needs its primary key before instance_insert")
        rows.append({field.attname: field.pre_save(instance, True) for field in meta.concrete_fields})
    rows_insert(model, rows, using=using)
    for instance in instances:
        instance._state.adding = False
        instance._state.db = using
