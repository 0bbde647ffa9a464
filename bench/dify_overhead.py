"""Benchmark: time to first token through POST /v1/chat-messages (streaming, daphne) vs. straight to the same fake
upstream; sequential and interleaved for chat and agent-chat apps and for agent-tools (an agent-chat app whose
upstream calls a tool first, then answers: its direct side is still one plain call, so its overhead holds the first
model call and the tool step too), follow-up messages in a long conversation (the direct side sends the same
history), a model pool whose first member refuses connections vs. a pool of one healthy member (failing over, then
with the dead member cooled down), then 100 concurrent streams.

Standalone: it starts the fake OpenAI-compatible upstreams, creates a temporary database (SQLite unless
--database-url is given), migrates it, creates the LLM configs, a chat, an agent-chat and an agent-tools app with
keys, and starts
daphne. Run: `.venv/bin/python bench/dify_overhead.py [-n 50] [--concurrency 100] [--database-url postgres://...]`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.dify_servers import (  # noqa: E402
    PYTHON,
    Daphne,
    free_port,
    manage,
    provision_in_subprocess,
    server_env,
)

FAKE_ANSWER = "Hello from the fake upstream."  # the fake upstream's default answer, as it enters the history
# Mode "agent-tools": an agent-chat app whose upstream calls this tool first at every turn, then answers (the ops
# assistant's normal turn: two model calls and a tool step). A built-in tool that is safe, fast and read-only: no
# network, no command, no approval.
TOOL = "current_time"
TOOL_ARGUMENTS = {"timezone": "UTC"}
# Fresh keys per run: a shared Redis cache may still map an earlier run's key to that run's (gone) app.
CHAT_KEY = f"app-bench-chat-{secrets.token_hex(12)}"
AGENT_KEY = f"app-bench-agent-{secrets.token_hex(12)}"
TOOLS_KEY = f"app-bench-tools-{secrets.token_hex(12)}"


def temporary_postgres(url: str) -> tuple[str, str]:
    """A fresh database beside the one `url` names (created now, dropped by `drop_postgres`): (its URL, its name)."""
    import os

    import psycopg

    base, _, name = url.rpartition("/")
    temp = f"{name}_bench_{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{temp}"')
    return f"{base}/{temp}", temp


def drop_postgres(url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def bench_server(*, database_url: str, redis_url: str, apps: list[tuple[str, str, str]], **settings: str
                 ) -> Iterator[tuple[Daphne, dict[str, str], str]]:
    """A fake upstream, a temporary database (on the PostgreSQL server of `database_url`, else a SQLite file) with
    `apps` (name, mode, key) provisioned, and daphne on it with `settings` in its environment: yields (daphne, its
    environment, the upstream's URL). An app of mode "agent-tools" is an agent-chat app with a config of its own on
    a second fake upstream, which calls TOOL first at every turn. On an error inside, daphne's log is printed."""
    workdir = Path(tempfile.mkdtemp(prefix="opsagent-bench-"))
    temp_db = ""
    if database_url:
        server_database_url, temp_db = temporary_postgres(database_url)
    else:
        server_database_url = f"sqlite:///{workdir / 'bench.sqlite3'}"
    port = free_port()
    upstream_url = f"http://127.0.0.1:{port}/v1"
    # BENCH_UPSTREAM_TEXT: the fake upstream's answer (its words are the chunks); BENCH_UPSTREAM_DELAY: seconds
    # between its chunks (each then arrives in a network read of its own).
    text, delay = os.environ.get("BENCH_UPSTREAM_TEXT"), os.environ.get("BENCH_UPSTREAM_DELAY")
    answer = [*(["--text", text] if text else []), *(["--delay", delay] if delay else [])]
    upstreams = [subprocess.Popen([PYTHON, "-m", "tests.fakes.upstream", "--port", str(port), *answer], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    tools_url = ""
    if any(mode == "agent-tools" for _, mode, _ in apps):
        tools_port = free_port()
        tools_url = f"http://127.0.0.1:{tools_port}/v1"
        upstreams.append(subprocess.Popen([PYTHON, "-m", "tests.fakes.upstream", "--port", str(tools_port), *answer,
                                           "--tool-call", TOOL, "--tool-arguments", json.dumps(TOOL_ARGUMENTS)],
                                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    env = server_env(database_url=server_database_url, redis_url=redis_url, LOG_LEVEL="WARNING",
                     MEDIA_ROOT=str(workdir / "media"), **settings)
    try:
        print(f"database {server_database_url.split('@')[-1]}; migrating...", flush=True)
        manage("migrate", "--noinput", env=env)
        for name, mode, key in apps:
            if mode == "agent-tools":
                provision_in_subprocess(env=env, name=name, mode="agent-chat", upstream_url=tools_url, key=key,
                                        config_name="bench-tools")
            else:
                provision_in_subprocess(env=env, name=name, mode=mode, upstream_url=upstream_url, key=key)
        server = Daphne(env=env)
        try:
            server.start(timeout=120)  # slow on a busy machine
            print(f"daphne on {server.url}, fake upstream on {upstream_url}", flush=True)
            yield server, env, upstream_url
        except Exception:
            print("daphne's log:\n" + "".join(server.log[-80:]), flush=True)
            raise
        finally:
            server.stop()
    finally:
        for upstream in upstreams:
            upstream.terminate()
            upstream.wait(10)
        if temp_db:
            drop_postgres(database_url, temp_db)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


async def ttft_direct(client: httpx.AsyncClient, upstream: str, turns: int = 0) -> float:
    """First content delta straight from the upstream (what a client of the provider would see), after `turns`
    earlier exchanges of history."""
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": FAKE_ANSWER}] * turns
    body = {"model": "fake-bench", "stream": True, "messages": [*history, {"role": "user", "content": "hello"}]}
    started = time.perf_counter()
    async with client.stream("POST", f"{upstream}/chat/completions", json=body,
                             headers={"Authorization": "Bearer sk-bench"}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    return time.perf_counter() - started
    raise RuntimeError("the upstream sent no content")


async def ttft_dify(client: httpx.AsyncClient, base: str, key: str, conversation_id: str = "", model: str = "",
                    tool: str = "") -> float:
    """First answer event through /v1/chat-messages (in a new conversation, or in `conversation_id`; with the
    model or pool named `model`); the rest of the stream is read to its message_end. With `tool`, the stream must
    also show that tool run before the answer (an agent_thought with its observation), or this raises."""
    body = {"inputs": {}, "query": "hello", "user": "bench", "response_mode": "streaming",
            "auto_generate_name": False, "conversation_id": conversation_id}
    if model:
        body["model"] = model
    started = time.perf_counter()
    first = None
    ended = ran = False
    async with client.stream("POST", f"{base}/v1/chat-messages", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["event"] in ("message", "agent_message") and event.get("answer") and first is None:
                first = time.perf_counter() - started
                if tool and not ran:
                    raise RuntimeError(f"the answer came before the tool {tool} ran")
            elif event["event"] == "agent_thought" and tool and event.get("tool") == tool:
                ran = ran or bool(event.get("observation"))
            elif event["event"] == "error":
                raise RuntimeError(f"error event: {event}")
            elif event["event"] == "message_end":
                ended = True
    if first is None or not ended:
        raise RuntimeError("the stream had no answer or no message_end")
    return first


def report(name: str, direct: list[float], dify: list[float]) -> dict[str, float]:
    ms = 1000
    row = {
        "direct_p50": statistics.median(direct) * ms, "direct_p99": percentile(direct, 99) * ms,
        "dify_p50": statistics.median(dify) * ms, "dify_p99": percentile(dify, 99) * ms,
    }
    row["overhead_p50"] = row["dify_p50"] - row["direct_p50"]
    row["overhead_p99"] = row["dify_p99"] - row["direct_p99"]
    print(f"{name:<22} direct p50 {row['direct_p50']:7.2f} ms  p99 {row['direct_p99']:7.2f} ms | "
          f"/v1/chat-messages p50 {row['dify_p50']:7.2f} ms  p99 {row['dify_p99']:7.2f} ms | "
          f"overhead p50 {row['overhead_p50']:+7.2f} ms  p99 {row['overhead_p99']:+7.2f} ms", flush=True)
    return row


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sequential(base: str, upstream: str, key: str, n: int, name: str, server_pid: int, tool: str = "",
                     ) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(5):  # warm-up: connections, caches, imports
            await ttft_direct(client, upstream)
            await ttft_dify(client, base, key, tool=tool)
        direct, dify = [], []
        cpu = 0.0
        for _ in range(n):  # interleaved, so drift affects both sides alike
            direct.append(await ttft_direct(client, upstream))
            before = cpu_seconds(server_pid)
            dify.append(await ttft_dify(client, base, key, tool=tool))
            cpu += cpu_seconds(server_pid) - before
    row = report(name, direct, dify)
    # Latency on a shared machine varies from run to run; the server's CPU time per request varies much less, and
    # under concurrency it is what the first tokens queue for.
    row["cpu_ms"] = cpu / n * 1000
    print(f"{'':<22} server CPU per streamed request (whole stream, all threads): {row['cpu_ms']:.1f} ms", flush=True)
    return row


async def follow_ups(base: str, upstream: str, key: str, n: int, *, turns: int) -> dict[str, float]:
    """Follow-up messages in a conversation of `turns` exchanges (growing by one per message); the direct side sends
    the provider a history of the same length each time."""
    async with httpx.AsyncClient(timeout=60) as client:
        await ttft_dify(client, base, key)
        conversations = (await client.get(f"{base}/v1/conversations", params={"user": "bench", "limit": 1},
                                          headers={"Authorization": f"Bearer {key}"})).json()
        conversation_id = conversations["data"][0]["id"]
        for _ in range(turns - 1):
            await ttft_dify(client, base, key, conversation_id)
        direct, dify = [], []
        for i in range(n):
            direct.append(await ttft_direct(client, upstream, turns + i))
            dify.append(await ttft_dify(client, base, key, conversation_id))
    return report(f"chat follow-up ({2 * turns + 1}-{2 * (turns + n) - 1} msgs)", direct, dify)


def pool_configs(upstream_url: str) -> list[dict[str, str | int]]:
    """Two pools: `bench-failover`, whose first member (priority 1) is a port nothing listens on, and `bench-single`,
    one healthy member. The healthy members call the same fake upstream as the other rows."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    member = {"provider": "openai", "api_key": "sk-bench-pool-key-0000000000"}
    return [
        {**member, "name": "bench-dead", "model_name": "fake-dead", "route": "bench-failover", "priority": 1,
         "base_url": closed_url},
        {**member, "name": "bench-alive", "model_name": "fake-alive", "route": "bench-failover",
         "base_url": upstream_url},
        {**member, "name": "bench-single", "model_name": "fake-single", "route": "bench-single",
         "base_url": upstream_url},
    ]


async def failover(base: str, key: str, n: int) -> tuple[dict[str, float], dict[str, float]]:
    """Time to first token through the failover pool vs. the one-member pool: first while every request fails over
    (the server cools the dead member down only at its n+1-th failure), then once it is cooled down."""
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(5):
            await ttft_dify(client, base, key, model="bench-single")
        rows = []
        for name in ("failover (dead 1st)", "failover (cooled down)"):
            single, pooled = [], []
            for _ in range(n):
                single.append(await ttft_dify(client, base, key, model="bench-single"))
                pooled.append(await ttft_dify(client, base, key, model="bench-failover"))
            if not rows:
                await ttft_dify(client, base, key, model="bench-failover")  # the failure that cools it down
            row = report(name, single, pooled)
            print(f"{'':<22} (direct = a pool of one healthy member, /v1 = the pool whose first member is dead)",
                  flush=True)
            rows.append(row)
    return rows[0], rows[1]


async def concurrent(base: str, upstream: str, key: str, streams: int) -> None:
    limits = httpx.Limits(max_connections=streams * 2, max_keepalive_connections=streams * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        direct = await asyncio.gather(*(ttft_direct(client, upstream) for _ in range(streams)),
                                      return_exceptions=True)
        started = time.perf_counter()
        dify = await asyncio.gather(*(ttft_dify(client, base, key) for _ in range(streams)), return_exceptions=True)
        wall = time.perf_counter() - started
    errors = [r for r in dify if isinstance(r, BaseException)]
    ok = [r for r in dify if not isinstance(r, BaseException)]
    ok_direct = [r for r in direct if not isinstance(r, BaseException)]
    print(f"{streams} concurrent streams: {len(ok)} ok, {len(errors)} errors, all done in {wall:.2f} s", flush=True)
    if ok:
        report(f"concurrent x{streams}", ok_direct or [0.0], ok)
    for error in errors[:5]:
        print(f"  error: {error!r}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50, help="sequential requests per mode and side")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--database-url", default="",
                        help="a PostgreSQL server to create a temporary database on (default: a temporary SQLite file)")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--history", type=int, default=25,
                        help="exchanges in the conversation before the follow-up messages are timed")
    args = parser.parse_args()

    # The follow-up rows compare the same history on both sides: the server gives the model all of it, however
    # many messages --history and -n add up to.
    apps = [("bench-chat", "chat", CHAT_KEY), ("bench-agent", "agent-chat", AGENT_KEY),
            ("bench-tools", "agent-tools", TOOLS_KEY)]
    # The failover rows' dead member fails n times without being cooled down, then once more, which cools it down.
    with bench_server(database_url=args.database_url, redis_url=args.redis_url, apps=apps,
                      AGENT_HISTORY_MAX_MESSAGES="100000", LLM_COOLDOWN_FAILURES=str(args.n + 1),
                      LLM_COOLDOWN_WINDOW="3600", LLM_COOLDOWN_SECONDS="3600") as (server, env, upstream_url):
        pid = server.process.pid
        provision_in_subprocess(env=env, function="provision_configs", configs=pool_configs(upstream_url))
        chat = asyncio.run(sequential(server.url, upstream_url, CHAT_KEY, args.n, "chat (sequential)", pid))
        agent = asyncio.run(sequential(server.url, upstream_url, AGENT_KEY, args.n, "agent-chat (sequential)", pid))
        asyncio.run(sequential(server.url, upstream_url, TOOLS_KEY, args.n, "agent-tools (sequential)", pid, TOOL))
        asyncio.run(follow_ups(server.url, upstream_url, CHAT_KEY, args.n, turns=args.history))
        dead, cooled = asyncio.run(failover(server.url, CHAT_KEY, args.n))
        asyncio.run(concurrent(server.url, upstream_url, CHAT_KEY, args.concurrency))
    print(f"goal p50 overhead: chat <= 10 ms ({'met' if chat['overhead_p50'] <= 10 else 'MISSED'}), "
          f"agent-chat <= 15 ms ({'met' if agent['overhead_p50'] <= 15 else 'MISSED'}), "
          f"failover <= 5 ms ({'met' if dead['overhead_p50'] <= 5 else 'MISSED'}), "
          f"cooled down 0 ms ({'met' if cooled['overhead_p50'] <= 1 else 'MISSED'}: within the 1 ms of noise)",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
