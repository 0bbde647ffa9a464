"""Usage of the providers: one ProviderCall row per call (written in bulk when a turn ends), the hourly and daily
rollups of those rows, retention, and the usage reports, read from the rollups plus the rows not rolled up yet so
that their numbers are always complete."""
from __future__ import annotations

import decimal
import gc
import math
import time
import uuid
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import accumulate, pairwise
from typing import Any

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


def histogram_percentile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of the values counted in `counts`, as the geometric middle of the bucket that holds
    it (within a factor 2^(1/4) of the true value between 4 ms and 131 s); None without values."""
    return histogram_percentiles(counts, (q,))[0]


def histogram_percentiles(counts: Sequence[int], qs: Sequence[float]) -> list[float | None]:
    """histogram_percentile for each of `qs` (in increasing order), in one pass over `counts`."""
    cumulative = list(accumulate(counts))
    total = cumulative[-1] if cumulative else 0
    if not total:
        return [None] * len(qs)
    found, index = [], 0
    for q in qs:
        rank = max(math.ceil(q * total), 1)
        while cumulative[index] < rank:
            index += 1
        found.append(_MIDDLES[index])
    return found


# What a value in each bucket is reported as: the geometric middle of its bounds (half the first bound in the first
# bucket, the last bound above it).
_MIDDLES = (round(HISTOGRAM_BOUNDS_MS[0] / 2, 1),
            *(round(math.sqrt(low * high), 1) for low, high in pairwise(HISTOGRAM_BOUNDS_MS)),
            round(HISTOGRAM_BOUNDS_MS[-1], 1))


# ----- aggregation (shared by the rollup and the reports) -----


@dataclass
class Totals:
    """The sums of a set of calls."""

    label: str = ""
    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # category -> calls
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: dict[str, Decimal] = field(default_factory=dict)
    latency: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)
    ttft: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)

    def add_call(self, *, error_category: str, latency_ms: float, ttft_ms: float | None, prompt_tokens: int,
                 completion_tokens: int, cost: Decimal, currency: str) -> None:
        self.calls += 1
        if error_category:
            self.errors[error_category] = self.errors.get(error_category, 0) + 1
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
                    error_category=category, latency_ms=latency_ms, ttft_ms=ttft_ms, prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens, cost=cost, currency=currency)
                labels[key] = (config_name, app_name, user_name or "")
        _upsert(groups, labels)
    return claimed, len(ids)


def _upsert(groups: dict[tuple, Totals], labels: dict[tuple, tuple[str, str, str]]) -> None:
    """INSERT ... ON CONFLICT DO UPDATE SET sum = sum + excluded.sum: additions in the database, in key order (two
    runs lock rows in the same order, so they cannot deadlock)."""
    table = connection.ops.quote_name(UsageRollup._meta.db_table)
    columns = (*_KEY_COLUMNS, *_LABEL_COLUMNS, *_SUM_COLUMNS)
    quoted = [connection.ops.quote_name(c) for c in columns]
    updates = [f"{q} = {table}.{q} + excluded.{q}" for q in quoted[len(_KEY_COLUMNS) + len(_LABEL_COLUMNS):]]
    updates += [f"{q} = excluded.{q}" for q in quoted[len(_KEY_COLUMNS):len(_KEY_COLUMNS) + len(_LABEL_COLUMNS)]]
    row_sql = "(" + ", ".join(["%s"] * len(columns)) + ")"
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
                           sum(totals.cost.values(), Decimal(0)), *totals.latency, *totals.ttft]
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(quoted)}) VALUES {', '.join([row_sql] * len(chunk))} "
                f"ON CONFLICT ({', '.join(quoted[:len(_KEY_COLUMNS)])}) DO UPDATE SET {', '.join(updates)}",
                params,
            )


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
    one snapshot (a rollup committing in between cannot count a call twice or not at all).

    Speed (docs/benchmarks.md#usage-reports): the database sums the rollups per bucket, group, error category and
    currency; the rows come back as plain tuples (no ORM conversion of their ninety columns), and each bucket and
    group is summed column by column and its percentiles read with a bisection of the cumulative histogram."""
    # PostgreSQL's default (read committed) gives each query its own snapshot; the report needs one for both. (Inside
    # a caller's transaction the caller's isolation level holds: it can no longer be changed.)
    repeatable = connection.vendor == "postgresql" and not connection.in_atomic_block
    with _collector_paused():
        with transaction.atomic():
            if repeatable:
                with connection.cursor() as cursor:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rows = [*_rollup_rows(query), *_raw_rows(query)]
        return _report(query, rows)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while a report reads and builds tens of thousands of small objects (tuples,
    dicts: none in a cycle, freed by reference counting): otherwise it walks the growing heap again and again, a fifth
    of a grouped report's time. Process-wide, but only for the call; switched back on if it was on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _report(query: UsageQuery, rows: list[_Row]) -> dict[str, Any]:
    series: dict[tuple[datetime, str], list[_Row]] = {}
    for row in rows:
        series.setdefault((row[0], row[1]), []).append(row)
    per_group: dict[str, list[_Row]] = {}
    for (_bucket, group), group_rows in series.items():
        per_group.setdefault(group, []).extend(group_rows)
    grouped = bool(query.group_by)
    entries = []
    for (bucket, group), group_rows in series.items() if query.series else ():
        label = max(row[2] for row in group_rows) if grouped else ""
        entries.append((bucket, label, group, _summary(group_rows)))
    entries.sort(key=lambda entry: entry[:3])
    totals = []
    for group, group_rows in per_group.items():
        label = max(row[2] for row in group_rows) if grouped else ""
        totals.append((label, group, _summary(group_rows)))
    totals.sort(key=lambda total: (-total[2]["calls"], total[0]))
    return {
        "from": query.start.isoformat(), "to": query.end.isoformat(), "bucket": query.bucket,
        "group_by": query.group_by or None,
        "series": [{"bucket": bucket.isoformat(), "group": {"id": group, "name": label} if grouped else None,
                    **summary} for bucket, label, group, summary in entries],
        "totals": [{"group": {"id": group, "name": label} if grouped else None, **summary}
                   for label, group, summary in totals],
    }


# A report's row: bucket, group id, group name, error category, currency, cost (Decimal), then the numbers that add
# up column by column: calls, prompt tokens, completion tokens, the latency histogram, the TTFT histogram.
_Row = tuple
_NUMBERS = 6  # where the numbers start
_LATENCY = slice(_NUMBERS + 3, _NUMBERS + 3 + HISTOGRAM_BUCKETS)
_TTFT = slice(_NUMBERS + 3 + HISTOGRAM_BUCKETS, _NUMBERS + 3 + 2 * HISTOGRAM_BUCKETS)
_COST_PLACES = Decimal("0.0000001")
_FLOAT_DECIMAL = decimal.Context(prec=15).create_decimal_from_float


def _summary(rows: list[_Row]) -> dict[str, Any]:
    """The numbers of a report entry: the sums of `rows` (one bucket and group, or one group over the period)."""
    if len(rows) == 1:
        numbers = rows[0]
    else:
        numbers = (*rows[0][:_NUMBERS], *map(sum, zip(*(row[_NUMBERS:] for row in rows), strict=True)))
    calls, prompt_tokens, completion_tokens = numbers[_NUMBERS:_NUMBERS + 3]
    error_categories: dict[str, int] = {}
    cost: dict[str, Decimal] = {}
    for row in rows:
        if row[3]:
            error_categories[row[3]] = error_categories.get(row[3], 0) + row[_NUMBERS]
        cost[row[4]] = cost.get(row[4], 0) + row[5]
    errors = sum(error_categories.values())
    latency_p50, latency_p95 = _percentiles(numbers[_LATENCY])
    ttft_p50, ttft_p95 = _percentiles(numbers[_TTFT])
    return {
        "calls": calls,
        "errors": errors,
        "success_rate": round((calls - errors) / calls, 4) if calls else None,
        "error_categories": dict(sorted(error_categories.items())),
        "latency_ms": {"p50": latency_p50, "p95": latency_p95},
        "ttft_ms": {"p50": ttft_p50, "p95": ttft_p95},
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "cost": {currency: str(Decimal(amount).quantize(_COST_PLACES)) for currency, amount in sorted(cost.items())},
    }


def _percentiles(counts: Sequence[int]) -> tuple[float | None, float | None]:
    """p50 and p95 of a histogram (as histogram_percentiles), by bisecting its cumulative counts."""
    cumulative = list(accumulate(counts))
    total = cumulative[-1]
    if not total:
        return None, None
    return (_MIDDLES[bisect_left(cumulative, max(math.ceil(0.5 * total), 1))],
            _MIDDLES[bisect_left(cumulative, max(math.ceil(0.95 * total), 1))])


def _rollup_rows(query: UsageQuery) -> list[_Row]:
    """The rollups of the period summed per bucket, group, error category and currency, in one query whose rows are
    read as they come (the ORM's per-value conversions of ninety columns cost more than the query)."""
    id_column, label_column = GROUPS.get(query.group_by, ("", ""))
    quote = connection.ops.quote_name
    group = quote(id_column) if id_column else "''"
    label = f"MAX({quote(label_column)})" if label_column else "''"
    # PostgreSQL sums integers as numeric: cast back so that counts are ints, as on SQLite.
    integer_sum = "CAST(SUM({}) AS BIGINT)" if connection.vendor == "postgresql" else "SUM({})"
    sums = ", ".join(["SUM(cost)", *(integer_sum.format(quote(column)) for column in
                                     ("calls", "prompt_tokens", "completion_tokens", *LATENCY_COLUMNS, *TTFT_COLUMNS))])
    if any(name not in FILTERS for name, _ in query.filters):
        raise ValueError(f"Unknown usage filter in {query.filters!r}.")
    pieces = _rollup_pieces(query)
    adapt = connection.ops.adapt_datetimefield_value
    where = "(" + " OR ".join(["(size = %s AND bucket >= %s AND bucket < %s)"] * len(pieces)) + ")"
    where += "".join(f" AND {quote(name)} = %s" for name, _ in query.filters)
    params = [value for size, start, end in pieces for value in (size, adapt(start), adapt(end))]
    params += [value for _, value in query.filters]
    # Without the series the rows are per group over the whole period (one bucket: the earliest).
    bucket_sql = "bucket" if query.series else "MIN(bucket)"
    dimensions = [*(["bucket"] if query.series else []), *([group] if id_column else []), "error_category",
                  "currency"]
    sql = (f"SELECT {bucket_sql}, {group}, {label}, error_category, currency, {sums} "
           f"FROM {quote(UsageRollup._meta.db_table)} WHERE {where} "
           f"GROUP BY {', '.join(dimensions)}")
    buckets: dict[Any, datetime] = {}
    rows = []
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for row in cursor.fetchall():
            bucket = buckets.get(row[0])
            if bucket is None:
                bucket = buckets[row[0]] = _as_utc(row[0])
            rows.append((bucket, str(row[1] or ""), row[2] or "", row[3], row[4], _as_decimal(row[5]), *row[6:]))
    return rows


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
    currency."""
    id_column, label_column = GROUPS.get(query.group_by, ("", ""))
    raw_label = {"user_name": "user__username"}.get(label_column, label_column)
    calls = ProviderCall.objects.filter(rollup_batch__isnull=True, created_at__gte=query.start,
                                        created_at__lt=query.end, **dict(query.filters))
    fields = ["created_at", "error_category", "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens", "cost",
              "currency", *([id_column, raw_label] if id_column else [])]
    sums: dict[tuple, Totals] = {}
    for call in calls.values_list(*fields).iterator():
        created_at, category, latency_ms, ttft_ms, prompt_tokens, completion_tokens, cost, currency, *group = call
        bucket = bucket_start(created_at, query.bucket) if query.series else query.start
        key = (bucket, str(group[0] or "") if group else "", category, currency)
        totals = sums.setdefault(key, Totals())
        if group:
            totals.label = max(totals.label, group[1] or "")
        totals.add_call(error_category=category, latency_ms=latency_ms, ttft_ms=ttft_ms, prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens, cost=cost, currency=currency)
    return [(bucket, group, totals.label, category, currency, totals.cost[currency], totals.calls,
             totals.prompt_tokens, totals.completion_tokens, *totals.latency, *totals.ttft)
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
