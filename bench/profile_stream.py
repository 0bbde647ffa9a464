"""Profile: where the server's CPU goes while it streams /v1/chat-messages (chat, agent-chat, or agent-tools: an
agent-chat turn that calls a tool, then answers) or, with `--surface openai`, POST /v1/chat/completions (a pool of
one), sampled with py-spy.

Standalone like bench/dify_overhead.py (fake upstream, temporary database, daphne). py-spy samples the daphne process
(only the thread holding the GIL: where the CPU goes) while `-n` streamed requests run one after another (or
`--concurrency` at a time); then this prints the server's CPU per request, the functions with the most samples on top
of the stack (self) and the packages with the most samples anywhere in the stack (inclusive). The raw collapsed stacks
are kept (--out) for a flame graph. `--cpu-only` measures the CPU per request without sampling.
Run: `.venv/bin/python bench/profile_stream.py [--surface dify|openai] [--mode chat|agent-chat|agent-tools] [-n 300]
[--concurrency 1] [--rate 250]`.
py-spy needs ptrace rights over daphne (a child of this script: fine as root or with ptrace_scope 0).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dify_overhead import TOOL, bench_server, cpu_seconds, ttft_dify  # noqa: E402
from bench.openai_overhead import MODEL, ttft_completions  # noqa: E402

PROJECT = {"agentcore", "difyapi", "llmconfigs", "opsagent"}
KEY = f"app-profile-{secrets.token_hex(12)}"


async def drive(base: str, n: int, concurrency: int, surface: str = "dify", mode: str = "chat") -> None:
    async def one(client: httpx.AsyncClient) -> None:
        if surface == "openai":
            await ttft_completions(client, base, KEY, MODEL)
        else:
            await ttft_dify(client, base, KEY, tool=TOOL if mode == "agent-tools" else "")

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency + 5)) as client:
        for _ in range(5):
            await one(client)
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one(client)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def summarize(collapsed: Path, top: int) -> None:
    self_samples: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        self_samples[frames[-1]] += samples
        seen = set()
        for frame in frames[1:]:  # the first names the thread
            # "function (package/module.py:line)": the top package (two levels for the project's own apps)
            parts = frame.rpartition("(")[2].rpartition(":")[0].split("/")
            module = "/".join(parts[:2]) if parts[0] in PROJECT else parts[0] if len(parts) > 1 else "(stdlib)"
            if module not in seen:
                seen.add(module)
                inclusive[module] += samples
    print(f"{total} samples")
    print(f"\ntop {top} functions by self samples:")
    for frame, samples in self_samples.most_common(top):
        print(f"  {samples / total:6.1%}  {frame[:150]}")
    print(f"\ntop {top} modules by inclusive samples:")
    for module, samples in inclusive.most_common(top):
        print(f"  {samples / total:6.1%}  {module}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--surface", choices=["dify", "openai"], default="dify",
                        help="/v1/chat-messages, or /v1/chat/completions through the app's pool of one")
    parser.add_argument("--mode", choices=["chat", "agent-chat", "agent-tools"], default="chat")
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--cpu-only", action="store_true", help="measure the server's CPU per request, no sampling")
    parser.add_argument("--out", default=str(ROOT / "bench" / "profile.collapsed"))
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with bench_server(database_url=args.database_url, redis_url=args.redis_url,
                      apps=[("profile", args.mode, KEY)]) as (server, _env, _upstream):
        asyncio.run(drive(server.url, 10, 1, args.surface, args.mode))  # warm-up before sampling
        out = Path(args.out)
        spy = None
        if not args.cpu_only:
            spy = subprocess.Popen([py_spy, "record", "--pid", str(server.process.pid), "--rate", str(args.rate),
                                    "--format", "raw", "--output", str(out), "--nonblocking", "--gil"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        before = cpu_seconds(server.process.pid)
        try:
            asyncio.run(drive(server.url, args.n, args.concurrency, args.surface, args.mode))
        finally:
            cpu = cpu_seconds(server.process.pid) - before
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)
    what = "openai, pool of one" if args.surface == "openai" else args.mode
    print(f"server CPU per streamed request ({what}, concurrency {args.concurrency}): "
          f"{cpu / args.n * 1000:.2f} ms{'' if args.cpu_only else ' (py-spy attached)'}")
    if args.cpu_only:
        return 0
    summarize(out, args.top)
    print(f"\ncollapsed stacks: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
