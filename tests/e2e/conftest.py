"""A real daphne subprocess serving opsagent.asgi against the test's database, for end-to-end tests.

Use it from a `django_db(transaction=True)` test (rows the test writes must be committed for the server to see them):
`daphne_server` is a running server; `start_daphne(**env)` starts more (e.g. with REDIS_URL). On SQLite the test DB
must be a file (tests/settings.py makes it one): an in-memory DB can't be shared with another process.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DAPHNE = Path(sys.executable).with_name("daphne")
# Importing the project takes about 6 s of CPU; on a shared, loaded 2-core machine that was over 30 s of wall time.
START_TIMEOUT = float(os.environ.get("E2E_START_TIMEOUT", "120"))
# Debian's Chromium, driven by Playwright (no browser downloads here); .ci/run installs it when missing.
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


@dataclass
class DaphneServer:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def live_database_url() -> str:
    """DATABASE_URL of the database this test runs against (pytest-django's test DB, not the dev DB)."""
    from django.db import connection

    db = connection.settings_dict
    if connection.vendor == "sqlite":
        name = str(db["NAME"])
        if name == ":memory:" or name.startswith("file:memorydb"):
            pytest.skip("the SQLite test database is in memory; a server process can't share it")
        return f"sqlite:///{Path(name).resolve()}"
    if connection.vendor == "postgresql":
        credentials = quote(db["USER"] or "", safe="")
        if db.get("PASSWORD"):
            credentials += ":" + quote(db["PASSWORD"], safe="")
        host = f"{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
        return f"postgres://{credentials}@{host}/{db['NAME']}"
    pytest.skip(f"no end-to-end support for {db['ENGINE']}")


@pytest.fixture
def start_daphne(transactional_db):
    """Start daphne processes on free ports (extra keyword arguments become environment variables); all are stopped
    when the test ends."""
    servers: list[DaphneServer] = []

    def start(**env: str) -> DaphneServer:
        port = free_port()
        log_path = Path(tempfile.mkstemp(prefix=f"daphne-{port}-", suffix=".log")[1])
        environment = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": live_database_url(),
            "PYTHONUNBUFFERED": "1",
            "AGENT_CHECKPOINT_POOL_SIZE": "4",  # one event loop per server: its checkpoint connections are pooled
            **env,
        }
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(DAPHNE), "-b", "127.0.0.1", "-p", str(port), "opsagent.asgi:application"],
                cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
            )
        server = DaphneServer(process=process, port=port, log_path=log_path)
        servers.append(server)
        _wait_ready(server)
        return server

    yield start
    for server in servers:
        server.process.terminate()
        try:
            server.process.wait(10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(5)
        server.log_path.unlink(missing_ok=True)


@pytest.fixture
def daphne_server(start_daphne) -> DaphneServer:
    return start_daphne()


def _wait_ready(server: DaphneServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"daphne exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/health/", timeout=1.0).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"daphne did not answer within {START_TIMEOUT}s:\n{server.log()[-4000:]}")


@pytest.fixture
def chromium():
    """Opens a headless Chromium: call it after the test's rows are written (Playwright's sync API runs an event
    loop in this thread, and Django refuses synchronous queries while one runs)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")

    @contextlib.contextmanager
    def launch():
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                yield browser
            finally:
                browser.close()

    return launch
