"""Benchmark: what rate limits and budgets add to the first token. Two parts:

1. the check itself (agentcore.limits.usage_check with every limit of an app and of its key set, the only work
   limits add before the first token), called in this process: process memory, and Redis with --redis-url;
2. time to first token through POST /v1/chat-messages (streaming, daphne) for an app with every limit set (high
   enough never to refuse) vs. an app without, interleaved so that drift affects both alike.

Standalone (as bench/dify_overhead.py: fake upstream, temporary database, daphne). Run:
`.venv/bin/python bench/limits_overhead.py [-n 200] [--database-url postgres://...] [--redis-url redis://...]`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dify_overhead import bench_server, percentile, ttft_dify  # noqa: E402

OPEN_KEY = f"app-bench-open-{secrets.token_hex(12)}"
LIMITED_KEY = f"app-bench-limited-{secrets.token_hex(12)}"
HIGH = {"requests_per_minute": 10**6, "tokens_per_minute": 10**9, "tokens_per_day": 10**12,
        "tokens_per_month": 10**12, "cost_per_day": "1000000", "cost_per_month": "1000000"}


def check_cost(n: int, redis_url: str) -> dict[str, float]:
    """p50 of usage_check in this process, without limits and with all twelve (app and key), in microseconds."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    os.environ.setdefault("DATABASE_URL", "sqlite://:memory:")
    if redis_url:
        os.environ["REDIS_URL"] = redis_url
    import django

    django.setup()
    from decimal import Decimal

    from agentcore.limits import Limits, Meter, usage_check

    limits = Limits(**{k: Decimal(v) if k.startswith("cost") else v for k, v in HIGH.items()})
    metered = Meter(app_id=secrets.token_hex(8), app_limits=limits, key_id=secrets.token_hex(8), key_limits=limits)
    unmetered = Meter(app_id=secrets.token_hex(8), key_id=secrets.token_hex(8))
    rows = {}
    for name, meter in (("none", unmetered), ("all limits", metered)):
        for _ in range(50):
            usage_check(meter=meter)
        times = []
        for _ in range(n):
            started = time.perf_counter()
            usage_check(meter=meter)
            times.append(time.perf_counter() - started)
        rows[name] = statistics.median(times) * 1e6
        print(f"usage_check ({'Redis' if redis_url else 'process memory'}), {name:<10}: p50 {rows[name]:8.1f} µs  "
              f"p99 {percentile(times, 99) * 1e6:8.1f} µs", flush=True)
    return rows


async def ttft_pair(base: str, n: int) -> tuple[list[float], list[float]]:
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(10):  # warm-up: connections, caches, imports
            await ttft_dify(client, base, OPEN_KEY)
            await ttft_dify(client, base, LIMITED_KEY)
        open_, limited = [], []
        for index in range(n):  # interleaved, alternating which goes first
            first, second = (OPEN_KEY, LIMITED_KEY) if index % 2 else (LIMITED_KEY, OPEN_KEY)
            for key in (first, second):
                (open_ if key == OPEN_KEY else limited).append(await ttft_dify(client, base, key))
    return open_, limited


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="streamed requests per app")
    parser.add_argument("--database-url", default="",
                        help="a PostgreSQL server to create a temporary database on (default: a temporary SQLite file)")
    parser.add_argument("--redis-url", default="")
    args = parser.parse_args()

    apps = [("bench-open", "chat", OPEN_KEY)]
    with bench_server(database_url=args.database_url, redis_url=args.redis_url, apps=apps) as (server, env, upstream):
        from tests.e2e.dify_servers import provision_in_subprocess

        provision_in_subprocess(env=env, name="bench-limited", mode="chat", upstream_url=upstream, key=LIMITED_KEY,
                                **HIGH)
        open_, limited = asyncio.run(ttft_pair(server.url, args.n))
    ms = 1000
    overhead = (statistics.median(limited) - statistics.median(open_)) * ms
    for name, times in (("no limits", open_), ("all limits", limited)):
        print(f"first token, {name:<10}: p50 {statistics.median(times) * ms:7.2f} ms  "
              f"p99 {percentile(times, 99) * ms:7.2f} ms", flush=True)
    print(f"limits add (p50)       : {overhead:+.2f} ms", flush=True)
    check = check_cost(max(args.n * 10, 2000), args.redis_url)
    added = (check["all limits"] - check["none"]) / 1000
    print(f"goal: limits add < 0.5 ms p50 to the first token: the check adds {added:.3f} ms "
          f"({'met' if added < 0.5 else 'MISSED'}); end to end {overhead:+.2f} ms (within the noise of a shared "
          f"machine)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
