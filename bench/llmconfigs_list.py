"""Benchmark of GET /api/llm-configs/ with 1,000 configs: prints p50/p95 latency (goal: p50 < 50 ms).

Standalone: `.venv/bin/python bench/llmconfigs_list.py [--configs 1000] [--runs 50]`. Uses a throwaway SQLite file, or
a throwaway test database on the server of DATABASE_URL (e.g. PostgreSQL). Requests go through the whole Django stack
(middleware, token authentication, DRF, pagination, JSON rendering) with the Django test client."""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
_TEMP_DIR = None
if not os.environ.get("DATABASE_URL"):
    _TEMP_DIR = tempfile.TemporaryDirectory(prefix="opsagent-bench-")
    os.environ["DATABASE_URL"] = f"sqlite:///{_TEMP_DIR.name}/bench.sqlite3"

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import setup_test_environment  # noqa: E402


def _populate(count: int) -> str:
    """`count` configs (written in bulk: the benchmark measures reads) and a token for a plain user."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from llmconfigs.models import LLMConfig
    from llmconfigs.providers import PROVIDERS
    from llmconfigs.secrets import mask_secret

    providers = [key for key, spec in PROVIDERS.items() if spec.default_base_url]
    configs = []
    for i in range(count):
        key = f"sk-bench-{i:05d}-0123456789abcdef"
        configs.append(LLMConfig(
            name=f"bench-{i:05d}", provider=providers[i % len(providers)], model_name=f"model-{i % 37}",
            api_key=key, api_key_mask=mask_secret(key), temperature=0.5, top_p=0.5, description="benchmark config",
            is_active=i % 5 != 0,
        ))
    LLMConfig.objects.bulk_create(configs, batch_size=500)
    user = get_user_model().objects.create_user(username="bench", password="bench-pw-123")
    return Token.objects.create(user=user).key


def _measure(client: Client, url: str, token: str, runs: int) -> tuple[list[float], list[float]]:
    """Wall-clock and this process's CPU milliseconds per request (CPU time shows the cost on a busy machine too)."""
    for _ in range(3):  # warm-up: imports, caches, the database's page cache
        assert client.get(url, HTTP_AUTHORIZATION=f"Token {token}").status_code == 200
    wall, cpu = [], []
    for _ in range(runs):
        started, started_cpu = time.perf_counter(), time.process_time()
        response = client.get(url, HTTP_AUTHORIZATION=f"Token {token}")
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
        assert response.status_code == 200
    return wall, cpu


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    setup_test_environment()
    # One log line per request would measure the console, not the endpoint.
    logging.getLogger("opsagent.requests").setLevel(logging.ERROR)
    test_db = None
    if _TEMP_DIR is None:
        test_db = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    else:
        call_command("migrate", verbosity=0)
    try:
        token = _populate(args.configs)
        client = Client()
        print(f"{args.configs} configs on {connection.vendor}, {args.runs} runs each")
        failed = False
        pages = (("page_size=1000", "/api/llm-configs/?page_size=1000"), ("default page", "/api/llm-configs/"))
        for label, url in pages:
            timings, cpu = _measure(client, url, token, args.runs)
            p50, p95 = statistics.median(timings), _percentile(timings, 95)
            print(f"GET {url:<36} p50 {p50:7.1f} ms   p95 {p95:7.1f} ms   cpu p50 {statistics.median(cpu):6.1f} ms"
                  f"   ({label})")
            failed |= label == "page_size=1000" and p50 >= 50
        print("goal p50 < 50 ms for 1,000 configs:", "missed" if failed else "met")
        return 0
    finally:
        if test_db is not None:
            connection.creation.destroy_test_db(test_db, verbosity=0)
        if _TEMP_DIR is not None:
            _TEMP_DIR.cleanup()


if __name__ == "__main__":
    sys.exit(main())
