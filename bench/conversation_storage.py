"""Benchmark: one long conversation through POST /v1/chat-messages (streaming, daphne, a chat app): the time of a
turn (request sent to the end of its stream) at the start and at the end of the conversation, and the bytes its
checkpoints hold as it grows.

Standalone, like bench/dify_overhead.py: a fake OpenAI-compatible upstream, a temporary database (SQLite unless
--database-url is given), daphne with the default settings. Run:
`.venv/bin/python bench/conversation_storage.py [--turns 2000] [--database-url postgres://...]`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dify_overhead import CHAT_KEY, bench_server, cpu_seconds  # noqa: E402
from tests.e2e.dify_servers import PYTHON  # noqa: E402

WINDOW = 100  # turns timed together at the start and at the end


async def turn(client: httpx.AsyncClient, base: str, query: str, conversation_id: str) -> tuple[float, str]:
    """One message in the conversation, read to its message_end: (seconds, the conversation's id)."""
    body = {"inputs": {}, "query": query, "user": "bench", "response_mode": "streaming",
            "auto_generate_name": False, "conversation_id": conversation_id}
    started = time.perf_counter()
    async with client.stream("POST", f"{base}/v1/chat-messages", json=body,
                             headers={"Authorization": f"Bearer {CHAT_KEY}"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["event"] == "error":
                    raise RuntimeError(f"error event: {event}")
                conversation_id = event.get("conversation_id") or conversation_id
    return time.perf_counter() - started, conversation_id


def checkpoint_bytes(env: dict[str, str]) -> int:
    code = ("import django; django.setup(); from agentcore.selectors import checkpoint_storage_bytes; "
            "print(checkpoint_storage_bytes())")
    done = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True,
                          timeout=120)
    return int(done.stdout.strip().splitlines()[-1])


async def conversation(base: str, env: dict[str, str], server_pid: int, turns: int, query_chars: int) -> None:
    query = ("Is the disk on web-1 filling up again? " * (query_chars // 39 + 1))[:query_chars]
    times: list[float] = []
    cpu: list[float] = []
    conversation_id = ""
    marks = sorted({WINDOW, turns // 4, turns // 2, turns})
    async with httpx.AsyncClient(timeout=60) as client:
        for n in range(1, turns + 1):
            before = cpu_seconds(server_pid)
            seconds, conversation_id = await turn(client, base, f"{n}: {query}", conversation_id)
            cpu.append(cpu_seconds(server_pid) - before)
            times.append(seconds)
            if n in marks:
                # The server's CPU time varies much less than latency on a shared machine.
                print(f"turn {n:>5}: last {WINDOW} turns p50 {statistics.median(times[-WINDOW:]) * 1000:6.1f} ms, "
                      f"server CPU {statistics.mean(cpu[-WINDOW:]) * 1000:5.1f} ms/turn, "
                      f"checkpoint storage {checkpoint_bytes(env):>10,} bytes", flush=True)
    print(f"{turns} turns of {query_chars} characters: per-turn p50 {statistics.median(times[:WINDOW]) * 1000:.1f} ms "
          f"(turns 1-{WINDOW}) -> {statistics.median(times[-WINDOW:]) * 1000:.1f} ms (last {WINDOW}); server CPU "
          f"{statistics.mean(cpu[:WINDOW]) * 1000:.1f} -> {statistics.mean(cpu[-WINDOW:]) * 1000:.1f} ms/turn; "
          f"total {sum(times):.0f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--query-chars", type=int, default=1000, help="characters of each question")
    parser.add_argument("--database-url", default="",
                        help="a PostgreSQL server to create a temporary database on (default: a temporary SQLite file)")
    parser.add_argument("--redis-url", default="")
    args = parser.parse_args()

    with bench_server(database_url=args.database_url, redis_url=args.redis_url,
                      apps=[("bench-chat", "chat", CHAT_KEY)]) as (server, env, _):
        asyncio.run(conversation(server.url, env, server.process.pid, args.turns, args.query_chars))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
