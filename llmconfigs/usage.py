"""Usage of the providers: one ProviderCall row per call (written in bulk when a turn ends), the hourly and daily
rollups of those rows, retention, and the usage reports, read from the rollups plus the rows not rolled up yet so
that their numbers are always complete."""
from __future__ import annotations

import decimal
import gc
import math
import struct
import sys
import time
import uuid
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import accumulate, chain, islice, pairwise, repeat
from operator import add, itemgetter, mul
from typing import Any

import orjson
from django.conf import settings
from django.db import connection, transaction

from llmconfigs.models import (
    HISTOGRAM_BOUNDS_MS,
    HISTOGRAM_BUCKETS,
    LATENCY_COLUMNS,
    TTFT_COLUMNS,
    LLMConfig,
    ProviderCall,
    UsageRollup,
)
from llmconfigs.pricing import usage_cost
from opsagent.common.db.statements import rows_insert

# ----- recording -----


@dataclass(frozen=True)
class CallOrigin:
    """Who a provider call was made for."""

    app_id: str = ""
    app_name: str = ""
    key_id: str = ""
    user_id: int | None = None


@dataclass
class CallRecord:
    """One provider call as it is measured, before it is written (see provider_calls_record)."""

    config: LLMConfig
    kind: str
    started: float = field(default_factory=time.time)  # epoch seconds
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_category: str = ""


def provider_calls_record(*, calls: Sequence[CallRecord], origin: CallOrigin) -> None:
    """Write `calls` (one INSERT for all of them). The one place every provider call is recorded: called at the
    end of a turn, in the database hop that saves it, and after each title, suggestion and connection test."""
    if not calls or not settings.USAGE_RECORDING:
        return
    rows = []
    for call in calls:
        config = call.config
        # A provider's nonsense (a negative count) is stored, and priced, as nothing.
        prompt_tokens, completion_tokens = max(call.prompt_tokens, 0), max(call.completion_tokens, 0)
        cost = usage_cost(input_price_per_million=config.input_price_per_million,
                          output_price_per_million=config.output_price_per_million, currency=config.currency,
                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        rows.append(dict(
            created_at=datetime.fromtimestamp(call.started, UTC), config_id=config.pk, config_name=config.name[:100],
            model_name=config.model_name[:200], route=config.route_name[:200], app_id=origin.app_id,
            app_name=origin.app_name[:100], key_id=origin.key_id, user_id=origin.user_id, kind=call.kind,
            status=ProviderCall.Status.ERROR if call.error_category else ProviderCall.Status.OK,
            error_category=call.error_category[:32], latency_ms=max(call.latency_ms, 0.0), ttft_ms=call.ttft_ms,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost.total_price,
            currency=cost.currency, rollup_batch=None,
        ))
    # One INSERT written once per number of rows (bulk_create compiles it anew on every turn's end).
    rows_insert(ProviderCall, rows)


# ----- histograms -----


def histogram_index(value_ms: float) -> int:
    """The histogram bucket of a duration: bucket i holds values up to HISTOGRAM_BOUNDS_MS[i]."""
    return bisect_left(HISTOGRAM_BOUNDS_MS, value_ms)


# What a value in each bucket is reported as (a report's percentiles): the geometric middle of its bounds (half the
# first bound in the first bucket, the last bound above it), within a factor 2^(1/4) of the true value between 4 ms
# and 131 s.
_MIDDLES = (round(HISTOGRAM_BOUNDS_MS[0] / 2, 1),
            *(round(math.sqrt(low * high), 1) for low, high in pairwise(HISTOGRAM_BOUNDS_MS)),
            round(HISTOGRAM_BOUNDS_MS[-1], 1))

# UsageRollup.packed: calls, prompt tokens, completion tokens, cost (in units of 10^-7), then both histograms
# cumulated; unsigned 64-bit little-endian fields.
_PACKED = struct.Struct(f"<{4 + 2 * HISTOGRAM_BUCKETS}Q")
_PACKED_BYTES = _PACKED.size
_LATENCY_AT, _TTFT_AT = 4, 4 + HISTOGRAM_BUCKETS
_FIELD_MASK = (1 << 64) - 1
_COST_SHIFT = 3 * 64
_COST_PLACES = Decimal("0.0000001")
_FLOAT_DECIMAL = decimal.Context(prec=15).create_decimal_from_float
_LITTLE_ENDIAN = sys.byteorder == "little"


def rollup_packed(*, calls: int, prompt_tokens: int, completion_tokens: int, cost: Decimal | float,
                  latency: Sequence[int], ttft: Sequence[int]) -> bytes:
    """The UsageRollup.packed value of these sums. Packed rows add up field by field as integers (int.from_bytes:
    one addition per row instead of one per column), and no field of a sum carries into the next one (every sum
    stays below 2**64: 1.8e19 calls or tokens, 1.8e12 in a currency); a report's percentiles are bisected in the
    cumulated histogram fields of its sums."""
    return _PACKED.pack(calls, prompt_tokens, completion_tokens, _cost_units(cost), *accumulate(latency),
                        *accumulate(ttft))


def rollup_entry_json(*, error_category: str, currency: str, packed: bytes | memoryview) -> str:
    """UsageRollup.entry_json of a row: what a report writes for an entry made of this row alone, after its bucket
    and group (`"calls":...}`). A report copies it as it is for such entries, most of those of a grouped series
    (docs/benchmarks.md#usage-reports), instead of working out percentiles, rate and cost text per entry."""
    fields = _fields(packed)
    return _entry_json("", fields, {error_category: fields[0]} if error_category else None,
                       _costs_json({currency: int.from_bytes(packed, "little")}, _currency_keys([currency])))


def _currency_keys(currencies: Iterable[str]) -> dict[str, str]:
    """Each currency's JSON key with the opening quote of its amount ("USD":")."""
    return {currency: orjson.dumps(currency).decode() + ':"' for currency in currencies}


def _cost_units(cost: Decimal | float | int | None) -> int:
    """A cost in units of 10^-7 (its seven decimal places; SQLite's float read to 15 digits, as Django does)."""
    return int(_as_decimal(cost).quantize(_COST_PLACES).scaleb(7))


def _cost_text(units: int) -> str:
    """A cost as the reports write it: str() of the Decimal with seven decimal places (which is scientific below
    1e-6: "0E-7", "5E-7")."""
    if units < 10:
        return str(Decimal(units).scaleb(-7))
    whole, fraction = divmod(units, 10_000_000)
    return f"{whole}.{fraction:07d}"


def _fields(packed: bytes | memoryview) -> Sequence[int]:
    """The fields of a packed value (a view over its bytes on little-endian machines, no copy)."""
    return memoryview(packed).cast("Q") if _LITTLE_ENDIAN else _PACKED.unpack(packed)


# ----- aggregation (shared by the rollup and the reports) -----


@dataclass
class Totals:
    """The sums of a set of calls of one error category (a rollup row, or a report row of calls not rolled up)."""

    label: str = ""
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: dict[str, Decimal] = field(default_factory=dict)
    latency: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)
    ttft: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)

    def add_call(self, *, latency_ms: float, ttft_ms: float | None, prompt_tokens: int,
                 completion_tokens: int, cost: Decimal, currency: str) -> None:
        self.calls += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost[currency] = self.cost.get(currency, Decimal(0)) + Decimal(cost)
        self.latency[histogram_index(latency_ms)] += 1
        if ttft_ms is not None:
            self.ttft[histogram_index(ttft_ms)] += 1


def bucket_start(moment: datetime, size: str) -> datetime:
    """The start (UTC) of the hour or day that holds `moment`."""
    moment = moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0) if size == UsageRollup.Size.DAY else moment


def bucket_length(size: str) -> timedelta:
    return timedelta(days=1) if size == UsageRollup.Size.DAY else timedelta(hours=1)


# ----- rollup and retention -----

ROLLUP_BATCH = 5000
_KEY_COLUMNS = ("size", "bucket", "config_id", "model_name", "route", "app_id", "key_id", "user_id", "kind",
                "error_category", "currency")
_LABEL_COLUMNS = ("config_name", "app_name", "user_name")
_SUM_COLUMNS = ("calls", "prompt_tokens", "completion_tokens", "cost", *LATENCY_COLUMNS, *TTFT_COLUMNS)
_RAW_FIELDS = ("created_at", "config_id", "config_name", "model_name", "route", "app_id", "app_name", "key_id",
               "user_id", "user__username", "kind", "error_category", "currency", "latency_ms", "ttft_ms",
               "prompt_tokens", "completion_tokens", "cost")
_UPSERT_ROWS = 100


def usage_rollup(*, batch_size: int = ROLLUP_BATCH) -> int:
    """Add every provider call not rolled up yet to its hour's and its day's rollup rows; returns how many calls it
    rolled up. Each batch is claimed, added and marked in one transaction, so a call is rolled up exactly once even
    when several runs overlap (a run skips the calls another one claimed)."""
    rolled = 0
    while True:
        claimed, seen = _rollup_batch(batch_size)
        rolled += claimed
        if seen < batch_size:
            return rolled


def _rollup_batch(batch_size: int) -> tuple[int, int]:
    with transaction.atomic():
        ids = list(ProviderCall.objects.filter(rollup_batch__isnull=True).order_by("created_at", "id")
                   .values_list("id", flat=True)[:batch_size])
        if not ids:
            return 0, 0
        batch = uuid.uuid4()
        # The claim: a row another run claimed first (and committed) no longer matches `rollup_batch IS NULL`.
        claimed = ProviderCall.objects.filter(id__in=ids, rollup_batch__isnull=True).update(rollup_batch=batch)
        groups: dict[tuple, Totals] = {}
        labels: dict[tuple, tuple[str, str, str]] = {}
        for row in ProviderCall.objects.filter(rollup_batch=batch).values_list(*_RAW_FIELDS).iterator():
            (created_at, config_id, config_name, model_name, route, app_id, app_name, key_id, user_id, user_name,
             kind, category, currency, latency_ms, ttft_ms, prompt_tokens, completion_tokens, cost) = row
            for size in UsageRollup.Size.values:
                key = (size, bucket_start(created_at, size), str(config_id or ""), model_name, route, app_id, key_id,
                       str(user_id or ""), kind, category, currency)
                groups.setdefault(key, Totals()).add_call(
                    latency_ms=latency_ms, ttft_ms=ttft_ms, prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens, cost=cost, currency=currency)
                labels[key] = (config_name, app_name, user_name or "")
        _upsert(groups, labels)
    return claimed, len(ids)


def _upsert(groups: dict[tuple, Totals], labels: dict[tuple, tuple[str, str, str]]) -> None:
    """INSERT ... ON CONFLICT DO UPDATE SET sum = sum + excluded.sum: additions in the database, in key order (two
    runs lock rows in the same order, so they cannot deadlock). Then each row's `packed` and `entry_json` from the
    sums the upsert returns: the row stays locked (PostgreSQL) or the database (SQLite) until the transaction ends, so
    no other run adds to it in between."""
    table = connection.ops.quote_name(UsageRollup._meta.db_table)
    columns = (*_KEY_COLUMNS, *_LABEL_COLUMNS, *_SUM_COLUMNS, "packed", "entry_json")
    quoted = [connection.ops.quote_name(c) for c in columns]
    sums = quoted[len(_KEY_COLUMNS) + len(_LABEL_COLUMNS):-2]
    updates = [f"{q} = {table}.{q} + excluded.{q}" for q in sums]
    updates += [f"{q} = excluded.{q}" for q in quoted[len(_KEY_COLUMNS):len(_KEY_COLUMNS) + len(_LABEL_COLUMNS)]]
    row_sql = "(" + ", ".join(["%s"] * len(columns)) + ")"
    returning = ", ".join(["id", "error_category", "currency", *sums])
    keys = sorted(groups, key=lambda k: tuple(str(part) for part in k))
    with connection.cursor() as cursor:
        for start in range(0, len(keys), _UPSERT_ROWS):
            chunk = keys[start:start + _UPSERT_ROWS]
            params: list[Any] = []
            for key in chunk:
                totals = groups[key]
                size, bucket, *dimensions = key
                params += [size, connection.ops.adapt_datetimefield_value(bucket), *dimensions, *labels[key],
                           totals.calls, totals.prompt_tokens, totals.completion_tokens,
                           sum(totals.cost.values(), Decimal(0)), *totals.latency, *totals.ttft, b"", ""]
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(quoted)}) VALUES {', '.join([row_sql] * len(chunk))} "
                f"ON CONFLICT ({', '.join(quoted[:len(_KEY_COLUMNS)])}) DO UPDATE SET {', '.join(updates)} "
                f"RETURNING {returning}",
                params,
            )
            updated = []
            for row_id, category, currency, calls, prompt, completion, cost, *histograms in cursor.fetchall():
                packed = rollup_packed(calls=calls, prompt_tokens=prompt, completion_tokens=completion, cost=cost,
                                       latency=histograms[:HISTOGRAM_BUCKETS], ttft=histograms[HISTOGRAM_BUCKETS:])
                updated.append((packed, rollup_entry_json(error_category=category, currency=currency, packed=packed),
                                row_id))
            cursor.executemany(f"UPDATE {table} SET packed = %s, entry_json = %s WHERE id = %s", updated)


def usage_prune(*, now: datetime | None = None, batch_size: int = ROLLUP_BATCH) -> int:
    """Delete the provider calls older than USAGE_RETENTION_DAYS that are rolled up (their numbers stay in the
    rollups); returns how many. Calls not rolled up yet are kept until a rollup has taken them."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=settings.USAGE_RETENTION_DAYS)
    deleted = 0
    while True:
        ids = list(ProviderCall.objects.filter(created_at__lt=cutoff, rollup_batch__isnull=False)
                   .values_list("id", flat=True)[:batch_size])
        if not ids:
            return deleted
        deleted += ProviderCall.objects.filter(id__in=ids).delete()[0]


# ----- reports -----

MAX_PERIOD = {UsageRollup.Size.HOUR: timedelta(days=31), UsageRollup.Size.DAY: timedelta(days=366)}
DEFAULT_PERIOD = {UsageRollup.Size.HOUR: timedelta(days=1), UsageRollup.Size.DAY: timedelta(days=30)}
# group_by -> (the rollup column that identifies a group, the column that names it)
GROUPS = {
    "config": ("config_id", "config_name"),
    "model": ("model_name", "model_name"),
    "route": ("route", "route"),
    "app": ("app_id", "app_name"),
    "key": ("key_id", "key_id"),
    "user": ("user_id", "user_name"),
}
# filter name -> the column it narrows (rollups and raw rows alike)
FILTERS = ("config_id", "app_id", "key_id", "kind")


@dataclass(frozen=True)
class UsageQuery:
    """A report's period [start, end) (both on bucket edges, UTC), bucket size, grouping and filters; without
    `series`, only the totals per group (the database adds up the buckets, which is what a long grouped report
    spends its time on)."""

    start: datetime
    end: datetime
    bucket: str = UsageRollup.Size.HOUR
    group_by: str = ""
    filters: tuple[tuple[str, str], ...] = ()
    series: bool = True


def usage_period(*, start: datetime | None, end: datetime | None, bucket: str,
                 now: datetime | None = None) -> tuple[datetime, datetime]:
    """The period a report covers: `start` down and `end` up to bucket edges (UTC); by default the last day (hour
    buckets) or 30 days (day buckets) up to now. Raises ValueError for an empty period or one longer than
    MAX_PERIOD."""
    length = bucket_length(bucket)
    if end is None:
        end = (now or datetime.now(UTC))
    end_edge = bucket_start(end, bucket)
    if end_edge < end.astimezone(UTC):
        end_edge += length
    start_edge = bucket_start(start, bucket) if start is not None else end_edge - DEFAULT_PERIOD[bucket]
    if start_edge >= end_edge:
        raise ValueError("The period is empty: 'from' must be before 'to'.")
    if end_edge - start_edge > MAX_PERIOD[bucket]:
        raise ValueError(f"The period is longer than {MAX_PERIOD[bucket].days} days, the most a report with "
                         f"{bucket} buckets covers.")
    return start_edge, end_edge


def usage_report(*, query: UsageQuery) -> dict[str, Any]:
    """Per bucket and group: calls, errors by category, success rate, latency and TTFT p50/p95, tokens, cost per
    currency; and the same per group over the whole period. Reads the rollups and the calls not rolled up yet, in
    one snapshot (a rollup committing in between cannot count a call twice or not at all). The dicts of
    usage_report_json's JSON, which the API answers as it is."""
    return orjson.loads(usage_report_json(query=query))


def usage_report_json(*, query: UsageQuery) -> bytes:
    """usage_report's report as compact JSON (as orjson writes it), written directly from the rows.

    Speed (docs/benchmarks.md#usage-reports): the rows come back as plain tuples of six values (the numbers packed in
    one: UsageRollup.packed, see rollup_packed); an entry of one row is written from that row's packed value, the
    rows of others added as one integer each (by sum() over int.from_bytes), its percentiles bisected in the
    cumulated histogram fields, and its JSON written by one format string (no dicts for the tens of thousands of
    entries of a long grouped report)."""
    with _collector_paused():
        return _report_json(query, _report_rows(query))


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while a report reads and builds tens of thousands of small objects (tuples,
    strings: none in a cycle, freed by reference counting): otherwise it walks the growing heap again and again, a
    fifth of a grouped report's time. Process-wide, but only for the call; switched back on if it was on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _report_rows(query: UsageQuery) -> list[_Row]:
    """The rollup rows and the calls not rolled up yet of the report, in one snapshot."""
    # PostgreSQL's default (read committed) gives each query its own snapshot; the report needs one for both. (Inside
    # a caller's transaction the caller's isolation level holds: it can no longer be changed.)
    repeatable = connection.vendor == "postgresql" and not connection.in_atomic_block
    with transaction.atomic():
        if repeatable:
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        rows = _rollup_rows(query)
        rows += _raw_rows(query)
    return rows


def _report_json(query: UsageQuery, rows: list[_Row]) -> bytes:
    grouped = bool(query.group_by)
    dumps = orjson.dumps
    # The packed values of each group, name, error category and currency, added up afterwards in one sum() each.
    parts: dict[tuple[str, str, str, str], list[bytes]] = {}
    for part, packed in zip(map(_ROW_PART, rows), map(_ROW_PACKED, rows), strict=True):
        packed_values = parts.get(part)
        if packed_values is None:
            parts[part] = [packed]
        else:
            packed_values.append(packed)
    currencies = _currency_keys({currency for _group, _label, _category, currency in parts})
    groups: dict[str, list] = {}  # group id -> [name, {currency: packed sum}, {error category: calls}]
    for (group, label, category, currency), packed_values in parts.items():
        number = sum(map(int.from_bytes, packed_values, repeat("little")))
        sums = groups.get(group)
        if sums is None:
            sums = groups[group] = [label, {}, {}]
        elif label > sums[0]:
            sums[0] = label
        sums[1][currency] = sums[1].get(currency, 0) + number
        if category:
            sums[2][category] = sums[2].get(category, 0) + (number & _FIELD_MASK)

    def group_json(group: str, label: str) -> str:
        return dumps({"id": group, "name": label}).decode() if grouped else "null"

    totals = []
    for group, (label, by_currency, errors) in groups.items():
        fields = _fields(sum(by_currency.values()).to_bytes(_PACKED_BYTES, "little"))
        totals.append((-fields[0], label, group,
                       _entry_json('{"group":' + group_json(group, label) + ",", fields, errors,
                                   _costs_json(by_currency, currencies))))
    totals.sort(key=lambda total: total[:3])
    parts_json = [dumps({"from": query.start.isoformat(), "to": query.end.isoformat(), "bucket": query.bucket,
                         "group_by": query.group_by or None})[:-1].decode(), ',"series":[']
    series = _series_json(rows, {(group, label) for group, label, _category, _currency in parts}, currencies,
                          group_json) if query.series and rows else ()
    return "".join(chain(parts_json, series, ['],"totals":[', ",".join([total[3] for total in totals]), "]}"]
                         )).encode()


# Parts of a report row (_Row), taken by C-level map() calls over all rows.
_ROW_BUCKET, _ROW_ENTRY, _ROW_NAME = itemgetter(0), itemgetter(0, 1), itemgetter(1, 2)
_ROW_PART, _ROW_PACKED, _ROW_ENTRY_JSON = itemgetter(1, 2, 3, 4), itemgetter(5), itemgetter(6)


def _series_json(rows: list[_Row], names: set[tuple[str, str]], currencies: dict[str, str],
                 group_json) -> Iterator[str]:
    """The series' entries as JSON pieces (joined by the caller with the rest of the report), sorted by bucket,
    then group name and id. An entry is the rows of one bucket and group: an entry of one row, what a grouped series
    mostly has, is that row's entry JSON (UsageRollup.entry_json); the rows of others are added up. Buckets and
    names are ranked and written once, each entry ranked by one integer, and the whole series put together by
    C-level map(), sorted() and zip() over all entries rather than by Python code per entry."""
    keys = list(map(_ROW_ENTRY, rows))
    single = dict(zip(keys, rows, strict=True))  # (bucket, group id) -> its row (the last one, for entries of several)
    several: dict[tuple[Any, str], list[_Row]] = {}
    if len(single) < len(rows):
        several = {key: [] for key, count in Counter(keys).items() if count > 1}
        for key, row in zip(keys, rows, strict=True):
            entry_rows = several.get(key)
            if entry_rows is not None:
                entry_rows.append(row)
        for key in several:
            del single[key]
    one = list(single.values())
    bucket_of = list(map(_ROW_BUCKET, one))
    name_of = list(map(_ROW_NAME, one))
    texts = list(map(_ROW_ENTRY_JSON, one))
    if "" in texts:  # rows the database had no entry JSON for (calls not rolled up yet, other reports' rows)
        texts = [text or rollup_entry_json(error_category=row[3], currency=row[4], packed=row[5])
                 for text, row in zip(texts, one, strict=True)]
    for (bucket, group), entry_rows in several.items():
        bucket_of.append(bucket)
        name_of.append((group, max(row[2] for row in entry_rows)))
        by_currency, errors = _entry_sums(entry_rows)
        texts.append(_entry_json("", _fields(sum(by_currency.values()).to_bytes(_PACKED_BYTES, "little")), errors,
                                 _costs_json(by_currency, currencies)))
    dumps = orjson.dumps
    buckets = {bucket: _as_utc(bucket) for bucket in set(bucket_of)}
    bucket_rank = {bucket: rank for rank, bucket in enumerate(sorted(buckets, key=buckets.__getitem__))}
    bucket_json = {bucket: '{"bucket":' + dumps(moment.isoformat()).decode() + ',"group":'
                   for bucket, moment in buckets.items()}
    # (group id, name): by name, then id.
    ranked_names = sorted(names, key=lambda name: (name[1], name[0]))
    name_rank = {name: rank for rank, name in enumerate(ranked_names)}
    name_json = {name: group_json(*name) + "," for name in ranked_names}
    ranks = list(map(add, map(mul, map(bucket_rank.__getitem__, bucket_of), repeat(len(name_rank))),
                     map(name_rank.__getitem__, name_of)))
    order = sorted(range(len(ranks)), key=ranks.__getitem__)
    return islice(chain.from_iterable(zip(
        repeat(","), map(bucket_json.__getitem__, map(bucket_of.__getitem__, order)),
        map(name_json.__getitem__, map(name_of.__getitem__, order)), map(texts.__getitem__, order),
        strict=False)), 1, None)  # without the first comma


def _entry_sums(rows: list[_Row]) -> tuple[dict[str, int], dict[str, int]]:
    """The packed values of an entry's rows added up per currency, and their calls per error category: the rows are
    sorted into their (category, currency) once each, then each cell's values added by one sum()."""
    cells: dict[tuple[str, str], list[bytes]] = {}
    for row in rows:
        cell = row[3:5]
        values = cells.get(cell)
        if values is None:
            cells[cell] = [row[5]]
        else:
            values.append(row[5])
    by_currency: dict[str, int] = {}
    errors: dict[str, int] = {}
    for (category, currency), values in cells.items():
        number = sum(map(int.from_bytes, values, repeat("little")))
        by_currency[currency] = by_currency.get(currency, 0) + number
        if category:
            errors[category] = errors.get(category, 0) + (number & _FIELD_MASK)
    return by_currency, errors


def _costs_json(by_currency: dict[str, int], currencies: dict[str, str]) -> str:
    """The inside of a cost object: "currency":"amount" per currency, in currency order, from packed sums."""
    return ",".join([currencies[currency] + _cost_text((number >> _COST_SHIFT) & _FIELD_MASK) + '"'
                     for currency, number in sorted(by_currency.items())])


def _entry_json(head: str, fields: Sequence[int], errors: dict[str, int] | None, cost: str) -> str:
    """An entry's JSON from its summed packed fields: `head` (its bucket and group) and its numbers. p50 and p95 are
    the middles (_MIDDLES) of the histogram buckets that hold the values of rank ceil(q * total): (total + 1) >> 1 for
    p50 (the same number, below 2**53 calls), bisected in the cumulated histogram fields."""
    calls = fields[0]
    if errors:
        error_count = sum(errors.values())
        categories = orjson.dumps(dict(sorted(errors.items()))).decode()
        rate = orjson.dumps(round((calls - error_count) / calls, 4)).decode() if calls else "null"
    else:
        error_count, categories, rate = 0, "{}", "1.0" if calls else "null"
    total = fields[_TTFT_AT - 1]
    latency = _PERCENTILES_JSON[bisect_left(fields, (total + 1) >> 1, _LATENCY_AT, _TTFT_AT) * HISTOGRAM_BUCKETS
                                + bisect_left(fields, math.ceil(0.95 * total), _LATENCY_AT, _TTFT_AT)
                                - _LATENCY_AT * (HISTOGRAM_BUCKETS + 1)] if total else _NO_PERCENTILES
    total = fields[_END - 1]
    ttft = _PERCENTILES_JSON[bisect_left(fields, (total + 1) >> 1, _TTFT_AT, _END) * HISTOGRAM_BUCKETS
                             + bisect_left(fields, math.ceil(0.95 * total), _TTFT_AT, _END)
                             - _TTFT_AT * (HISTOGRAM_BUCKETS + 1)] if total else _NO_PERCENTILES
    prompt, completion = fields[1], fields[2]
    return (f'{head}"calls":{calls},"errors":{error_count},"success_rate":{rate},"error_categories":{categories},'
            f'"latency_ms":{latency},"ttft_ms":{ttft},"prompt_tokens":{prompt},"completion_tokens":{completion},'
            f'"total_tokens":{prompt + completion},"cost":{{{cost}}}}}')


_END = _TTFT_AT + HISTOGRAM_BUCKETS
_NO_PERCENTILES = '{"p50":null,"p95":null}'
# p50 and p95 in JSON by the histogram buckets that hold them: index p50 bucket * HISTOGRAM_BUCKETS + p95 bucket.
_PERCENTILES_JSON = [f'{{"p50":{orjson.dumps(p50).decode()},"p95":{orjson.dumps(p95).decode()}}}'
                     for p50 in _MIDDLES for p95 in _MIDDLES]


# A report's row, as the database returns it: bucket (as stored: entries are keyed by it, and it becomes a datetime
# once per bucket), group id, group name, error category, currency, the packed numbers (UsageRollup.packed), and for
# a grouped series the row's entry JSON (UsageRollup.entry_json; "" otherwise: it is then written from packed).
_Row = tuple


def _rollup_rows(query: UsageQuery) -> list[_Row]:
    """The rollup rows of the period as report rows, read as plain tuples: each row's packed value, or on PostgreSQL,
    for reports of few entries, the sums of the rows per entry."""
    id_column, label_column = GROUPS.get(query.group_by, ("", ""))
    quote = connection.ops.quote_name
    if any(name not in FILTERS for name, _ in query.filters):
        raise ValueError(f"Unknown usage filter in {query.filters!r}.")
    pieces = _rollup_pieces(query)
    adapt = connection.ops.adapt_datetimefield_value
    where = "(" + " OR ".join(["(size = %s AND bucket >= %s AND bucket < %s)"] * len(pieces)) + ")"
    where += "".join(f" AND {quote(name)} = %s" for name, _ in query.filters)
    params = [value for size, start, end in pieces for value in (size, adapt(start), adapt(end))]
    params += [value for _, value in query.filters]
    group = quote(id_column) if id_column else "''"
    # SQLite: the bucket as stored, not through sqlite3's converter for its declared type (a parse per row).
    bucket = "CAST(bucket AS TEXT)" if connection.vendor == "sqlite" else "bucket"
    table = quote(UsageRollup._meta.db_table)
    if connection.vendor != "postgresql" or (query.group_by and query.series):
        # Each row's packed value, added up in Python (one integer per row). SQLite reads rows faster than it adds
        # up the 67 sum columns (and adds costs as floats); a grouped series' entries are mostly one row or a few.
        # A grouped series copies each one-row entry's ready JSON (entry_json); other reports add up rows.
        label = quote(label_column) if label_column else "''"
        entry_json = "entry_json" if query.group_by and query.series else "''"
        return _fetch_rows(f"SELECT {bucket if query.series else 'NULL'}, {group}, {label}, error_category, "
                           f"currency, packed, {entry_json} FROM {table} WHERE {where}", params)
    # PostgreSQL, few entries of many rows each (not grouped, or the totals alone): it adds up the sum columns per
    # bucket, group, error category and currency faster than it sends the rows; packed here. It sums integers as
    # numeric: cast back so that counts are ints.
    sums = ", ".join(f"CAST(SUM({quote(column)}) AS BIGINT)" for column in
                     ("calls", "prompt_tokens", "completion_tokens", *LATENCY_COLUMNS, *TTFT_COLUMNS))
    dimensions = [*(["bucket"] if query.series else []), *([group] if id_column else []), "error_category",
                  "currency"]
    sql = (f"SELECT {bucket if query.series else 'NULL'}, {group}, "
           f"{f'MAX({quote(label_column)})' if label_column else chr(39) * 2}, error_category, currency, SUM(cost), "
           f"{sums} FROM {table} WHERE {where} GROUP BY {', '.join(dimensions)}")
    latency_end = 9 + HISTOGRAM_BUCKETS
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [(row[0], str(row[1] or ""), row[2] or "", row[3], row[4],
                 rollup_packed(calls=row[6], prompt_tokens=row[7], completion_tokens=row[8], cost=row[5],
                               latency=row[9:latency_end], ttft=row[latency_end:]), "")
                for row in cursor.fetchall()]


def _fetch_rows(sql: str, params: list[Any]) -> list[tuple]:
    """The rows of a query that returns many. PostgreSQL: through psycopg's binary protocol (Django's cursors use the
    text one), which sends a packed value as its bytes rather than as hex and a bucket as eight bytes rather than
    text to parse. Same connection, so same transaction and snapshot."""
    if connection.vendor != "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    import psycopg

    connection.ensure_connection()
    with psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(sql, params, binary=True)
        return cursor.fetchall()


def _rollup_pieces(query: UsageQuery) -> list[tuple[str, datetime, datetime]]:
    """Which rollups cover the period: (size, start, end) pieces. The rows of the report's bucket size; but totals
    over hours read each whole day from its daily row (the rollup adds every call to its hour and its day in the same
    transaction, so the sums are the same) and only the hours before the first and after the last midnight from the
    hourly rows: 31 days for 50 configs are 1,550 daily rows and at most 2,300 hourly ones instead of 37,200."""
    if query.series or query.bucket != UsageRollup.Size.HOUR:
        return [(query.bucket, query.start, query.end)]
    first_midnight = bucket_start(query.start, UsageRollup.Size.DAY)
    if first_midnight < query.start:
        first_midnight += timedelta(days=1)
    last_midnight = bucket_start(query.end, UsageRollup.Size.DAY)
    if first_midnight >= last_midnight:
        return [(query.bucket, query.start, query.end)]
    pieces = [(UsageRollup.Size.DAY, first_midnight, last_midnight)]
    if query.start < first_midnight:
        pieces.append((UsageRollup.Size.HOUR, query.start, first_midnight))
    if last_midnight < query.end:
        pieces.append((UsageRollup.Size.HOUR, last_midnight, query.end))
    return pieces


def _as_utc(value: datetime | str) -> datetime:
    """A bucket as the database returns it (SQLite: text without an offset, in UTC) as an aware UTC datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _as_decimal(value: Decimal | float | int | None) -> Decimal:
    """A cost sum as a Decimal (SQLite sums a decimal column as a float: read to 15 digits, as Django does)."""
    if value is None:
        return Decimal(0)
    if isinstance(value, float):
        return _FLOAT_DECIMAL(value).quantize(_COST_PLACES)
    return Decimal(value)


def _raw_rows(query: UsageQuery) -> list[_Row]:
    """The calls of the period not rolled up yet, summed (as the rollup would) per bucket, group, error category and
    currency, as report rows (the bucket as the database stores it)."""
    id_column, label_column = GROUPS.get(query.group_by, ("", ""))
    raw_label = {"user_name": "user__username"}.get(label_column, label_column)
    calls = ProviderCall.objects.filter(rollup_batch__isnull=True, created_at__gte=query.start,
                                        created_at__lt=query.end, **dict(query.filters))
    fields = ["created_at", "error_category", "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens", "cost",
              "currency", *([id_column, raw_label] if id_column else [])]
    adapt = connection.ops.adapt_datetimefield_value
    sums: dict[tuple, Totals] = {}
    for call in calls.values_list(*fields).iterator():
        created_at, category, latency_ms, ttft_ms, prompt_tokens, completion_tokens, cost, currency, *group = call
        bucket = adapt(bucket_start(created_at, query.bucket)) if query.series else None
        key = (bucket, str(group[0] or "") if group else "", category, currency)
        totals = sums.setdefault(key, Totals())
        if group:
            totals.label = max(totals.label, group[1] or "")
        totals.add_call(latency_ms=latency_ms, ttft_ms=ttft_ms, prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens, cost=cost, currency=currency)
    return [(bucket, group, totals.label, category, currency,
             rollup_packed(calls=totals.calls, prompt_tokens=totals.prompt_tokens,
                           completion_tokens=totals.completion_tokens, cost=totals.cost[currency],
                           latency=totals.latency, ttft=totals.ttft), "")
            for (bucket, group, category, currency), totals in sums.items()]


def usage_csv_rows(report: dict[str, Any]) -> Iterable[list[Any]]:
    """The report's series as CSV rows (a header first): one line per bucket and group; for a report without its
    series (`series=false`), one line per group over the period, with an empty bucket."""
    yield ["bucket", "group_id", "group_name", "calls", "errors", "success_rate", "error_categories",
           "latency_p50_ms", "latency_p95_ms", "ttft_p50_ms", "ttft_p95_ms", "prompt_tokens", "completion_tokens",
           "total_tokens", "cost", "currency"]
    for row in report["series"] or report["totals"]:
        group = row["group"] or {"id": "", "name": ""}
        yield [row.get("bucket", ""), group["id"], group["name"], row["calls"], row["errors"], row["success_rate"],
               " ".join(f"{category}={count}" for category, count in row["error_categories"].items()),
               row["latency_ms"]["p50"], row["latency_ms"]["p95"], row["ttft_ms"]["p50"], row["ttft_ms"]["p95"],
               row["prompt_tokens"], row["completion_tokens"], row["total_tokens"],
               # One amount per currency (a group whose configs charge in two currencies has two).
               " ".join(row["cost"].values()), " ".join(row["cost"])]
