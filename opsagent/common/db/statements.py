"""Writes on the hot path whose SQL is written once per model and shape instead of compiled by the ORM on every
call: what QuerySet.update() with F() additions and bulk_create() send, without their per-call compilation (which
costs more CPU than running the statement, at the end of every turn). Values go through each field's own
get_db_prep_save, so every backend gets what the ORM would send it; no model signals are sent, as with update() and
bulk_create()."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from django.db import connections, models

DEFAULT_DB = "default"


def row_update(model: type[models.Model], pk: Any, *, values: Mapping[str, Any],
               increments: Mapping[str, Any] | None = None, using: str = DEFAULT_DB) -> int:
    """UPDATE the row `pk` of `model`: `values` set (field names or attnames), `increments` added to the stored
    value in the database (`F(name) + amount`). Returns the number of rows changed (0 or 1)."""
    increments = increments or {}
    connection = connections[using]
    sql = _update_sql(model, tuple(values), tuple(increments), connection.vendor, using)
    meta = model._meta
    params = [meta.get_field(name).get_db_prep_save(value, connection) for name, value in values.items()]
    params += [meta.get_field(name).get_db_prep_save(amount, connection) for name, amount in increments.items()]
    params.append(meta.pk.get_db_prep_save(pk, connection))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


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
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


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
    meta = instance._meta
    if getattr(instance, meta.pk.attname) is None:
        raise ValueError(f"{meta.label} needs its primary key before instance_insert")
    rows_insert(type(instance), [{field.attname: field.pre_save(instance, True) for field in meta.concrete_fields}],
                using=using)
    instance._state.adding = False
    instance._state.db = using
