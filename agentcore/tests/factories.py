"""Helpers for agentcore's tests (the fixtures are in conftest.py): running a turn to its end, checkpoint rows, local
HTTP servers, scripted DNS answers, SSE bodies."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from channels.db import database_sync_to_async
from django.db import connection

from agentcore.events import Event, event_to_dict
from agentcore.runs import TurnRequest, turn_prepare_and_run


async def run_all(request: TurnRequest) -> list[Event]:
    return [event async for event in turn_prepare_and_run(request)]


@database_sync_to_async
def checkpoint_rows(thread_id: str) -> tuple[int, int]:
    """(checkpoints, pending writes) stored for a conversation."""
    writes = "checkpoint_writes" if connection.vendor == "postgresql" else "writes"
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM checkpoints WHERE thread_id = %s", [thread_id])
        checkpoints = cursor.fetchone()[0]
        cursor.execute(f"SELECT count(*) FROM {writes} WHERE thread_id = %s", [thread_id])
        return checkpoints, cursor.fetchone()[0]


def types(events: list[Event]) -> list[str]:
    return [event_to_dict(e)["type"] for e in events]


class LocalHTTPServer:
    """A local HTTP server answering GETs from `routes` (path -> (status, headers, body)); it records the path and
    Host and User-Agent headers of every request that reaches it (404 for unknown paths)."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]]):
        self.routes = routes
        self.requests: list[str] = []
        self.hosts: list[str | None] = []
        self.agents: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                server.hosts.append(self.headers.get("Host"))
                server.agents.append(self.headers.get("User-Agent"))
                status, headers, payload = server.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(payload))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.http.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


class CountingTarget(LocalHTTPServer):
    """A local HTTP server that counts GETs: proof of whether a tool really ran."""

    def __init__(self):
        super().__init__({"/health": (200, {}, b"ok")})
        self.url = f"{self.base_url}/health"

    @property
    def hits(self) -> int:
        return len(self.requests)



class ScriptedDNS:
    """Answers for chosen host names, in the order given (other names resolve for real): installed in place of
    agentcore.network.resolve, the one function every checked connection resolves through."""

    def __init__(self, real):
        self.answers: dict[str, list[str]] = {}
        self.asked: list[str] = []
        self._real = real

    async def resolve(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host in self.answers:
            return list(self.answers[host])
        return await self._real(host, port)


def sse_events(body: bytes | str) -> list[dict]:
    """The JSON events of a `text/event-stream` body, in order."""
    text = body.decode() if isinstance(body, bytes) else body
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
