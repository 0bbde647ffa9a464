"""Fixtures and helpers shared by the agent's interface tests (REST, WebSocket, admin, e2e)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agentcore.models import AgentApp


@pytest.fixture
def agent_app(default_llm_config):
    return AgentApp.objects.create(name="OpsAgent", mode=AgentApp.Mode.AGENT_CHAT,
                                   system_prompt="You are an operations assistant.")


@pytest.fixture
def chat_app(default_llm_config):
    return AgentApp.objects.create(name="Plain chat", mode=AgentApp.Mode.CHAT, system_prompt="Answer briefly.")


@pytest.fixture
def http_check_needs_approval(db):
    from agentcore.services import tool_policy_update

    tool_policy_update(name="http_check", requires_approval=True, approver="requester")


class HitTarget:
    """A local HTTP server that counts GETs: proof of whether a tool really ran."""

    def __init__(self):
        self.hits = 0
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                target.hits += 1
                body = b"ok"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/status"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hit_target():
    target = HitTarget()
    yield target
    target.close()


def sse_events(body: bytes | str) -> list[dict]:
    """The JSON events of a `text/event-stream` body, in order."""
    text = body.decode() if isinstance(body, bytes) else body
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
