"""Benchmark: GET /api/usage/ over a generated year of usage rollups for 50 configs (an hourly row per config and
hour, a daily row per config and day, as `manage.py usage_rollup` leaves them): a year in day buckets and 31 days in
hour buckets (the longest periods a report covers), grouped by config (with the series, and only the totals per
config: `series=false`) and not grouped, and one config's stats.

Standalone: a temporary SQLite file (or a temporary database on the PostgreSQL server of --database-url), migrated
and filled in this process; the requests go through Django's test client (the view, the queries and the JSON).
Run: `.venv/bin/python bench/usage_report.py [--configs 50] [--runs 20] [--database-url postgres://...]`.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dify_overhead import drop_postgres, percentile, temporary_postgres  # noqa: E402

GOAL_MS = 200


def fill(configs: int, *, now: datetime) -> list[str]:
    """A year of hourly and daily rollup rows for `configs` configs (one INSERT per 500 rows); returns their ids."""
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction

    from llmconfigs.models import HISTOGRAM_BUCKETS, LATENCY_COLUMNS, TTFT_COLUMNS, LLMConfig, UsageRollup
    from llmconfigs.usage import bucket_start, rollup_entry_json, rollup_packed

    rng = random.Random(7)
    ids = [str(LLMConfig.objects.create(name=f"config-{n}", provider="openai", model_name=f"model-{n % 10}",
                                        is_active=False).pk) for n in range(configs)]
    columns = ["size", "bucket", "config_id", "config_name", "model_name", "route", "app_id", "app_name", "key_id",
               "user_id", "user_name", "kind", "error_category", "currency", "calls", "prompt_tokens",
               "completion_tokens", "cost", *LATENCY_COLUMNS, *TTFT_COLUMNS, "packed", "entry_json"]
    sql = (f"INSERT INTO {UsageRollup._meta.db_table} ({', '.join(columns)}) "
           f"VALUES ({', '.join(['%s'] * len(columns))})")
    # A few histogram shapes, reused: building 80 values per row is what makes filling slow.
    shapes = []
    for _ in range(64):
        latency, ttft = [0] * HISTOGRAM_BUCKETS, [0] * HISTOGRAM_BUCKETS
        for _ in range(3):
            latency[rng.randrange(12, HISTOGRAM_BUCKETS - 6)] += 5
            ttft[rng.randrange(6, 20)] += 5
        calls = sum(latency)
        packed = rollup_packed(calls=calls, prompt_tokens=calls * 900, completion_tokens=calls * 150,
                               cost=Decimal(f"{calls * 0.0021:.7f}"), latency=latency, ttft=ttft)
        shapes.append((calls, [*latency, *ttft, packed,
                               rollup_entry_json(error_category="", currency="USD", packed=packed)]))
    end = bucket_start(now, "hour")
    with transaction.atomic(), connection.cursor() as cursor:
        for size, step, count in (("hour", timedelta(hours=1), 365 * 24), ("day", timedelta(days=1), 366)):
            start = bucket_start(end - step * count, size)
            rows = []
            for i in range(count):
                bucket = connection.ops.adapt_datetimefield_value(start + step * i)
                for n, config_id in enumerate(ids):
                    calls, histogram = shapes[(i * 7 + n) % len(shapes)]
                    rows.append((size, bucket, config_id, f"config-{n}", f"model-{n % 10}", f"route-{n % 5}", "",
                                 "", "", "", "", "chat", "", "USD", calls, calls * 900, calls * 150,
                                 f"{calls * 0.0021:.7f}", *histogram))
                if len(rows) >= 5000:
                    cursor.executemany(sql, rows)
                    rows = []
            cursor.executemany(sql, rows)
    get_user_model().objects.create_superuser("bench", "bench@example.com", "pw-bench-123")
    return ids


def calibration() -> tuple[float, float]:
    """A fixed Python loop's wall and CPU time (s): on an idle machine the two are equal; their ratio is how much
    longer than on an idle machine anything that needs the CPU takes while other jobs run."""
    wall, cpu = time.perf_counter(), time.process_time()
    total = 0
    for i in range(3_000_000):
        total += i * i
    return time.perf_counter() - wall, time.process_time() - cpu


def timed(client, url: str, params: dict, runs: int) -> tuple[float, float, float, int]:
    """p50 and p95 wall time and p50 CPU time of this process (ms) of `runs` requests, and the series rows. With
    SQLite the query runs in this process too, so the CPU time is about what an idle machine takes."""
    for _ in range(2):
        client.get(url, params)
    times, cpu_times = [], []
    for _ in range(runs):
        started, cpu = time.perf_counter(), time.process_time()
        response = client.get(url, params)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu)
        assert response.status_code == 200, response.content[:300]
    return (statistics.median(times) * 1000, percentile(times, 95) * 1000, statistics.median(cpu_times) * 1000,
            len(response.json()["series"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=50)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()

    temp_db = ""
    workdir = Path(tempfile.mkdtemp(prefix="opsagent-bench-"))
    if args.database_url:
        os.environ["DATABASE_URL"], temp_db = temporary_postgres(args.database_url)
    else:
        os.environ["DATABASE_URL"] = f"sqlite:///{workdir / 'usage.sqlite3'}"
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    try:
        import django

        django.setup()
        from django.conf import settings
        from django.core.management import call_command
        from django.db import connection
        from rest_framework.test import APIClient

        from llmconfigs.models import UsageRollup

        settings.ALLOWED_HOSTS.append("testserver")  # Django's test client
        call_command("migrate", verbosity=0)
        now = datetime.now(UTC)
        started = time.perf_counter()
        ids = fill(args.configs, now=now)
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
        print(f"{connection.vendor}: {UsageRollup.objects.count():,} rollup rows for {args.configs} configs "
              f"written in {time.perf_counter() - started:.0f} s", flush=True)
        from django.contrib.auth import get_user_model

        client = APIClient()
        client.force_authenticate(get_user_model().objects.get(username="bench"))
        year = {"from": (now - timedelta(days=365)).isoformat(), "to": now.isoformat(), "bucket": "day"}
        month = {"from": (now - timedelta(days=30)).isoformat(), "to": now.isoformat(), "bucket": "hour"}
        cases = [
            ("year, day buckets, by config", "/api/usage/", {**year, "group_by": "config"}),
            ("year, day buckets, all", "/api/usage/", year),
            ("31 days, hour buckets, by config", "/api/usage/", {**month, "group_by": "config"}),
            ("31 days, hour buckets, all", "/api/usage/", month),
            ("year, day buckets, by config, totals", "/api/usage/", {**year, "group_by": "config", "series": "false"}),
            ("31 days, hours, by config, totals", "/api/usage/", {**month, "group_by": "config", "series": "false"}),
            ("one config's stats, year by day", f"/api/llm-configs/{ids[0]}/stats/", year),
        ]
        wall, cpu = calibration()
        print(f"calibration loop: {wall * 1000:.0f} ms wall, {cpu * 1000:.0f} ms CPU", flush=True)
        worst = worst_cpu = 0.0
        for name, url, params in cases:
            p50, p95, cpu_p50, rows = timed(client, url, params, args.runs)
            worst, worst_cpu = max(worst, p50), max(worst_cpu, cpu_p50)
            print(f"{name:<36}: p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  CPU p50 {cpu_p50:7.1f} ms  "
                  f"({rows:,} series rows)", flush=True)
        wall, cpu = calibration()
        print(f"calibration loop: {wall * 1000:.0f} ms wall, {cpu * 1000:.0f} ms CPU", flush=True)
        print(f"goal: p50 < {GOAL_MS} ms: worst {worst:.1f} ms wall ({'met' if worst < GOAL_MS else 'MISSED'}), "
              f"{worst_cpu:.1f} ms CPU ({'met' if worst_cpu < GOAL_MS else 'MISSED'})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if temp_db:
            from django.db import connections

            connections.close_all()
            drop_postgres(args.database_url, temp_db)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
