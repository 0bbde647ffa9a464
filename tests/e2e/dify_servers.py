"""Test harness for the Dify API: an in-process ASGI client that reads a response as it streams, a strict SSE parser,
app/key provisioning, and real daphne subprocesses (for end-to-end tests and bench/dify_overhead.py)."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable


# ----- strict SSE -----

def parse_sse(raw: bytes) -> list[dict[str, Any] | str]:
    """Split a Dify event stream on blank lines, strictly: every block is exactly `event: ping` (returned as "ping")
    or exactly one `data: <one-line JSON object>` line (returned as the dict). Anything else fails the test."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-80:]!r}"
    blocks = text[:-2].split("\n\n")
    parsed: list[dict[str, Any] | str] = []
    for block in blocks:
        assert "\n" not in block, f"an SSE block has more than one line: {block!r}"
        if block == "event: ping":
            parsed.append("ping")
            continue
        assert block.startswith("data: "), f"unexpected SSE block: {block!r}"
        data = json.loads(block[len("data: "):])
        assert isinstance(data, dict), block
        parsed.append(data)
    return parsed


def data_events(raw: bytes) -> list[dict[str, Any]]:
    return [event for event in parse_sse(raw) if isinstance(event, dict)]


# ----- in-process ASGI client -----

class AsgiCall:
    """One HTTP request to an ASGI app in this process, whose response is read message by message as it is sent."""

    def __init__(self, application, *, method: str = "POST", path: str, headers: dict[str, str] | None = None,
                 body: bytes = b""):
        self.application = application
        path, _, query = path.partition("?")
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        self.body = body
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.finished = False

    async def __aenter__(self) -> AsgiCall:
        self.task = asyncio.create_task(self.application(self.scope, self.inbox.get, self.outbox.put))
        await self.inbox.put({"type": "http.request", "body": self.body, "more_body": False})
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.disconnect()

    async def _next(self, timeout: float) -> dict[str, Any]:
        getter = asyncio.ensure_future(self.outbox.get())
        done, _ = await asyncio.wait({getter, self.task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self.task in done:
            self.task.result()  # re-raises an application crash
            raise AssertionError("the application ended without completing the response")
        raise TimeoutError(f"no ASGI message within {timeout}s")

    async def start(self, timeout: float = 10) -> int:
        message = await self._next(timeout)
        assert message["type"] == "http.response.start", message
        self.status = message["status"]
        self.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        return self.status

    async def chunk(self, timeout: float = 10) -> bytes:
        """The next body message (b"" and `finished` once the response is complete)."""
        message = await self._next(timeout)
        assert message["type"] == "http.response.body", message
        if not message.get("more_body", False):
            self.finished = True
        return message.get("body", b"")

    async def read(self, timeout: float = 20) -> bytes:
        if self.status is None:
            await self.start(timeout)
        parts = []
        deadline = time.monotonic() + timeout
        while not self.finished:
            parts.append(await self.chunk(max(0.1, deadline - time.monotonic())))
        return b"".join(parts)

    async def disconnect(self, timeout: float = 10) -> None:
        if self.task is None or self.task.done():
            return
        await self.inbox.put({"type": "http.disconnect"})
        await asyncio.wait_for(self.task, timeout)

    def json(self, raw: bytes) -> Any:
        return json.loads(raw)


def dify_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def dify_call(key: str, path: str, *, method: str = "GET", body: bytes = b"") -> AsgiCall:
    """A request to the project's ASGI application with the key's headers, read as it streams (`async with`)."""
    from opsagent.asgi import application

    return AsgiCall(application, method=method, path=path, headers=dify_headers(key), body=body)


async def dify_post(key: str, path: str, payload: Any, *, timeout: float = 20,
                    headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """POST to the project's ASGI application and read the whole response (`headers` added to the key's)."""
    from opsagent.asgi import application

    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with AsgiCall(application, path=path, headers={**dify_headers(key), **(headers or {})}, body=body) as call:
        raw = await call.read(timeout)
        return call.status, call.headers, raw


# ----- provisioning -----

def provision_app(*, name: str, mode: str, upstream_url: str, key: str, config_name: str = "", **app_fields: Any
                  ) -> dict[str, str]:
    """An app with `key`, answering through a default chat config that points at `upstream_url` (idempotent); with
    `config_name`, through its own config of that name pointing at `upstream_url` instead, serving a pool (route) of
    that name: under the default config's model name it would join the default pool, and the default's apps would
    be answered by its upstream too."""
    from agentcore.models import AgentApp
    from difyapi.auth import api_key_create
    from llmconfigs.models import LLMConfig
    from llmconfigs.services import llm_config_create, llm_config_set_default

    config = LLMConfig.objects.filter(name=config_name or "dify-e2e").first()
    if config is None:
        config = llm_config_create(name=config_name or "dify-e2e", provider="openai", model_name="fake-e2e",
                                   route=config_name, base_url=upstream_url, api_key="sk-e2e-test-key-0000000000")
        if not config_name:
            config = llm_config_set_default(config=config)
    if config_name:
        app_fields["llm_config"] = config
    app, _ = AgentApp.objects.get_or_create(name=name, defaults={"mode": mode, **app_fields})
    api_key_create(app=app, raw_key=key)
    return {"app_id": str(app.pk), "config_id": str(config.pk)}


def manage(*args: str, env: dict[str, str]) -> None:
    subprocess.run([PYTHON, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)


def provision_configs(*, configs: list[dict[str, Any]]) -> None:
    """Chat configs (fields of LLMConfig, plus api_key), created unless one of that name exists: pools for benches."""
    from llmconfigs.models import LLMConfig
    from llmconfigs.services import llm_config_create

    for fields in configs:
        if not LLMConfig.objects.filter(name=fields["name"]).exists():
            llm_config_create(**fields)


def provision_in_subprocess(*, env: dict[str, str], function: str = "provision_app", **fields: Any) -> None:
    """`provision_app` (or another provisioning `function` of this module) against the database of `env` (for a
    database this process is not connected to)."""
    code = (
        "import django, json, sys; django.setup(); "
        f"from tests.e2e.dify_servers import {function}; {function}(**json.loads(sys.argv[1]))"
    )
    done = subprocess.run([PYTHON, "-c", code, json.dumps(fields)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    if done.returncode:
        raise RuntimeError(f"provisioning failed:\n{done.stderr[-3000:]}")


def server_env(*, database_url: str, redis_url: str = "", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.update({"DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1",
                # A server runs one event loop: it keeps its checkpoint connections, as in production.
                "AGENT_CHECKPOINT_POOL_SIZE": "4"})
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra)
    return env


def database_url_for_tests() -> str:
    """The URL of the database pytest-django created for this test run (PostgreSQL only: SQLite's is in memory)."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    assert db["ENGINE"].endswith("postgresql"), db["ENGINE"]
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{user}{password}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


# ----- daphne -----

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daphne:
    """A daphne process serving opsagent.asgi on a free port of 127.0.0.1 (for the benchmark and ad-hoc runs)."""

    def __init__(self, *, env: dict[str, str]):
        self.env = env
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.log: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Daphne:
        self.port = free_port()
        self.process = subprocess.Popen(
            [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "opsagent.asgi:application"],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        # Keep draining the output so the server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("daphne did not start:\n" + "".join(self.log))

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.log.append(line)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> Daphne:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
