"""Fixtures and helpers for the engine's tests: apps, a hit-counting HTTP target, running a turn to its end."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agentcore.events import Event, event_to_dict
from agentcore.models import AgentApp
from agentcore.runs import TurnRequest, run_turn


@pytest.fixture
def ops_app(default_llm_config):
    return AgentApp.objects.create(name="Ops", mode=AgentApp.Mode.AGENT_CHAT, system_prompt="You are an ops agent.")


@pytest.fixture
def plain_chat_app(default_llm_config):
    return AgentApp.objects.create(name="Chat", mode=AgentApp.Mode.CHAT, system_prompt="Answer briefly.")


async def run_all(request: TurnRequest) -> list[Event]:
    return [event async for event in run_turn(request)]


def types(events: list[Event]) -> list[str]:
    return [event_to_dict(e)["type"] for e in events]


class CountingTarget:
    """A local HTTP server that counts GETs: proof of whether a tool really ran."""

    def __init__(self):
        self.hits = 0
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                target.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def counting_target():
    target = CountingTarget()
    yield target
    target.close()
