"""Usage reports: what GET /api/usage/ and /api/llm-configs/{id}/stats/ answer for known calls, before and after
the rollup; UTC bucket edges; rollup exactly once; retention; CSV; permissions; bad parameters."""
from __future__ import annotations

import csv
import gc
import io
import os
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from django.core.management import call_command

from llmconfigs.models import (
    HISTOGRAM_BOUNDS_MS,
    HISTOGRAM_BUCKETS,
    LATENCY_COLUMNS,
    TTFT_COLUMNS,
    ProviderCall,
    UsageRollup,
)
from llmconfigs.pricing import usage_cost
from llmconfigs.usage import (
    _MIDDLES,
    CallOrigin,
    CallRecord,
    _cost_text,
    _fields,
    histogram_index,
    provider_calls_record,
    rollup_packed,
    usage_period,
    usage_prune,
    usage_rollup,
)
from tests.fixtures import client_for

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


@pytest.fixture
def priced_config(make_llm_config):
    return make_llm_config(name="priced", model_name="priced-model", input_price_per_million=Decimal("1.5"),
                           output_price_per_million=Decimal("2"), currency="USD")


@pytest.fixture
def reader(plain_user, grant):
    return grant(plain_user, "llmconfigs.view_usage")


def record(config, at: datetime, *, category: str = "", latency: float = 100.0, ttft: float | None = 50.0,
           prompt: int = 10, completion: int = 5, kind: str = "chat", origin: CallOrigin = CallOrigin()) -> None:
    provider_calls_record(calls=[CallRecord(config=config, kind=kind, started=at.timestamp(), latency_ms=latency,
                                            ttft_ms=ttft, prompt_tokens=prompt, completion_tokens=completion,
                                            error_category=category)], origin=origin)


def report(user, **params) -> dict:
    response = client_for(user).get("/api/usage/", params)
    assert response.status_code == 200, response.content
    return response.json()


def three_successes_and_a_timeout(config):
    for minute in (1, 2, 3):
        record(config, T0 + timedelta(minutes=minute), prompt=1000, completion=300)
    record(config, T0 + timedelta(minutes=4), category="timeout", prompt=0, completion=0, ttft=None)


@pytest.mark.parametrize("rolled", [False, True], ids=["raw", "rolled-up"])
def test_success_rate_error_categories_tokens_and_cost_are_exact(priced_config, reader, rolled):
    three_successes_and_a_timeout(priced_config)
    if rolled:
        assert usage_rollup() == 4
    data = report(reader, **{"from": "2026-03-01T10:00:00Z", "to": "2026-03-01T11:00:00Z", "group_by": "config"})
    [row] = data["series"]
    assert row["bucket"] == "2026-03-01T10:00:00+00:00"
    assert row["group"] == {"id": str(priced_config.pk), "name": "priced"}
    assert (row["calls"], row["errors"], row["success_rate"]) == (4, 1, 0.75)
    assert row["error_categories"] == {"timeout": 1}
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (3000, 900, 3900)
    # 3 x (1000 x 1.5 + 300 x 2) / 1e6 = 0.0063
    assert row["cost"] == {"USD": "0.0063000"}
    assert data["totals"][0]["calls"] == 4 and data["totals"][0]["cost"] == {"USD": "0.0063000"}


def test_numbers_are_complete_while_part_of_the_period_is_rolled_up(priced_config, reader):
    three_successes_and_a_timeout(priced_config)
    record(priced_config, T0 + timedelta(minutes=20), category="rate_limit")
    record(priced_config, T0 + timedelta(minutes=21), category="rate_limit")
    usage_rollup()
    record(priced_config, T0 + timedelta(minutes=30), category="rate_limit")
    data = report(reader, **{"from": "2026-03-01T10:00Z", "to": "2026-03-01T11:00Z"})
    [row] = data["series"]
    assert row["group"] is None
    assert (row["calls"], row["errors"], row["error_categories"]) == (7, 4, {"rate_limit": 3, "timeout": 1})


def test_without_the_series_the_totals_per_group_are_the_same(priced_config, make_llm_config, reader):
    other = make_llm_config(name="other", currency="EUR", input_price_per_million=Decimal("3"))
    three_successes_and_a_timeout(priced_config)
    record(other, T0 + timedelta(hours=2), category="rate_limit", latency=9000.0)
    record(priced_config, T0 + timedelta(days=1), latency=3000.0, prompt=7)
    usage_rollup()
    # Calls not rolled up yet, in a bucket with rolled-up ones and in a new one.
    record(priced_config, T0 + timedelta(minutes=50), category="timeout", latency=20.0)
    record(other, T0 + timedelta(days=2), prompt=100)
    period = {"from": "2026-03-01", "to": "2026-03-04", "bucket": "day"}
    for group_by in ("config", "app"):
        full = report(reader, **period, group_by=group_by)
        totals_only = report(reader, **period, group_by=group_by, series="false")
        assert len(full["series"]) >= 3 and totals_only["series"] == []
        assert totals_only["totals"] == full["totals"]
    by_config = report(reader, **period, group_by="config", series="false")["totals"]
    priced = next(t for t in by_config if t["group"]["id"] == str(priced_config.pk))
    assert (priced["calls"], priced["errors"], priced["error_categories"]) == (6, 2, {"timeout": 2})
    assert priced["latency_ms"]["p95"] > 2000 and priced["prompt_tokens"] == 3017


@pytest.mark.parametrize("params", [{}, {"series": "false"}, {"bucket": "day"}, {"group_by": "model"}],
                         ids=["series", "totals", "days", "by-model"])
def test_costs_of_several_rollup_rows_add_up_exactly_beyond_fifteen_digits(make_llm_config, reader, params):
    # SQLite holds a cost as a float: adding the rows up there rounds a sum to 15 significant digits.
    for name, price in (("big-a", "123456.781234"), ("big-b", "987654.321234")):
        config = make_llm_config(name=name, model_name="big", input_price_per_million=Decimal(price),
                                 output_price_per_million=Decimal("0.567"), currency="USD")
        record(config, T0, prompt=100_000_000, completion=100)
    usage_rollup()
    data = report(reader, **{"from": "2026-03-01T10:00Z", "to": "2026-03-01T11:00Z", **params})
    assert [total["cost"] for total in data["totals"]] == [{"USD": "111111110.2469134"}]
    assert [row["cost"] for row in data["series"]] == ([] if params.get("series") else [{"USD": "111111110.2469134"}])


def test_totals_over_hours_spanning_days_count_exactly_the_hours_of_the_period(priced_config, reader):
    for at, latency in ((datetime(2026, 3, 1, 19, 59, tzinfo=UTC), 10.0),  # before the period
                        (datetime(2026, 3, 1, 20, 0, tzinfo=UTC), 100.0),
                        (datetime(2026, 3, 2, 12, 0, tzinfo=UTC), 200.0),
                        (datetime(2026, 3, 3, 0, 0, tzinfo=UTC), 400.0),
                        (datetime(2026, 3, 4, 2, 59, tzinfo=UTC), 800.0),
                        (datetime(2026, 3, 4, 3, 0, tzinfo=UTC), 9000.0)):  # after it
        record(priced_config, at, latency=latency)
    usage_rollup()
    period = {"from": "2026-03-01T20:00Z", "to": "2026-03-04T03:00Z", "bucket": "hour", "group_by": "config"}
    full = report(reader, **period)
    [totals] = report(reader, **period, series="false")["totals"]
    assert totals == full["totals"][0]
    assert totals["calls"] == 4 and totals["latency_ms"]["p95"] < 1000


def test_a_report_leaves_the_cycle_collector_as_it_found_it(priced_config, reader):
    record(priced_config, T0)
    assert gc.isenabled()
    report(reader, **{"from": "2026-03-01", "to": "2026-03-02", "bucket": "day"})
    assert gc.isenabled()
    gc.disable()
    try:
        report(reader, **{"from": "2026-03-01", "to": "2026-03-02", "bucket": "day"})
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_hour_buckets_have_utc_edges(priced_config, reader):
    record(priced_config, datetime(2026, 3, 1, 10, 59, 59, 999000, tzinfo=UTC))
    record(priced_config, datetime(2026, 3, 1, 11, 0, tzinfo=UTC))
    record(priced_config, datetime(2026, 3, 1, 11, 0, tzinfo=UTC))
    # 12:30 in UTC+02:00 is 10:30 UTC: `from` is read with its offset and widened down to 10:00 UTC.
    for rolled in (False, True):
        data = report(reader, **{"from": "2026-03-01T12:30:00+02:00", "to": "2026-03-01T11:30:00Z"})
        assert (data["from"], data["to"]) == ("2026-03-01T10:00:00+00:00", "2026-03-01T12:00:00+00:00")
        assert [(r["bucket"], r["calls"]) for r in data["series"]] == [
            ("2026-03-01T10:00:00+00:00", 1), ("2026-03-01T11:00:00+00:00", 2)], rolled
        usage_rollup()


def test_rollup_counts_each_call_once(priced_config):
    three_successes_and_a_timeout(priced_config)
    assert usage_rollup() == 4
    assert usage_rollup() == 0
    record(priced_config, T0 + timedelta(minutes=5))
    assert usage_rollup(batch_size=2) == 1
    hour = UsageRollup.objects.filter(size="hour")
    assert sum(r.calls for r in hour) == 5 and sum(r.calls for r in UsageRollup.objects.filter(size="day")) == 5
    # Same dimensions, same hour: one row for the successes (three runs added to it), one for the timeout.
    assert sorted((r.error_category, r.calls) for r in hour) == [("", 4), ("timeout", 1)]
    assert not ProviderCall.objects.filter(rollup_batch__isnull=True).exists()


@pytest.fixture(params=["UTC", "Asia/Tokyo"])
def local_time(request):
    """The process's local time in UTC or 9 hours ahead of it (as TIME_ZONE=Asia/Tokyo makes it): usage stays UTC."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    yield request.param
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.mark.usefixtures("local_time")
def test_a_call_is_stored_as_measured_in_utc_and_within_its_columns(priced_config, make_llm_config, plain_user):
    unpriced = make_llm_config(name="unpriced", model_name="m-free", route="pool-a")
    provider_calls_record(calls=[
        CallRecord(config=priced_config, kind="chat", started=T0.timestamp() + 0.25, latency_ms=812.5, ttft_ms=40.0,
                   prompt_tokens=1000, completion_tokens=300),
        # Clock skew and odd provider reports: nothing negative is stored; names are cut to their columns.
        CallRecord(config=unpriced, kind="title", started=T0.timestamp(), latency_ms=-3.0, ttft_ms=None,
                   prompt_tokens=-5, completion_tokens=-1, error_category="c" * 40),
    ], origin=CallOrigin(app_id="a1", app_name="n" * 150, key_id="k1", user_id=plain_user.pk))
    ok, failed = ProviderCall.objects.order_by("-latency_ms")
    assert ok.created_at == T0 + timedelta(milliseconds=250) and failed.created_at == T0
    assert (ok.config_id, ok.config_name, ok.model_name, ok.route) == (
        priced_config.pk, "priced", "priced-model", "priced-model")
    assert (failed.config_id, failed.config_name, failed.model_name, failed.route) == (
        unpriced.pk, "unpriced", "m-free", "pool-a")
    for row in (ok, failed):
        assert (row.app_id, row.app_name, row.key_id, row.user_id) == ("a1", "n" * 100, "k1", plain_user.pk)
    assert (ok.kind, ok.status, ok.error_category, ok.latency_ms, ok.ttft_ms) == ("chat", "ok", "", 812.5, 40.0)
    assert (ok.prompt_tokens, ok.completion_tokens, ok.cost, ok.currency) == (1000, 300, Decimal("0.0021"), "USD")
    assert (failed.kind, failed.status, failed.error_category) == ("title", "error", "c" * 32)
    assert (failed.latency_ms, failed.ttft_ms, failed.prompt_tokens, failed.completion_tokens) == (0.0, None, 0, 0)


@pytest.mark.usefixtures("local_time")
def test_day_buckets_start_at_midnight_utc_whatever_the_servers_local_time(priced_config, reader):
    record(priced_config, datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC))
    record(priced_config, datetime(2026, 3, 2, 0, 0, tzinfo=UTC))
    for rolled in (False, True):
        data = report(reader, **{"from": "2026-03-01", "to": "2026-03-03", "bucket": "day"})
        assert [(r["bucket"], r["calls"]) for r in data["series"]] == [
            ("2026-03-01T00:00:00+00:00", 1), ("2026-03-02T00:00:00+00:00", 1)], rolled
        usage_rollup()
    assert sorted(UsageRollup.objects.filter(size="day").values_list("bucket", "calls")) == [
        (datetime(2026, 3, 1, tzinfo=UTC), 1), (datetime(2026, 3, 2, tzinfo=UTC), 1)]


def test_a_rollup_of_one_call_per_batch_ends(priced_config):
    record(priced_config, T0)
    record(priced_config, T0 + timedelta(minutes=1))
    assert usage_rollup(batch_size=1) == 2
    assert usage_rollup(batch_size=1) == 0
    # and a batch never takes more than its size: each call was claimed by a batch of its own
    assert ProviderCall.objects.values("rollup_batch").distinct().count() == 2


def test_a_rollup_of_more_groups_than_one_statement_takes_adds_each_once(priced_config):
    midnight = datetime(2026, 3, 1, tzinfo=UTC)
    for hour in range(101):  # 101 hourly and 5 daily groups: two upsert statements
        record(priced_config, midnight + timedelta(hours=hour, minutes=30), latency=100.0 * (hour + 1))
    assert usage_rollup() == 101
    hours = list(UsageRollup.objects.filter(size="hour").order_by("bucket"))
    assert [(r.bucket, r.calls) for r in hours] == [(midnight + timedelta(hours=h), 1) for h in range(101)]
    days = UsageRollup.objects.filter(size="day").order_by("bucket").values_list("calls", "prompt_tokens")
    assert list(days) == [(24, 240), (24, 240), (24, 240), (24, 240), (5, 50)]



def test_a_later_rollup_into_the_same_row_adds_every_sum_and_takes_the_latest_names(priced_config):
    slowest = HISTOGRAM_BOUNDS_MS[-1] * 2  # past the last bound: counted in the last bucket of both histograms
    for minute, app_name in ((1, "before the rename"), (2, "after the rename")):
        record(priced_config, T0 + timedelta(minutes=minute), latency=slowest, ttft=slowest,
               origin=CallOrigin(app_id="a1", app_name=app_name))
        assert usage_rollup() == 1
    row = UsageRollup.objects.get(size="hour")
    assert (row.calls, row.prompt_tokens, row.app_name) == (2, 20, "after the rename")
    assert [sum(getattr(row, c) for c in columns) for columns in (LATENCY_COLUMNS, TTFT_COLUMNS)] == [2, 2]
    assert getattr(row, LATENCY_COLUMNS[-1]) == getattr(row, TTFT_COLUMNS[-1]) == 2 and _fields(row.packed)[-1] == 2


def test_calls_without_a_config_or_a_user_roll_up_under_empty_ids(priced_config):
    record(priced_config, T0)
    ProviderCall.objects.update(config=None)  # as deleting the config leaves its calls
    usage_rollup()
    assert sorted(UsageRollup.objects.values_list("size", "config_id", "user_id", "calls")) == [
        ("day", "", "", 1), ("hour", "", "", 1)]


def test_cost_text_is_the_decimal_with_seven_places_and_packed_fields_are_unsigned():
    for units in (0, 1, 5, 9, 10, 11, 99, 12_345_678, 10_000_000, 10_000_001, 2**64 - 1):
        assert _cost_text(units) == str(Decimal(units).scaleb(-7)), units
    assert (_cost_text(5), _cost_text(10), _cost_text(12_345_678)) == ("5E-7", "0.0000010", "1.2345678")
    packed = rollup_packed(calls=2**64 - 1, prompt_tokens=2**63, completion_tokens=1, cost=Decimal("0.0000001"),
                           latency=[0] * HISTOGRAM_BUCKETS, ttft=[0] * HISTOGRAM_BUCKETS)
    assert list(_fields(packed)[:4]) == [2**64 - 1, 2**63, 1, 1]



def test_a_period_ending_inside_a_bucket_ends_at_that_buckets_end():
    start = datetime(2026, 3, 1, tzinfo=UTC)
    assert usage_period(start=start, end=datetime(2026, 3, 2, 12, 30, tzinfo=UTC), bucket="day") == (
        start, datetime(2026, 3, 3, tzinfo=UTC))
    assert usage_period(start=start, end=datetime(2026, 3, 2, 12, 30, tzinfo=UTC), bucket="hour") == (
        start, datetime(2026, 3, 2, 13, tzinfo=UTC))


def test_retention_prunes_in_batches_and_keeps_a_call_at_the_cutoff(priced_config, settings):
    settings.USAGE_RETENTION_DAYS = 10
    now = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)
    cutoff = now - timedelta(days=10)
    for at in (cutoff - timedelta(days=2), cutoff - timedelta(days=1), cutoff - timedelta(seconds=1), cutoff, now):
        record(priced_config, at)
    usage_rollup()
    record(priced_config, cutoff - timedelta(days=3))  # not rolled up: kept
    assert usage_prune(now=now, batch_size=2) == 3
    assert sorted(ProviderCall.objects.values_list("created_at", flat=True)) == [
        cutoff - timedelta(days=3), cutoff, now]


def test_rollup_runs_in_batches_until_every_call_is_rolled_up(priced_config, reader):
    for second in range(7):
        record(priced_config, T0 + timedelta(seconds=second))
    assert usage_rollup(batch_size=3) == 7
    assert report(reader, **{"from": "2026-03-01T10:00Z", "to": "2026-03-01T11:00Z"})["series"][0]["calls"] == 7


def test_retention_deletes_old_rolled_up_calls_and_keeps_their_numbers(priced_config, reader, settings):
    settings.USAGE_RETENTION_DAYS = 90
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=91), now - timedelta(days=89)
    record(priced_config, old)
    record(priced_config, recent)
    assert usage_prune() == 0  # nothing rolled up yet: nothing is lost
    call_command("usage_rollup", stdout=io.StringIO())
    assert ProviderCall.objects.count() == 1
    assert ProviderCall.objects.get().created_at == recent
    data = report(reader, **{"from": (old - timedelta(days=1)).date().isoformat(), "to": now.isoformat(),
                             "bucket": "day"})
    assert sum(r["calls"] for r in data["series"]) == 2


def test_latency_percentiles_stay_within_the_documented_bound(priced_config, reader):
    latencies = [20.0] * 50 + [900.0] * 45 + [5000.0] * 5
    for i, latency in enumerate(latencies):
        record(priced_config, T0 + timedelta(seconds=i), latency=latency, ttft=latency / 10)
    usage_rollup()
    [row] = report(reader, **{"from": "2026-03-01T10:00Z", "to": "2026-03-01T11:00Z"})["series"]
    for reported, true in ((row["latency_ms"]["p50"], 20.0), (row["latency_ms"]["p95"], 900.0),
                           (row["ttft_ms"]["p50"], 2.0), (row["ttft_ms"]["p95"], 90.0)):
        if true < 4:
            assert abs(reported - true) <= 2
        else:
            assert true / 2 ** 0.25 <= reported <= true * 2 ** 0.25, (reported, true)


@pytest.mark.parametrize("rolled", [False, True], ids=["raw", "rolled-up"])
def test_percentiles_of_no_values_are_null(priced_config, reader, rolled):
    record(priced_config, T0, category="timeout", ttft=None)
    if rolled:
        usage_rollup()
    [row] = report(reader, **{"from": "2026-03-01T10:00Z", "to": "2026-03-01T11:00Z"})["series"]
    assert row["ttft_ms"] == {"p50": None, "p95": None}
    assert row["latency_ms"] == {"p50": 107.6, "p95": 107.6}


def test_group_by_app_key_and_user_name_each_group(priced_config, reader, plain_user):
    record(priced_config, T0, origin=CallOrigin(app_id="a1", app_name="Ops", key_id="k1", user_id=plain_user.pk))
    record(priced_config, T0, origin=CallOrigin(app_id="a2", app_name="Chat"))
    record(priced_config, T0, kind="connection_test")
    usage_rollup()
    record(priced_config, T0, origin=CallOrigin(app_id="a1", app_name="Ops", key_id="k1", user_id=plain_user.pk))
    period = {"from": "2026-03-01T10:00Z", "to": "2026-03-01T11:00Z"}
    apps = {t["group"]["name"]: t["calls"] for t in report(reader, group_by="app", **period)["totals"]}
    assert apps == {"Ops": 2, "Chat": 1, "": 1}
    keys = {t["group"]["id"]: t["calls"] for t in report(reader, group_by="key", **period)["totals"]}
    assert keys == {"k1": 2, "": 2}
    users = {t["group"]["name"]: t["calls"] for t in report(reader, group_by="user", **period)["totals"]}
    assert users == {"alice": 2, "": 2}
    tests = report(reader, kind="connection_test", **period)["totals"]
    assert [t["calls"] for t in tests] == [1]
    assert report(reader, app="00000000-0000-0000-0000-000000000000", **period)["series"] == []


def test_config_stats_cover_that_config_alone(priced_config, make_llm_config, reader):
    other = make_llm_config(name="other")
    three_successes_and_a_timeout(priced_config)
    record(other, T0)
    response = client_for(reader).get(f"/api/llm-configs/{priced_config.pk}/stats/",
                                      {"from": "2026-03-01T10:00Z", "to": "2026-03-01T11:00Z", "group_by": "app"})
    assert response.status_code == 200
    data = response.json()
    assert data["group_by"] is None
    assert [(r["calls"], r["success_rate"]) for r in data["series"]] == [(4, 0.75)]
    # Its other filters still apply; a `config` parameter cannot widen it to another config.
    timeouts = client_for(reader).get(f"/api/llm-configs/{priced_config.pk}/stats/", {
        "from": "2026-03-01T10:00Z", "to": "2026-03-01T11:00Z", "kind": "chat", "config": str(other.pk)}).json()
    assert [r["calls"] for r in timeouts["series"]] == [4]


def test_csv_export_has_one_line_per_bucket_and_group(priced_config, reader):
    three_successes_and_a_timeout(priced_config)
    priced_config.name = "=HYPERLINK(1)"
    record(priced_config, T0 + timedelta(hours=1))
    for url, params in (("/api/usage/", {"format": "csv"}), ("/api/usage.csv", {})):
        response = client_for(reader).get(url, {"from": "2026-03-01T10:00Z", "to": "2026-03-01T12:00Z",
                                                "group_by": "config", **params})
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/csv")
        assert response["Content-Disposition"] == 'attachment; filename="usage.csv"'
        rows = list(csv.DictReader(io.StringIO(response.content.decode())))
        assert [(r["bucket"], r["group_name"], r["calls"], r["success_rate"], r["error_categories"], r["cost"],
                 r["currency"]) for r in rows] == [
            ("2026-03-01T10:00:00+00:00", "priced", "4", "0.75", "timeout=1", "0.0063000", "USD"),
            # A name a spreadsheet would run as a formula is quoted.
            ("2026-03-01T11:00:00+00:00", "'=HYPERLINK(1)", "1", "1.0", "", "0.0000250", "USD"),
        ]
        assert priced_config.api_key not in response.content.decode()


def test_csv_without_the_series_has_one_line_per_group(priced_config, make_llm_config, reader):
    three_successes_and_a_timeout(priced_config)
    record(make_llm_config(name="other"), T0 + timedelta(hours=1))
    response = client_for(reader).get("/api/usage.csv", {"from": "2026-03-01T10:00Z", "to": "2026-03-01T12:00Z",
                                                         "group_by": "config", "series": "false"})
    assert response.status_code == 200
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert [(r["bucket"], r["group_name"], r["calls"], r["error_categories"]) for r in rows] == [
        ("", "priced", "4", "timeout=1"), ("", "other", "1", "")]


@pytest.mark.parametrize("user_fixture", ["plain_user", "bare_staff_user"])
def test_usage_needs_the_view_usage_permission(request, priced_config, user_fixture):
    user = request.getfixturevalue(user_fixture)
    for url in ("/api/usage/", "/api/usage.csv", f"/api/llm-configs/{priced_config.pk}/stats/"):
        response = client_for(user).get(url)
        assert response.status_code == 403, url
        assert response["Content-Type"] == "application/json"


def test_usage_refuses_anonymous_clients(api_client):
    assert api_client.get("/api/usage/").status_code in (401, 403)


def test_view_usage_is_enough_and_superusers_have_it(reader, django_user_model):
    assert client_for(reader).get("/api/usage/").status_code == 200
    root = django_user_model.objects.create_superuser(username="root", password="pw-root-123")
    assert client_for(root).get("/api/usage/").status_code == 200


@pytest.mark.parametrize("params, field", [
    ({"bucket": "week"}, "bucket"),
    ({"group_by": "planet"}, "group_by"),
    ({"from": "yesterday"}, "from"),
    ({"from": "2026-03-02", "to": "2026-03-01"}, "from"),
    ({"from": "2026-01-01", "to": "2026-03-01"}, "from"),  # 59 days of hour buckets: more than 31
    ({"from": "2025-01-01", "to": "2026-03-01", "bucket": "day"}, "from"),
    ({"config": "not-a-uuid"}, "config"),
    ({"kind": "dream"}, "kind"),
    ({"key": "k" * 37}, "key"),
    ({"series": "no"}, "series"),
])
def test_bad_parameters_are_field_errors(reader, params, field):
    for extra in ({}, {"format": "csv"}):
        response = client_for(reader).get("/api/usage/", {**params, **extra})
        assert response.status_code == 400
        assert response["Content-Type"] == "application/json"
        assert field in response.json()


def test_default_period_is_the_last_day_up_to_the_next_hour(reader):
    data = report(reader)
    start, end = datetime.fromisoformat(data["from"]), datetime.fromisoformat(data["to"])
    assert end - start == timedelta(days=1)
    assert end.minute == 0 and end > datetime.now(UTC) >= end - timedelta(hours=1)


@pytest.mark.django_db(transaction=True)
def test_overlapping_rollups_count_each_call_once(priced_config, monkeypatch):
    """A second run that starts while the first holds its batch (claimed, not committed) takes none of it."""
    import threading

    from django.db import connections

    from llmconfigs import usage

    for second in range(5):
        record(priced_config, T0 + timedelta(seconds=second))
    holding, release = threading.Event(), threading.Event()
    real_upsert = usage._upsert

    def upsert_and_wait(groups, labels):
        real_upsert(groups, labels)
        if threading.current_thread().name == "first":
            holding.set()
            release.wait(10)

    monkeypatch.setattr(usage, "_upsert", upsert_and_wait)
    results = {}

    def run(name):
        try:
            results[name] = usage_rollup()
        finally:
            connections.close_all()

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert holding.wait(10)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    second.join(0.5)  # it is now waiting for the first run's row locks (PostgreSQL) or write lock (SQLite)
    release.set()
    first.join(10)
    second.join(10)
    assert results == {"first": 5, "second": 0}
    assert sum(UsageRollup.objects.filter(size="hour").values_list("calls", flat=True)) == 5


def test_negative_counts_of_a_priced_config_are_stored_and_priced_as_nothing(priced_config):
    """Priced before the clamp, a negative count made a negative cost, which the cost constraint refused: the turn's
    calls were all lost."""
    provider_calls_record(calls=[
        CallRecord(config=priced_config, kind="chat", latency_ms=5.0, prompt_tokens=-100, completion_tokens=20),
        CallRecord(config=priced_config, kind="chat", latency_ms=6.0, prompt_tokens=10, completion_tokens=0),
    ], origin=CallOrigin())
    rows = list(ProviderCall.objects.order_by("latency_ms").values_list("prompt_tokens", "completion_tokens",
                                                                        "cost"))
    expected = [usage_cost(input_price_per_million=priced_config.input_price_per_million,
                           output_price_per_million=priced_config.output_price_per_million,
                           currency=priced_config.currency, prompt_tokens=p, completion_tokens=c).total_price
                for p, c in ((0, 20), (10, 0))]
    assert rows == [(0, 20, expected[0]), (10, 0, expected[1])]
    assert all(cost > 0 for cost in expected)


def two_currencies_one_model(make_llm_config):
    """A USD and a EUR config serving the same model, with a timeout on each and calls over two hours."""
    usd = make_llm_config(name="usd", model_name="shared-model", input_price_per_million=Decimal("1.5"),
                          output_price_per_million=Decimal("2"), currency="USD")
    eur = make_llm_config(name="eur", model_name="shared-model", input_price_per_million=Decimal("3"),
                          output_price_per_million=Decimal("0.25"), currency="EUR")
    for config in (usd, eur):
        for minute in (1, 2, 61):
            record(config, T0 + timedelta(minutes=minute), prompt=1000, completion=300, latency=40.0 * minute)
        record(config, T0 + timedelta(minutes=62), category="timeout", prompt=0, completion=0, ttft=None)
    return usd, eur


@pytest.mark.parametrize("rolled", [False, True], ids=["raw", "rolled-up"])
def test_an_entry_of_two_currencies_sums_each_and_the_csv_agrees(make_llm_config, reader, rolled):
    two_currencies_one_model(make_llm_config)
    if rolled:
        assert usage_rollup(batch_size=3) == 8  # several runs add to the same rollup rows
    params = {"from": "2026-03-01T10:00:00Z", "to": "2026-03-01T12:00:00Z", "group_by": "model"}
    data = report(reader, **params)
    assert [(row["bucket"], row["calls"], row["errors"], row["error_categories"], row["cost"])
            for row in data["series"]] == [
        # USD: 2 x (1000 x 1.5 + 300 x 2) / 1e6; EUR: 2 x (1000 x 3 + 300 x 0.25) / 1e6
        ("2026-03-01T10:00:00+00:00", 4, 0, {}, {"EUR": "0.0061500", "USD": "0.0042000"}),
        ("2026-03-01T11:00:00+00:00", 4, 2, {"timeout": 2}, {"EUR": "0.0030750", "USD": "0.0021000"}),
    ]
    [total] = data["totals"]
    assert total["group"] == {"id": "shared-model", "name": "shared-model"}
    assert (total["calls"], total["errors"], total["success_rate"]) == (8, 2, 0.75)
    assert total["cost"] == {"EUR": "0.0092250", "USD": "0.0063000"}
    assert (total["prompt_tokens"], total["completion_tokens"], total["total_tokens"]) == (6000, 1800, 7800)
    response = client_for(reader).get("/api/usage.csv", params)
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert [(row["calls"], row["errors"], row["error_categories"], row["cost"], row["currency"]) for row in rows] == [
        ("4", "0", "", "0.0061500 0.0042000", "EUR USD"), ("4", "2", "timeout=2", "0.0030750 0.0021000", "EUR USD")]
    indented = client_for(reader).get("/api/usage/", params, HTTP_ACCEPT="application/json; indent=2")
    assert indented.content.startswith(b'{\n  "from"') and indented.json() == data


def test_the_migration_fills_packed_from_the_rollup_columns(make_llm_config, reader):
    import importlib
    from types import SimpleNamespace

    from django.apps import apps
    from django.db import connection

    fill_packed = importlib.import_module("llmconfigs.migrations.0007_rollup_packed").fill_packed
    two_currencies_one_model(make_llm_config)
    usage_rollup()
    params = {"from": "2026-03-01T10:00:00Z", "to": "2026-03-01T12:00:00Z", "group_by": "config"}
    before = report(reader, **params)
    UsageRollup.objects.update(packed=b"")
    fill_packed(apps, SimpleNamespace(connection=connection))  # all it uses of the schema editor
    assert report(reader, **params) == before


def series_texts(user, params) -> list[str]:
    """The series entries of a report as the API wrote them, each without its bucket and group."""
    content = client_for(user).get("/api/usage/", params).content.decode()
    entries = orjson.loads(content)["series"]
    texts = []
    for entry in entries:
        head = orjson.dumps({"bucket": entry["bucket"], "group": entry["group"]}).decode()[:-1] + ","
        start = content.index(head) + len(head)
        texts.append(content[start:content.index("}}", content.index('"cost":', start)) + 2])
    return texts


def test_a_rollup_row_keeps_the_json_of_an_entry_made_of_it_alone(make_llm_config, reader):
    two_currencies_one_model(make_llm_config)
    usage_rollup(batch_size=3)  # several runs add to the same rows: the text follows the sums
    rows = list(UsageRollup.objects.filter(size="hour").order_by("bucket", "config_name", "error_category"))
    for row in rows:
        assert row.entry_json.startswith(f'"calls":{row.calls},') and row.entry_json.endswith("}}")
    # By config, 10:00 has an entry of one row per config (eur, usd); 11:00 two rows per config.
    texts = series_texts(reader, {"from": "2026-03-01T10:00:00Z", "to": "2026-03-01T12:00:00Z",
                                  "group_by": "config"})
    assert [row.entry_json for row in rows[:2]] == texts[:2]
    timeout = next(row for row in rows if row.error_category == "timeout" and row.currency == "EUR")
    latency = _MIDDLES[histogram_index(100.0)]  # the timeout's (record's default)
    assert orjson.loads("{" + timeout.entry_json) == {
        "calls": 1, "errors": 1, "success_rate": 0.0, "error_categories": {"timeout": 1},
        "latency_ms": {"p50": latency, "p95": latency}, "ttft_ms": {"p50": None, "p95": None}, "prompt_tokens": 0,
        "completion_tokens": 0, "total_tokens": 0, "cost": {"EUR": "0E-7"}}


def test_one_row_entries_are_copied_from_the_row_and_others_added_up(make_llm_config, reader):
    two_currencies_one_model(make_llm_config)
    usage_rollup()
    params = {"from": "2026-03-01T10:00:00Z", "to": "2026-03-01T12:00:00Z", "group_by": "config"}
    before = series_texts(reader, params)
    # usd at 10:00 is one row; usd at 11:00 is two (a success and a timeout): only the first reads its row's text.
    UsageRollup.objects.filter(size="hour").update(entry_json='"calls":-1,"cost":{}}')
    after = series_texts(reader, params)
    assert [text == '"calls":-1,"cost":{}}' for text in after] == [True, True, False, False]
    assert after[2:] == before[2:]
    # A row without the text (none is left so by the rollup or migration 0008) is written from its numbers.
    UsageRollup.objects.update(entry_json="")
    assert series_texts(reader, params) == before


def test_the_migration_fills_entry_json_from_packed(make_llm_config, reader):
    import importlib
    from types import SimpleNamespace

    from django.apps import apps
    from django.db import connection

    fill_entry_json = importlib.import_module("llmconfigs.migrations.0008_rollup_entry_json").fill_entry_json
    two_currencies_one_model(make_llm_config)
    usage_rollup()
    written = dict(UsageRollup.objects.values_list("id", "entry_json"))
    assert all(written.values())
    UsageRollup.objects.update(entry_json="")
    fill_entry_json(apps, SimpleNamespace(connection=connection))  # all it uses of the schema editor
    assert dict(UsageRollup.objects.values_list("id", "entry_json")) == written
