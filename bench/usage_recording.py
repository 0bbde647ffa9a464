"""Benchmark: what recording every provider call (llmconfigs.usage) adds to the first token. Two daphne servers on
the same temporary database, one with USAGE_RECORDING=true and one with false, answer POST /v1/chat-messages
(streaming) in turn, interleaved so that drift affects both alike. Recording happens once the turn ends, in the
database hop that saves it; before the first token it only creates the call's record.

Standalone (as bench/dify_overhead.py: fake upstream, temporary database, daphne). Run:
`.venv/bin/python bench/usage_recording.py [-n 200] [--database-url postgres://...] [--redis-url redis://...]`.
"""
from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dify_overhead import bench_server, percentile, ttft_dify  # noqa: E402
from tests.e2e.dify_servers import Daphne  # noqa: E402

KEY = f"app-bench-usage-{secrets.token_hex(12)}"


async def ttft_pair(on: str, off: str, n: int) -> tuple[list[float], list[float]]:
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(10):  # warm-up: connections, caches, imports
            await ttft_dify(client, on, KEY)
            await ttft_dify(client, off, KEY)
        recorded, unrecorded = [], []
        for index in range(n):  # interleaved, alternating which goes first
            for base in ((on, off) if index % 2 else (off, on)):
                (recorded if base == on else unrecorded).append(await ttft_dify(client, base, KEY))
    return recorded, unrecorded


def in_process(n: int) -> dict[str, float]:
    """p50 in microseconds of the work recording adds before the first token (creating the call's record) and per
    streamed chunk (looking for token usage in it), in this process."""
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    os.environ.setdefault("DATABASE_URL", "sqlite://:memory:")
    import django

    django.setup()
    import time

    from langchain_core.messages import AIMessageChunk
    from langchain_core.outputs import ChatGenerationChunk

    from llmconfigs.models import LLMConfig
    from llmconfigs.routing import _generation_count
    from llmconfigs.usage import CallRecord

    config = LLMConfig(name="bench", provider="openai", model_name="bench")
    chunk = ChatGenerationChunk(message=AIMessageChunk(content="word "))
    record = CallRecord(config=config, kind="chat")
    rows = {}
    for name, work in (("record per call", lambda: CallRecord(config=config, kind="chat")),
                       ("token check per chunk", lambda: _generation_count(record, chunk))):
        times = []
        for _ in range(n):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        rows[name] = statistics.median(times) * 1e6
        print(f"{name:<22}: p50 {rows[name]:6.2f} µs", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="streamed requests per server")
    parser.add_argument("--database-url", default="",
                        help="a PostgreSQL server to create a temporary database on (default: a temporary SQLite file)")
    parser.add_argument("--redis-url", default="")
    args = parser.parse_args()

    apps = [("bench-usage", "chat", KEY)]
    with bench_server(database_url=args.database_url, redis_url=args.redis_url, apps=apps,
                      USAGE_RECORDING="true") as (server, env, _upstream):
        off = Daphne(env={**env, "USAGE_RECORDING": "false"})
        off.start(timeout=120)
        try:
            recorded, unrecorded = asyncio.run(ttft_pair(server.url, off.url, args.n))
        finally:
            off.stop()
    ms = 1000
    for name, times in (("recording on", recorded), ("recording off", unrecorded)):
        print(f"first token, {name:<13}: p50 {statistics.median(times) * ms:7.2f} ms  "
              f"p99 {percentile(times, 99) * ms:7.2f} ms", flush=True)
    added = (statistics.median(recorded) - statistics.median(unrecorded)) * ms
    rows = in_process(10_000)
    before_first = (rows["record per call"] + rows["token check per chunk"]) / 1000
    print(f"goal: recording adds < 0.3 ms p50 to the first token: in process {before_first:.4f} ms before it "
          f"({'met' if before_first < 0.3 else 'MISSED'}); end to end {added:+.2f} ms (within the noise of a shared "
          f"machine)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
