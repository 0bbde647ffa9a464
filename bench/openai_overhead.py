"""Benchmark: time to first token through POST /v1/chat/completions (streaming, daphne, a pool of one) vs. straight
to the same fake upstream, with the Dify surface's /v1/chat-messages of the same run for scale, and, side by side in
the same run, through LiteLLM's proxy to that upstream when it is installed (in its own virtualenv: `python -m venv
/tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'`; never in the project's). The sides are
interleaved, so drift affects them alike.

Standalone: it starts the fake upstream, a temporary database (SQLite unless --database-url is given) with an app,
its key and a config, daphne, and LiteLLM. Run: `.venv/bin/python bench/openai_overhead.py [-n 100]
[--litellm /tmp/litellm-venv/bin/litellm] [--database-url postgres://...]`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
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

from bench.dify_overhead import bench_server, cpu_seconds, percentile, ttft_dify, ttft_direct  # noqa: E402
from tests.e2e.dify_servers import free_port  # noqa: E402

KEY = f"app-bench-openai-{secrets.token_hex(12)}"
MODEL = "fake-e2e"  # the route of the config bench_server provisions: a pool of one
GOAL_P50_MS = 3.0
LITELLM_DEFAULT = "/tmp/litellm-venv/bin/litellm"
LITELLM_KEY = f"sk-bench-{secrets.token_hex(16)}"  # its proxy refuses to start without a master key


async def ttft_completions(client: httpx.AsyncClient, url: str, key: str, model: str) -> float:
    """First content delta of a streamed chat completion at `url` (OpsAgent's or LiteLLM's); the rest of the stream
    is read to its [DONE]."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    started = time.perf_counter()
    first = None
    done = False
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {") and first is None:
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - started
    if first is None or not done:
        raise RuntimeError("the stream had no content or no [DONE]")
    return first


@contextlib.contextmanager
def litellm_proxy(executable: str, upstream_url: str) -> Iterator[str | None]:
    """LiteLLM's proxy with one model (`fake-bench`, openai-compatible, at the fake upstream), or None when it is not
    installed or does not start."""
    if not executable or not Path(executable).exists():
        yield None
        return
    workdir = Path(tempfile.mkdtemp(prefix="litellm-bench-"))
    config = workdir / "config.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: fake-bench\n"
        "    litellm_params:\n"
        "      model: openai/fake-bench\n"
        f"      api_base: {upstream_url}\n"
        "      api_key: sk-bench\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  telemetry: false\n"
    )
    port = free_port()
    log = (workdir / "litellm.log").open("wb")
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "NO_DOCS": "True",
           "LITELLM_MASTER_KEY": LITELLM_KEY}
    process = subprocess.Popen([executable, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                                "--num_workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/health/liveliness", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            print("LiteLLM did not start:\n" + (workdir / "litellm.log").read_text(errors="replace")[-3000:],
                  flush=True)
            yield None
            return
        print(f"LiteLLM proxy on {url}", flush=True)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


async def measure(base: str, upstream: str, litellm: str | None, n: int, server_pid: int) -> dict[str, list[float]]:
    sides: dict[str, list[float]] = {"direct": [], "opsagent": [], "dify": [], "litellm": []}
    cpu = 0.0
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(10):  # warm-up: connections, caches, imports
            await ttft_direct(client, upstream)
            await ttft_completions(client, base, KEY, MODEL)
            if litellm:
                await ttft_completions(client, litellm, LITELLM_KEY, "fake-bench")
        for _ in range(n):
            sides["direct"].append(await ttft_direct(client, upstream))
            before = cpu_seconds(server_pid)
            sides["opsagent"].append(await ttft_completions(client, base, KEY, MODEL))
            cpu += cpu_seconds(server_pid) - before
            sides["dify"].append(await ttft_dify(client, base, KEY))  # the same day's Dify surface, for scale
            if litellm:
                sides["litellm"].append(await ttft_completions(client, litellm, LITELLM_KEY, "fake-bench"))
    sides["cpu_ms"] = [cpu / n * 1000]
    return sides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100, help="interleaved requests per side")
    parser.add_argument("--litellm", default=LITELLM_DEFAULT, help="LiteLLM's `litellm` executable (its own venv)")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--redis-url", default="")
    args = parser.parse_args()
    with bench_server(database_url=args.database_url, redis_url=args.redis_url,
                      apps=[("bench-openai", "chat", KEY)]) as (server, _env, upstream_url):
        with litellm_proxy(args.litellm, upstream_url) as litellm:
            sides = asyncio.run(measure(server.url, upstream_url, litellm, args.n, server.process.pid))
    ms = 1000
    direct_p50 = statistics.median(sides["direct"]) * ms
    direct_p99 = percentile(sides["direct"], 99) * ms
    print(f"{'direct to the upstream':<34} p50 {direct_p50:7.2f} ms  p99 {direct_p99:7.2f} ms", flush=True)
    overheads = {}
    for name, label in (("opsagent", "OpsAgent /v1/chat/completions"), ("dify", "OpsAgent /v1/chat-messages"),
                        ("litellm", "LiteLLM proxy")):
        if not sides[name]:
            print(f"{label:<34} not installed (or did not start)", flush=True)
            continue
        p50, p99 = statistics.median(sides[name]) * ms, percentile(sides[name], 99) * ms
        overheads[name] = p50 - direct_p50
        print(f"{label:<34} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms | overhead p50 {p50 - direct_p50:+7.2f} ms  "
              f"p99 {p99 - direct_p99:+7.2f} ms", flush=True)
    print(f"OpsAgent server CPU per streamed request (whole stream, all threads): {sides['cpu_ms'][0]:.1f} ms",
          flush=True)
    verdict = "met" if overheads["opsagent"] < GOAL_P50_MS else "MISSED"
    line = f"goal: OpsAgent overhead p50 < {GOAL_P50_MS:g} ms ({verdict})"
    if "litellm" in overheads:
        ratio_met = overheads["opsagent"] < overheads["litellm"] / 3
        line += f"; < 1/3 of LiteLLM's ({'met' if ratio_met else 'MISSED'}: " \
                f"{overheads['opsagent']:.2f} vs {overheads['litellm']:.2f} ms)"
    else:
        line += "; LiteLLM side by side: not installed (or did not start)"
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
