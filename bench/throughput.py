"""Benchmark for issue 16 (throughput): each goal of the issue as a row, measured side by side in one run.

Rows (`--rows 1,2,3,4,5`, default all), each printed as numbers and a ratio:

1. cpu      Server CPU (user + system, every thread and worker process) per streamed request with a short answer
            (5 chunks), chat and agent-chat apps through `POST /v1/chat-messages`, and agent-tools: an agent-chat
            app whose upstream calls a tool first (current_time: read-only, no network, no approval), then answers
            (two model calls and a tool step, the ops assistant's usual turn), on SQLite and, with
            --database-url, on PostgreSQL + Redis; next to it LiteLLM's proxy's CPU per streamed
            `/v1/chat/completions` request to the same fake upstream (when installed: /tmp/litellm-venv, created by
            --install-litellm; else the row says "not installed"). Sequential requests, the sides interleaved.
            Goal: at most half of the CPU of the code at the issue's filing time (give that checkout as
            --compare-root: its server runs beside this one on its own database, interleaved, and the ratio is
            printed).
2. burst    100 (--concurrency) concurrent streams on one worker: first-token p50/p95, the burst's wall time and
            the errors, OpsAgent (chat app) vs LiteLLM's proxy in the same run. Goal: p50 below LiteLLM's, 0 errors.
3. slow     1,000 (--slow-streams) concurrent streams on one worker against a slow upstream (answers of
            --slow-chunks chunks spread over --slow-seconds): errors (goal 0), the server's RSS before the burst and
            at its peak, and the memory per open stream (peak - before) / streams open at the peak.
4. chunks   CPU per 1,000 streamed chunks through `/v1/chat-messages` (a long answer of --long-chunks one-word
            chunks) against a plain asyncio proxy loop in this script (`floor_proxy`: reads the upstream's SSE with
            httpx, writes one Dify `message` event per chunk to its client) as the floor. Per chunk = (CPU of a long
            answer - CPU of a short one) / (chunks of the long - of the short), both sides interleaved. Goal: at
            most 1.5x the floor. The long answer's chunks are sent back to back, so many arrive in one network
            read; --long-delay spaces them (seconds between chunks) so that each arrives alone, for both sides.
5. workers  Streams per second for a fixed burst (--burst concurrent short streams, PostgreSQL + Redis only): two
            worker processes vs one, for daphne (two processes, each with its own listening socket on the same port
            with SO_REUSEPORT, `--fd`, as systemd's `ReusePort=` gives them) and uvicorn (`--workers 2`, one shared
            socket), alternated. Goal: 2 workers >= 1.8x one. The load generator here is not the product and runs on
            the same cores, so it is lean: a raw socket per stream and byte searches instead of httpx and a JSON
            parse per event (`lean_stream`, 0.7 ms of CPU per short stream instead of about 7 ms), the same client
            for one and two workers. Also prints the CPU per stream of the PostgreSQL backends and of a local
            redis-server, each 2-worker server's accept balance (the busiest worker's share of their CPU), and
            checks that a WebSocket handshake and the ASGI lifespan work under uvicorn. Then the capacity model
            beside the measured ratio: S (one worker's CPU per stream) and O (the CPU per stream of everything
            else measured: PostgreSQL, Redis, this client and the fake upstream) give 2S/(S+O), what two workers
            can reach when they share the two cores with all of that; and how many cores the server kept busy and
            how many other processes on the machine took meanwhile (the whole machine's busy time from /proc/stat
            less the processes measured): with another session's work on the cores, the ratio says little.

Every server listens with a backlog of --backlog and gets its soft RLIMIT_NOFILE raised to the hard limit (so does
this client); access logs are off on every server (daphne -v 0, uvicorn --no-access-log, LiteLLM at ERROR).
Standalone: it starts the fake upstreams (tests/fakes/upstream.py: short, slow, long and tool-calling answers),
temporary databases (migrated, with apps and keys), the servers and LiteLLM, and cleans up. CPU time is read from
/proc, so it means something on a loaded machine; wall times and latencies do not. Smoke test:
`.venv/bin/python bench/throughput.py -n 10 --concurrency 20 --slow-streams 50 --long-n 3 --burst 40`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dify_overhead import TOOL, TOOL_ARGUMENTS, drop_postgres, percentile, ttft_dify  # noqa: E402
from bench.openai_overhead import LITELLM_DEFAULT, LITELLM_KEY, litellm_proxy, ttft_completions  # noqa: E402
from tests.e2e.dify_servers import PYTHON, free_port, server_env  # noqa: E402

MS = 1000
SHORT_CHUNKS = 5  # "Hello from the fake upstream." split after each space
APP = "opsagent.asgi:application"

# Runs in the server's checkout (this one or --compare-root): one config per fake upstream, the short one the default,
# and one app per (mode, upstream) with its key.
PROVISION = """
import django, json, sys
django.setup()
from agentcore.models import AgentApp
from difyapi.auth import api_key_create
from llmconfigs.services import llm_config_create, llm_config_set_default
spec = json.loads(sys.argv[1])
configs = {}
for name, url in spec["upstreams"].items():
    configs[name] = llm_config_create(name=f"bench-{name}", provider="openai", model_name=f"fake-{name}",
                                      base_url=url, api_key="sk-bench-key-0000000000000000")
llm_config_set_default(config=configs["short"])
for app in spec["apps"]:
    created = AgentApp.objects.create(name=app["name"], mode=app["mode"], llm_config=configs[app["upstream"]])
    api_key_create(app=created, raw_key=app["key"])
"""
# (name, mode, upstream); keys are fresh per run (a shared Redis cache may still map an earlier run's key).
APPS = [("chat", "chat", "short"), ("agent", "agent-chat", "short"), ("tools", "agent-chat", "tools"),
        ("slow", "chat", "slow"), ("long", "chat", "long")]


# ----- processes: CPU, memory, limits -----

def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (1,000 streams need 2,000+ descriptors: client and upstream sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split())
    return pids


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) `pid` and its live descendants have used so far."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time every core of the machine has spent busy so far (/proc/stat: all but idle and iowait), whoever ran."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def postgres_backends(admin_url: str, database: str) -> list[int]:
    """The PostgreSQL backend processes connected to `database` now (the servers' pools keep theirs open)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                            [database]).fetchall()
    return [pid for (pid,) in rows]


def processes_named(name: str) -> list[int]:
    """Processes whose command name is `name` (e.g. the local redis-server)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                found.append(int(entry.name))
    return found


def rss_mb(pid: int) -> float:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def wait_port(port: int, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{process.args[:4]} did not start:\n{log.read_text(errors='replace')[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


# ----- fake upstreams, databases, servers -----

@contextlib.contextmanager
def fake_upstreams(args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """Four fake upstream processes: short (the default answer, 5 chunks at once), slow (--slow-chunks chunks over
    --slow-seconds), long (--long-chunks one-word chunks at once) and tools (a call to TOOL, then the short answer).
    Yields their base URLs by name."""
    slow_text = " ".join(f"w{i}" for i in range(args.slow_chunks))
    specs = {
        "short": [],
        "slow": ["--text", slow_text, "--delay", str(args.slow_seconds / max(1, args.slow_chunks - 1))],
        "long": ["--text", " ".join(["tok"] * args.long_chunks),
                 *(["--delay", str(args.long_delay)] if args.long_delay else [])],
        "tools": ["--tool-call", TOOL, "--tool-arguments", json.dumps(TOOL_ARGUMENTS)],
    }
    workdir = Path(tempfile.mkdtemp(prefix="tput-upstream-"))
    processes, urls = [], {}
    try:
        for name, extra in specs.items():
            port = free_port()
            log = workdir / f"{name}.log"
            process = subprocess.Popen([PYTHON, "-m", "tests.fakes.upstream", "--port", str(port), *extra], cwd=ROOT,
                                       stdout=log.open("wb"), stderr=subprocess.STDOUT, preexec_fn=raise_nofile)
            processes.append(process)
            wait_port(port, process, 60, log)
            urls[name] = f"http://127.0.0.1:{port}/v1"
        yield urls
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Stack:
    """A checkout (`root`) with its own migrated database holding the bench apps; `keys` by app name."""
    label: str
    root: Path
    env: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def stack(label: str, root: Path, *, database_url: str, redis_url: str, upstreams: dict[str, str]
          ) -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="tput-db-"))
    temp_db = ""
    if database_url:
        base, _, name = database_url.rpartition("/")
        temp_db = f"{name}_tput_{os.getpid()}_{secrets.token_hex(3)}"  # one per stack, beside the one named
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{temp_db}"')
        server_database_url = f"{base}/{temp_db}"
    else:
        server_database_url = f"sqlite:///{workdir / 'bench.sqlite3'}"
    env = server_env(database_url=server_database_url, redis_url=redis_url, LOG_LEVEL="WARNING",
                     MEDIA_ROOT=str(workdir / "media"))
    python = str(root / ".venv" / "bin" / "python") if (root / ".venv" / "bin" / "python").exists() else PYTHON
    env["TPUT_PYTHON"] = python
    result = Stack(label, root, env, {name: f"app-tput-{name}-{secrets.token_hex(12)}" for name, _, _ in APPS})
    try:
        print(f"[{label}] database {server_database_url.split('@')[-1]}: migrating...", flush=True)
        subprocess.run([python, "manage.py", "migrate", "--noinput"], cwd=root, env=env, check=True,
                       capture_output=True, timeout=600)
        spec = {"upstreams": upstreams, "apps": [{"name": f"tput-{name}", "mode": mode, "upstream": upstream,
                                                  "key": result.keys[name]} for name, mode, upstream in APPS]}
        done = subprocess.run([python, "-c", PROVISION, json.dumps(spec)], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"provisioning failed:\n{done.stderr[-3000:]}")
        yield result
    finally:
        if temp_db:
            drop_postgres(database_url, temp_db)
        shutil.rmtree(workdir, ignore_errors=True)


class Server:
    """`kind` (daphne or uvicorn) with `workers` processes serving opsagent.asgi of `stack` on one port of 127.0.0.1.
    Two daphnes share one listening socket this process opens (daphne has no workers option); uvicorn forks its own.
    `nofile`: the soft RLIMIT_NOFILE to start the server with (0: raised to the hard limit)."""

    def __init__(self, stack: Stack, *, kind: str = "daphne", workers: int = 1, backlog: int = 2048, nofile: int = 0):
        self.stack, self.kind, self.workers, self.backlog, self.nofile = stack, kind, workers, backlog, nofile
        self.processes: list[subprocess.Popen] = []
        self.port = 0
        self.log = Path(tempfile.mkstemp(prefix=f"tput-{kind}-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def worker_cpu(self) -> list[float]:
        """CPU seconds of each worker process so far (uvicorn's: the children of its supervisor)."""
        workers = self.pids if self.kind == "daphne" else tree(self.pids[0])[1:]
        return [cpu_seconds(pid) for pid in workers]

    def rss(self) -> float:
        return sum(rss_mb(pid) for pid in self.pids)

    def _limits(self) -> None:
        raise_nofile()
        if self.nofile:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, hard))

    def start(self, timeout: float = 180) -> Server:
        python = self.stack.env["TPUT_PYTHON"]
        log = self.log.open("ab")
        popen = {"cwd": self.stack.root, "env": self.stack.env, "stdout": log, "stderr": subprocess.STDOUT,
                 "preexec_fn": self._limits}
        if self.kind == "daphne" and self.workers == 1:
            self.port = free_port()
            endpoint = f"tcp:port={self.port}:interface=127.0.0.1:backlog={self.backlog}"
            self.processes.append(subprocess.Popen([python, "-m", "daphne", "-v", "0", "-e", endpoint, APP], **popen))
        elif self.kind == "daphne":
            # One listening socket per worker on the same port (SO_REUSEPORT): the kernel spreads the connections
            # over them evenly. Daphnes sharing one socket split a burst unevenly (Twisted accepts up to a hundred
            # connections per wake-up: whichever process wakes first takes most of them).
            for _ in range(self.workers):
                listener = socket.socket()
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                listener.bind(("127.0.0.1", self.port))
                listener.listen(self.backlog)
                self.port = listener.getsockname()[1]
                self.processes.append(subprocess.Popen([python, "-m", "daphne", "-v", "0", "--fd",
                                                        str(listener.fileno()), APP],
                                                       pass_fds=[listener.fileno()], **popen))
                listener.close()  # the worker holds it
        else:
            self.port = free_port()
            self.processes.append(subprocess.Popen(
                [python, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", str(self.port), "--workers",
                 str(self.workers), "--backlog", str(self.backlog), "--no-access-log", "--log-level", "info"],
                **popen))
        try:
            self._wait_ready(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until `GET /health/` answers (any status) and then every process of the server is idle (a shared socket
        accepts connections before each worker has started)."""
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"{self.kind} did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                httpx.get(f"{self.url}/health/", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        while time.monotonic() < deadline:
            before = [cpu_seconds(pid) for pid in tree(self.processes[0].pid) + self.pids[1:]]
            time.sleep(1)
            after = [cpu_seconds(pid) for pid in tree(self.processes[0].pid) + self.pids[1:]]
            if max(b - a for a, b in zip(before, after, strict=False)) < 0.1:
                return

    def stop(self) -> None:
        for process in self.processes:
            stop(process)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def litellm_pid() -> int | None:
    """The LiteLLM proxy this process started (a child whose command line names litellm)."""
    for pid in tree(os.getpid())[1:]:
        with contextlib.suppress(OSError):
            if b"litellm" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    return None


def litellm_executable(args: argparse.Namespace) -> str:
    """LiteLLM's executable; with --install-litellm a missing one is installed into its own venv first."""
    path = Path(args.litellm)
    if not path.exists() and args.install_litellm:
        venv = path.parents[1]
        print(f"installing litellm[proxy] into {venv}...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return str(path) if path.exists() else ""


# ----- the floor for row 4: a plain asyncio proxy loop -----

async def floor_proxy(port: int, upstreams: dict[str, str]) -> None:
    """An HTTP/1.1 server (keep-alive, chunked) that answers any POST by streaming a chat completion from the
    upstream named by the body's `model` ("short" or "long") with httpx and writing one Dify `message` event per
    content delta to its client, then `message_end`: the least a proxy that translates the stream must do."""
    client = httpx.AsyncClient(timeout=120)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                query = json.loads(await reader.readexactly(length)) if length else {}
                upstream = upstreams.get(query.get("model") or "short", upstreams["short"])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": query["query"]}]}
                async with client.stream("POST", f"{upstream}/chat/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        content = choices[0].get("delta", {}).get("content")
                        if content:
                            event = json.dumps({"event": "message", "answer": content}).encode()
                            data = b"data: " + event + b"\n\n"
                            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                            await writer.drain()
                data = b'data: {"event": "message_end"}\n\n'
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def floor_server(upstreams: dict[str, str]) -> Iterator[tuple[str, int]]:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="tput-floor-", suffix=".log")[1])
    process = subprocess.Popen([PYTHON, __file__, "--floor-proxy", str(port), "--floor-upstreams",
                                json.dumps(upstreams)], cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_port(port, process, 60, log)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        stop(process)


# ----- measuring -----

@dataclass
class Side:
    """Something that serves streams: its label, base URL, how to read one (`stream(client)` -> first-token
    seconds) and what to read its CPU from."""
    label: str
    url: str
    stream: object
    cpu: object
    samples: list[float] = field(default_factory=list)


def dify_side(label: str, server: Server, key: str, model: str = "", tool: str = "") -> Side:
    return Side(label, server.url, lambda client: ttft_dify(client, server.url, key, model=model, tool=tool),
                server.cpu)


# Row 5's client: the bench's own CPU shares the two cores with the workers it measures, and httpx's per-stream work
# (about 8 ms of CPU per short stream, as much as half a worker's) capped the two-worker ratio. This reads the same
# response with a raw socket and byte searches; the same client serves the one- and the two-worker runs.
LEAN_FIRST = b'"event":"message",'
LEAN_END = b'"event":"message_end"'
LEAN_ERROR = b'"event":"error"'


def lean_side(label: str, server: Server, key: str) -> Side:
    """A side whose streams are read by `lean_stream` (its `client` argument is unused)."""
    body = json.dumps({"inputs": {}, "query": "hello", "user": "bench", "response_mode": "streaming",
                       "auto_generate_name": False, "conversation_id": ""}).encode()
    request = (f"POST /v1/chat-messages HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
               f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    return Side(label, server.url, lambda client: lean_stream(server.port, request), server.cpu)


async def lean_stream(port: int, request: bytes, timeout: float = 300) -> float:
    """One `/v1/chat-messages` stream over its own connection (`Connection: close`: read to the end of the
    response); returns the seconds to the first `message` event. Raises unless the status is 200 and the stream
    ended with `message_end` and no `error` event."""
    async with asyncio.timeout(timeout):
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            first = None
            received = bytearray()
            while chunk := await reader.read(65536):
                received += chunk
                if first is None and LEAN_FIRST in received:
                    first = time.perf_counter() - started
        finally:
            writer.close()
    if not received.startswith(b"HTTP/1.1 200") or LEAN_ERROR in received or LEAN_END not in received:
        raise RuntimeError(f"bad stream: {bytes(received[:300])!r}")
    if first is None:
        raise RuntimeError("the stream had no answer")
    return first


def litellm_side(url: str, pid: int) -> Side:
    return Side("LiteLLM proxy", url, lambda client: ttft_completions(client, url, LITELLM_KEY, "fake-bench"),
                lambda: cpu_seconds(pid))


async def cpu_per_request(sides: list[Side], n: int, warmup: int = 5) -> list[float]:
    """Each side's server CPU per streamed request in ms: `n` sequential requests per side, interleaved."""
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(warmup):
            for side in sides:
                await side.stream(client)
        totals = [0.0] * len(sides)
        for _ in range(n):
            for i, side in enumerate(sides):
                before = side.cpu()
                await side.stream(client)
                totals[i] += side.cpu() - before
    return [total / n * MS for total in totals]


@dataclass
class Burst:
    ok: list[float]
    errors: list[str]
    wall: float
    rss_before: float = 0.0
    rss_peak: float = 0.0
    open_peak: int = 0


async def burst(side: Side, streams: int, *, rss=None, timeout: float = 300) -> Burst:
    """`streams` concurrent streams on `side`; with `rss` (a callable giving the server's RSS in MB) it is sampled
    every 50 ms, and so is the number of streams open (started, not yet ended): their peaks are reported."""
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    state = {"open": 0, "peak_open": 0, "peak_rss": 0.0}  # the open count only grows until the answers end

    async def one(client: httpx.AsyncClient) -> float:
        state["open"] += 1
        try:
            return await side.stream(client)
        finally:
            state["open"] -= 1

    async def sample() -> None:
        while True:
            state["peak_rss"] = max(state["peak_rss"], rss())
            state["peak_open"] = max(state["peak_open"], state["open"])
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        before = rss() if rss else 0.0
        sampler = asyncio.create_task(sample()) if rss else None
        started = time.perf_counter()
        results = await asyncio.gather(*(one(client) for _ in range(streams)), return_exceptions=True)
        wall = time.perf_counter() - started
        if sampler:
            sampler.cancel()
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [repr(r)[:200] for r in results if isinstance(r, BaseException)]
    return Burst(ok, errors, wall, before, state["peak_rss"], state["peak_open"])


def print_errors(errors: list[str]) -> None:
    for error in sorted(set(errors))[:5]:
        print(f"      error ({errors.count(error)}x): {error}", flush=True)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


# ----- rows -----

def row_cpu(args, backend: str, servers: list[tuple[Stack, Server]], litellm: Side | None) -> None:
    sides = []
    for stack, server in servers:
        sides += [dify_side(f"{stack.label} chat", server, stack.keys["chat"]),
                  dify_side(f"{stack.label} agent-chat", server, stack.keys["agent"]),
                  dify_side(f"{stack.label} agent-tools", server, stack.keys["tools"], tool=TOOL)]
    if litellm:
        sides.append(litellm)
    cpu = asyncio.run(cpu_per_request(sides, args.n))
    print(f"row 1 [{backend}] server CPU per streamed request (short answer, n={args.n} each, interleaved):",
          flush=True)
    for side, ms in zip(sides, cpu, strict=True):
        versus = f"  ({ratio(ms, cpu[-1])} of LiteLLM's)" if litellm and side is not litellm else ""
        print(f"    {side.label:<38} {ms:7.2f} ms{versus}", flush=True)
    if not litellm:
        print(f"    {'LiteLLM proxy':<38} not installed (or did not start)", flush=True)
    if len(servers) > 1:
        for mode, offset in (("chat", 0), ("agent-chat", 1), ("agent-tools", 2)):
            now, then = cpu[offset], cpu[3 + offset]
            verdict = "met" if now <= then / 2 else "MISSED"
            print(f"    goal {mode}: at most half of {servers[1][0].label}'s: {ratio(now, then)} ({verdict})",
                  flush=True)


def row_burst(args, backend: str, server: Server, stack: Stack, litellm: Side | None) -> None:
    sides = [dify_side("OpsAgent chat", server, stack.keys["chat"])] + ([litellm] if litellm else [])
    print(f"row 2 [{backend}] {args.concurrency} concurrent streams on one worker ({args.reps} burst(s) each, "
          "alternating):", flush=True)
    results: dict[str, list[Burst]] = {side.label: [] for side in sides}
    for _ in range(args.reps):
        for side in sides:
            results[side.label].append(asyncio.run(burst(side, args.concurrency)))
    p50s = {}
    for side in sides:
        runs = results[side.label]
        ok = [v for run in runs for v in run.ok]
        errors = [e for run in runs for e in run.errors]
        wall = statistics.median(run.wall for run in runs)
        p50s[side.label] = statistics.median(ok) * MS if ok else float("inf")
        p95 = percentile(ok, 95) * MS if ok else float("inf")
        print(f"    {side.label:<28} first token p50 {p50s[side.label]:8.1f} ms  p95 {p95:8.1f} ms | burst wall "
              f"{wall:6.2f} s | errors {len(errors)}", flush=True)
        print_errors(errors)
    if litellm:
        ours, theirs = p50s["OpsAgent chat"], p50s[litellm.label]
        print(f"    goal: p50 below LiteLLM's: {ratio(ours, theirs)} of it "
              f"({'met' if ours < theirs else 'MISSED'})", flush=True)
    else:
        print(f"    {'LiteLLM proxy':<38} not installed (or did not start)", flush=True)


def row_slow(args, backend: str, server: Server, stack: Stack) -> None:
    side = dify_side("OpsAgent chat (slow upstream)", server, stack.keys["slow"])
    asyncio.run(burst(side, 5))  # warm-up
    result = asyncio.run(burst(side, args.slow_streams, rss=server.rss))
    per_stream = (result.rss_peak - result.rss_before) / result.open_peak * 1024 if result.open_peak else 0.0
    ok = result.ok
    print(f"row 3 [{backend}] {args.slow_streams} concurrent streams, one worker, {args.slow_chunks} chunks over "
          f"{args.slow_seconds:g} s each:", flush=True)
    print(f"    errors {len(result.errors)} ({'met' if not result.errors else 'MISSED'}: goal 0) | wall "
          f"{result.wall:.2f} s | first token p50 {statistics.median(ok) * MS if ok else 0:.0f} ms "
          f"p95 {percentile(ok, 95) * MS if ok else 0:.0f} ms", flush=True)
    print(f"    server RSS before {result.rss_before:.0f} MB, peak {result.rss_peak:.0f} MB with "
          f"{result.open_peak} streams open: {per_stream:.0f} KB per open stream", flush=True)
    print_errors(result.errors)


def row_chunks(args, backend: str, servers: list[tuple[Stack, Server]], floor: tuple[str, int]) -> None:
    floor_url, floor_pid = floor
    short_sides, long_sides = [], []
    for stack, server in servers:
        short_sides.append(dify_side(f"{stack.label} /v1/chat-messages", server, stack.keys["chat"]))
        long_sides.append(dify_side(f"{stack.label} /v1/chat-messages", server, stack.keys["long"]))
    floor_cpu = lambda: cpu_seconds(floor_pid)  # noqa: E731
    short_sides.append(Side("floor proxy loop", floor_url,
                            lambda client: ttft_dify(client, floor_url, "none", model="short"), floor_cpu))
    long_sides.append(Side("floor proxy loop", floor_url,
                           lambda client: ttft_dify(client, floor_url, "none", model="long"), floor_cpu))
    short = asyncio.run(cpu_per_request(short_sides, args.long_n, warmup=2))
    long = asyncio.run(cpu_per_request(long_sides, args.long_n, warmup=2))
    chunks = args.long_chunks - SHORT_CHUNKS
    per_k = [(lo - sh) / chunks * 1000 for lo, sh in zip(long, short, strict=True)]
    spacing = f"{args.long_delay * 1000:g} ms apart" if args.long_delay else "back to back"
    print(f"row 4 [{backend}] CPU per 1,000 streamed chunks (answers of {args.long_chunks} chunks {spacing} "
          f"vs {SHORT_CHUNKS} chunks, "
          f"n={args.long_n} each, interleaved):", flush=True)
    for side, lo, per in zip(long_sides, long, per_k, strict=True):
        print(f"    {side.label:<34} {per:8.1f} ms per 1,000 chunks ({lo:.0f} ms per long answer)"
              + ("" if side is long_sides[-1] else f"  {ratio(per, per_k[-1])} of the floor"), flush=True)
    print(f"    goal: at most 1.5x the floor: {ratio(per_k[0], per_k[-1])} "
          f"({'met' if per_k[0] <= 1.5 * per_k[-1] else 'MISSED'})", flush=True)


async def websocket_check(url: str) -> str:
    """A WebSocket handshake to the agent socket without credentials: Channels must answer it (accept and close, or
    refuse with 403), not the server with a 404/500 or an 'unsupported upgrade'."""
    import websockets

    target = url.replace("http://", "ws://") + f"/ws/agent/sessions/{'0' * 8}-0000-0000-0000-{'0' * 12}/"
    try:
        async with websockets.connect(target, open_timeout=10) as ws:
            with contextlib.suppress(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return f"handshake accepted by Channels, then closed with code {ws.close_code}"
    except websockets.InvalidStatus as error:
        status = error.response.status_code
        return f"refused with HTTP {status}" + (" (Channels' refusal: works)" if status == 403 else " (BROKEN?)")
    except Exception as error:  # noqa: BLE001
        return f"failed: {error!r}"


def row_workers(args, stack_: Stack) -> None:
    kinds = [k for k in args.worker_servers.split(",") if k]
    servers = {(kind, workers): Server(stack_, kind=kind, workers=workers, backlog=args.backlog)
               for kind in kinds for workers in (1, 2)}
    with contextlib.ExitStack() as exits:
        for server in servers.values():
            exits.enter_context(server)
        sides = {key: lean_side(f"{key[0]} x{key[1]}", server, stack_.keys["chat"])
                 for key, server in servers.items()}
        for side in sides.values():  # warm-up: every worker process of each server
            asyncio.run(burst(side, 20))
        rates: dict[tuple[str, int], list[float]] = {key: [] for key in servers}
        errors: dict[tuple[str, int], list[str]] = {key: [] for key in servers}
        server_cpu: dict[tuple[str, int], float] = dict.fromkeys(servers, 0.0)
        busiest: dict[tuple[str, int], list[float]] = {key: [] for key in servers}  # its share of the workers' CPU
        bench_cpu: dict[tuple[str, int], float] = dict.fromkeys(servers, 0.0)  # this client and the fake upstream
        upstream = [pid for pid in tree(os.getpid())[1:]
                    if b"tests.fakes.upstream" in Path(f"/proc/{pid}/cmdline").read_bytes()]

        def bench_seconds() -> float:
            own = resource.getrusage(resource.RUSAGE_SELF)
            return own.ru_utime + own.ru_stime + sum(cpu_seconds(pid) for pid in upstream)

        # The other processes a stream costs CPU in, on the same cores: the PostgreSQL backends of the stack's
        # database and the local Redis server (shared with whatever else uses it).
        database = stack_.env["DATABASE_URL"].rpartition("/")[2]
        local = any(host in args.redis_url for host in ("127.0.0.1", "localhost"))
        redis = processes_named("redis-server") if local else []
        store_cpu: dict[tuple[str, int], list[float]] = {key: [0.0, 0.0] for key in servers}  # postgres, redis
        # The whole machine's busy CPU and the bursts' wall time: what is left after the processes above is what
        # other processes (another session's tests, the kernel's own threads) took from the same cores meanwhile.
        machine_cpu: dict[tuple[str, int], float] = dict.fromkeys(servers, 0.0)
        walls: dict[tuple[str, int], float] = dict.fromkeys(servers, 0.0)

        for _ in range(args.reps):
            for key, side in sides.items():
                before, bench_before = side.cpu(), bench_seconds()
                workers_before = servers[key].worker_cpu()
                backends = postgres_backends(args.database_url, database)
                stores_before = [sum(map(cpu_seconds, backends)), sum(map(cpu_seconds, redis))]
                machine_before = machine_busy_seconds()
                result = asyncio.run(burst(side, args.burst))
                machine_cpu[key] += machine_busy_seconds() - machine_before
                walls[key] += result.wall
                for i, pids in enumerate((backends, redis)):
                    store_cpu[key][i] += sum(map(cpu_seconds, pids)) - stores_before[i]
                server_cpu[key] += side.cpu() - before
                spent = [after - was for was, after in zip(workers_before, servers[key].worker_cpu(), strict=False)]
                busiest[key].append(max(spent) / sum(spent) if sum(spent) else 0.0)
                bench_cpu[key] += bench_seconds() - bench_before
                rates[key].append(len(result.ok) / result.wall)
                errors[key] += result.errors
        print(f"row 5 [postgresql+redis] streams per second, a burst of {args.burst} concurrent short streams "
              f"({args.reps} each, alternating; median):", flush=True)
        streams = args.burst * args.reps
        for kind in kinds:
            one, two = statistics.median(rates[(kind, 1)]), statistics.median(rates[(kind, 2)])
            print(f"    {kind:<8} 1 worker {one:7.1f}/s  2 workers {two:7.1f}/s  ratio {ratio(two, one)} "
                  f"({'met' if two >= 1.8 * one else 'MISSED'}: goal 1.8x) | errors "
                  f"{len(errors[(kind, 1)])} / {len(errors[(kind, 2)])}", flush=True)
            print(f"    {'':<8} server CPU per stream {server_cpu[(kind, 1)] / streams * MS:.1f} / "
                  f"{server_cpu[(kind, 2)] / streams * MS:.1f} ms; this client + the fake upstream "
                  f"{bench_cpu[(kind, 1)] / streams * MS:.1f} / {bench_cpu[(kind, 2)] / streams * MS:.1f} ms per "
                  "stream (on the same cores)", flush=True)
            print(f"    {'':<8} PostgreSQL backends {store_cpu[(kind, 1)][0] / streams * MS:.1f} / "
                  f"{store_cpu[(kind, 2)][0] / streams * MS:.1f} ms, redis-server "
                  f"{store_cpu[(kind, 1)][1] / streams * MS:.1f} / {store_cpu[(kind, 2)][1] / streams * MS:.1f} ms "
                  "per stream" + ("" if redis else " (not local: not measured)"), flush=True)
            print(f"    {'':<8} 2 workers: the busiest one's share of their CPU "
                  + " / ".join(f"{share:.0%}" for share in busiest[(kind, 2)]) + " (even: 50%)", flush=True)
            # The capacity model (docs/benchmarks.md): one worker is bound by its core (1/S streams per second while
            # the rest, O, fits on the other core); two share both cores with everything else (2/(S + O)).
            s1, s2 = (server_cpu[(kind, w)] / streams for w in (1, 2))
            o = sum(store_cpu[(kind, 2)]) / streams + bench_cpu[(kind, 2)] / streams
            others = [(machine_cpu[(kind, w)] - server_cpu[(kind, w)] - sum(store_cpu[(kind, w)])
                       - bench_cpu[(kind, w)]) / walls[(kind, w)] for w in (1, 2)]
            busy = [server_cpu[(kind, w)] / walls[(kind, w)] for w in (1, 2)]
            print(f"    {'':<8} model: S {s1 * MS:.1f} ms (1 worker), O {o * MS:.1f} ms (PostgreSQL + Redis + client + "
                  f"upstream) -> 2S/(S+O) = {2 * s1 / (s1 + o):.2f}x; with the 2-worker S {s2 * MS:.1f} ms: "
                  f"{2 * s1 / (s2 + o):.2f}x; cores busy in the server {busy[0]:.2f} / {busy[1]:.2f}; other "
                  f"processes on the machine {others[0]:.2f} / {others[1]:.2f} cores", flush=True)
            # The same model with the cores the other processes left: one worker gets at most its core, and the
            # cores left must also carry O; two workers share what is left.
            one = min(1 / s1, (2 - others[0]) / (s1 + o))
            two = (2 - others[1]) / (s2 + o)
            print(f"    {'':<8} model with the cores the other processes left: 1 worker {one:.1f}/s, 2 workers "
                  f"{two:.1f}/s, ratio {two / one:.2f}x (measured {statistics.mean(rates[(kind, 1)]):.1f}/s, "
                  f"{statistics.mean(rates[(kind, 2)]):.1f}/s on average)", flush=True)
            print_errors(errors[(kind, 1)] + errors[(kind, 2)])
        if "uvicorn" in kinds:
            server = servers[("uvicorn", 2)]
            print(f"    uvicorn x2 WebSocket: {asyncio.run(websocket_check(server.url))}", flush=True)
            log = server.log.read_text(errors="replace")
            if "Application startup failed" in log:
                lifespan = "startup FAILED"
            elif "'lifespan' protocol appears unsupported" in log:
                lifespan = "not supported by Channels' router: uvicorn says so once per worker and serves on " \
                           "(--lifespan off silences it)"
            else:
                lifespan = "no complaint"
            print(f"    uvicorn x2 lifespan: {lifespan}", flush=True)


# ----- main -----

def run_backend(args, backend: str, upstreams: dict[str, str], litellm_url: str | None) -> None:
    database_url = args.database_url if backend != "sqlite" else ""
    redis_url = args.redis_url if backend != "sqlite" else ""
    roots = [("this", ROOT)] + ([("compare", Path(args.compare_root).resolve())] if args.compare_root else [])
    rows = set(args.rows.split(","))
    with contextlib.ExitStack() as exits:
        stacks = [exits.enter_context(stack(label if label == "this" else f"compare {root.name}", root,
                                            database_url=database_url, redis_url=redis_url, upstreams=upstreams))
                  for label, root in roots]
        one_worker = rows & {"1", "2", "3", "4"}
        servers = [(s, exits.enter_context(Server(s, backlog=args.backlog, nofile=args.server_nofile)))
                   for s in stacks] if one_worker else []
        pid = litellm_pid() if litellm_url else None
        litellm = litellm_side(litellm_url, pid) if litellm_url and pid else None
        if "1" in rows:
            row_cpu(args, backend, servers, litellm)
        if "2" in rows:
            row_burst(args, backend, servers[0][1], stacks[0], litellm)
        if "3" in rows:
            row_slow(args, backend, servers[0][1], stacks[0])
        if "4" in rows:
            with floor_server(upstreams) as floor:
                row_chunks(args, backend, servers, floor)
        if "5" in rows and backend != "sqlite":
            for _, server in servers:
                server.stop()  # the one-worker rows are done: leave the cores to row 5
            row_workers(args, stacks[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,5", help="which rows (see the docstring)")
    parser.add_argument("-n", type=int, default=100, help="row 1: sequential requests per side")
    parser.add_argument("--concurrency", type=int, default=100, help="row 2: concurrent streams")
    parser.add_argument("--reps", type=int, default=3, help="rows 2 and 5: bursts per side")
    parser.add_argument("--slow-streams", type=int, default=1000, help="row 3: concurrent streams")
    parser.add_argument("--slow-seconds", type=float, default=2.0, help="row 3: how long an answer takes")
    parser.add_argument("--slow-chunks", type=int, default=20, help="row 3: chunks per answer")
    parser.add_argument("--long-chunks", type=int, default=2000, help="row 4: chunks of a long answer")
    parser.add_argument("--long-delay", type=float, default=0.0,
                        help="row 4: seconds between the long answer's chunks (0: back to back)")
    parser.add_argument("--long-n", type=int, default=10, help="row 4: long (and short) answers per side")
    parser.add_argument("--burst", type=int, default=200, help="row 5: concurrent streams per burst")
    parser.add_argument("--worker-servers", default="daphne,uvicorn", help="row 5: servers to compare")
    parser.add_argument("--backlog", type=int, default=2048, help="every server's listen backlog")
    parser.add_argument("--server-nofile", type=int, default=0,
                        help="start the one-worker servers with this soft RLIMIT_NOFILE (0: the hard limit)")
    parser.add_argument("--database-url", default="",
                        help="a PostgreSQL server: rows 1-4 run on it too (temporary databases), and row 5")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--compare-root", default="",
                        help="another checkout (e.g. main at the issue's filing time): rows 1 and 4 run it too")
    parser.add_argument("--litellm", default=LITELLM_DEFAULT, help="LiteLLM's `litellm` executable (its own venv)")
    parser.add_argument("--install-litellm", action="store_true",
                        help="create LiteLLM's venv and pip-install litellm[proxy] when --litellm is missing")
    parser.add_argument("--floor-proxy", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--floor-upstreams", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Stopped (`timeout`, kill): exit through the context managers, which stop the servers and drop the databases.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_nofile()
    if args.floor_proxy:
        asyncio.run(floor_proxy(args.floor_proxy, json.loads(args.floor_upstreams)))
        return 0
    one_worker_rows = {"1", "2", "3", "4"} & set(args.rows.split(","))
    backends = (["sqlite"] if one_worker_rows else []) + (["postgresql+redis"] if args.database_url else [])
    if "5" in args.rows.split(",") and not args.database_url:
        print("row 5 needs --database-url (PostgreSQL + Redis): skipped", flush=True)
    executable = litellm_executable(args) if {"1", "2"} & set(args.rows.split(",")) else ""
    with fake_upstreams(args) as upstreams:
        with litellm_proxy(executable, upstreams["short"]) as litellm_url:
            for backend in backends:
                run_backend(args, backend, upstreams, litellm_url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
