"""Benchmark: what the Prometheus metrics add to the first token. Two parts:

1. the counting on the way to the first token (a pool member's call counted, the active-streams gauge raised), called
   in this process with METRICS_ENABLED on and off, in microseconds;
2. time to first token through POST /v1/chat-messages (streaming) on two daphne servers over one database, one with
   METRICS_ENABLED=1 and one with METRICS_ENABLED=0, interleaved so that drift affects both alike (`--aa`: both on,
   to see what difference the machine alone makes between two servers); and the time a scrape of /metrics takes.

Standalone (as bench/dify_overhead.py: fake upstream, temporary database, daphne). Run:
`.venv/bin/python bench/metrics_overhead.py [-n 200] [--multiprocess] [--database-url ...] [--redis-url ...]`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dify_overhead import bench_server, percentile, ttft_dify  # noqa: E402
from tests.e2e.dify_servers import Daphne  # noqa: E402

KEY = f"app-bench-metrics-{secrets.token_hex(12)}"


def hook_cost(n: int) -> dict[bool, float]:
    """p50 of the counting done before the first token, with metrics on and off, in microseconds."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    os.environ.setdefault("DATABASE_URL", "sqlite://:memory:")
    import django

    django.setup()
    from django.conf import settings

    from opsagent.common.metrics import provider_call_observe, stream_active

    rows = {}
    for enabled in (True, False):
        settings.METRICS_ENABLED = enabled
        times = []
        for index in range(n + 200):
            started = time.perf_counter()
            provider_call_observe(config_name="bench-config", route="bench-route", category="")
            with stream_active("dify"):
                pass
            if index >= 200:  # the first ones create the series
                times.append(time.perf_counter() - started)
        rows[enabled] = statistics.median(times) * 1e6
        print(f"counting before the first token, metrics {'on ' if enabled else 'off'}: p50 {rows[enabled]:6.2f} µs  "
              f"p99 {percentile(times, 99) * 1e6:6.2f} µs", flush=True)
    return rows


async def ttft_pair(on: str, off: str, n: int) -> tuple[list[float], list[float]]:
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(10):  # warm-up: connections, caches, imports
            await ttft_dify(client, on, KEY)
            await ttft_dify(client, off, KEY)
        with_metrics, without = [], []
        for index in range(n):  # interleaved, alternating which goes first
            for base in ((on, off) if index % 2 else (off, on)):
                (with_metrics if base == on else without).append(await ttft_dify(client, base, KEY))
    return with_metrics, without


async def scrape_times(base: str, n: int) -> list[float]:
    async with httpx.AsyncClient(timeout=60) as client:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            response = await client.get(f"{base}/metrics")
            response.raise_for_status()
            times.append(time.perf_counter() - started)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="streamed requests per server")
    parser.add_argument("--multiprocess", action="store_true",
                        help="both servers in prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR)")
    parser.add_argument("--aa", action="store_true",
                        help="calibration: metrics on in both servers, so the difference is the noise of the machine")
    parser.add_argument("--database-url", default="",
                        help="a PostgreSQL server to create a temporary database on (default: a temporary SQLite file)")
    parser.add_argument("--redis-url", default="")
    args = parser.parse_args()

    settings = {"METRICS_ENABLED": "1"}
    if args.multiprocess:
        settings["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="opsagent-bench-metrics-")
    apps = [("bench-metrics", "chat", KEY)]
    with bench_server(database_url=args.database_url, redis_url=args.redis_url, apps=apps, **settings) as (
            server, env, _):
        off = Daphne(env={**env, "METRICS_ENABLED": "1" if args.aa else "0"}).start(timeout=120)
        try:
            with_metrics, without = asyncio.run(ttft_pair(server.url, off.url, args.n))
            scrapes = asyncio.run(scrape_times(server.url, 50))
        finally:
            off.stop()
    ms = 1000
    overhead = (statistics.median(with_metrics) - statistics.median(without)) * ms
    for name, times in (("metrics on ", with_metrics), ("metrics on " if args.aa else "metrics off", without)):
        print(f"first token, {name}: p50 {statistics.median(times) * ms:7.2f} ms  "
              f"p99 {percentile(times, 99) * ms:7.2f} ms", flush=True)
    print(f"metrics add (p50)       : {overhead:+.2f} ms", flush=True)
    print(f"GET /metrics after {2 * args.n + 20} turns: p50 {statistics.median(scrapes) * ms:.2f} ms", flush=True)
    hooks = hook_cost(max(args.n * 50, 10_000))
    added = (hooks[True] - hooks[False]) / 1000
    print(f"goal: metrics add < 0.3 ms p50 to the first token: the counting adds {added:.4f} ms "
          f"({'met' if added < 0.3 else 'MISSED'}); end to end {overhead:+.2f} ms "
          f"({'met' if overhead < 0.3 else 'over, or the noise of a shared machine'})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
