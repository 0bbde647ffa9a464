"""Small builders for the Service API tests: apps with keys, API conversations, messages and thoughts written
directly as rows (no engine), and a Django test client that speaks Bearer + JSON like a Dify SDK."""
from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta
from typing import Any

from django.core.signals import request_finished
from django.db import close_old_connections
from django.test import Client
from django.utils import timezone

from agentcore.models import AgentApp, Message, Session, Thought
from difyapi.auth import api_key_create

ERROR_KEYS = {"code", "message", "status"}
CONVERSATION_KEYS = {"id", "name", "inputs", "status", "introduction", "created_at", "updated_at"}

_counter = itertools.count(1)
BASE_TIME = timezone.now().replace(microsecond=0) - timedelta(days=1)


def make_app(*, mode: str = "chat", **fields: Any) -> AgentApp:
    fields.setdefault("name", f"app-{next(_counter)}")
    return AgentApp.objects.create(mode=mode, **fields)


def make_key(app: AgentApp) -> str:
    return api_key_create(app=app)[1]


def make_app_with_key(**fields: Any) -> tuple[AgentApp, str]:
    """`make_app` and a key for it, for tests that call the API as that app."""
    app = make_app(**fields)
    return app, make_key(app)


def make_session(app: AgentApp, *, user: str = "alice", at: datetime | None = None, **fields: Any) -> Session:
    fields.setdefault("source", Session.Source.API)
    session = Session.objects.create(app=app, end_user=user, **fields)
    if at is not None:
        Session.objects.filter(pk=session.pk).update(created_at=at, updated_at=at)
        session.refresh_from_db()
    return session


def make_message(session: Session, *, query: str = "hi", answer: str = "hello", at: datetime | None = None,
                 **fields: Any) -> Message:
    fields.setdefault("status", Message.Status.NORMAL)
    message = Message.objects.create(session=session, query=query, answer=answer, **fields)
    if at is not None:
        Message.objects.filter(pk=message.pk).update(created_at=at)
        message.refresh_from_db()
    return message


def make_thought(message: Message, *, position: int = 1, **fields: Any) -> Thought:
    fields.setdefault("status", Thought.Status.DONE)
    return Thought.objects.create(message=message, position=position, **fields)


def seconds(n: int) -> datetime:
    return BASE_TIME + timedelta(seconds=n)


class DifyClient:
    """Calls /v1 the way Dify's SDKs do: `Authorization: Bearer <key>`, JSON bodies, query-string `user`."""

    def __init__(self, key: str | None, *, enforce_csrf_checks: bool = True):
        self.client = Client(enforce_csrf_checks=enforce_csrf_checks)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._responses = []

    def get(self, path: str, params: dict[str, Any] | None = None, **headers: str):
        response = self.client.get(path, params or {}, headers={**self.headers, **headers})
        self._responses.append(response)
        return response

    def close(self) -> None:
        """Close the responses got so far: a file's holds it open until closed, as a server closes it once sent."""
        # Closing a response sends request_finished, whose close_old_connections would close this test's database
        # connection in the middle of its transaction (PostgreSQL then refuses the next test's setup): off meanwhile,
        # as Django's test client does when it closes a streamed response.
        request_finished.disconnect(close_old_connections)
        try:
            for response in self._responses:
                response.close()
        finally:
            request_finished.connect(close_old_connections)
        self._responses.clear()

    def post(self, path: str, data: Any = None, **headers: str):
        return self.client.post(path, json.dumps(data), content_type="application/json",
                                headers={**self.headers, **headers})

    def post_raw(self, path: str, body: bytes | str, content_type: str):
        return self.client.post(path, body, content_type=content_type, headers=self.headers)

    def put(self, path: str, data: Any = None):
        return self.client.put(path, json.dumps(data), content_type="application/json", headers=self.headers)

    def delete(self, path: str, data: Any = None):
        return self.client.delete(path, json.dumps(data), content_type="application/json", headers=self.headers)

    def upload(self, path: str, data: dict[str, Any]):
        return self.client.post(path, data, headers=self.headers)


def assert_error(response, status: int, code: str, message: str | None = None) -> dict[str, Any]:
    """The Dify envelope exactly: `{"code","message","status"}` with these values."""
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    data = response.json()
    assert set(data) == ERROR_KEYS, data
    assert data["code"] == code and data["status"] == status, data
    if message is not None:
        assert data["message"] == message, data
    return data


def shared_cache_trips(monkeypatch) -> list[str]:
    """The operations a request sends to the shared cache, outermost only (one round trip each with Redis: a
    backend operation that calls another, as get_or_set calls get, is one), by name; with Redis, also every command
    the cache's connections send (a pipeline or an MGET is one), as "redis"."""
    import threading

    import redis
    from django.core.cache import caches

    trips: list[str] = []
    depth = threading.local()
    backend = type(caches["default"])
    for name in ("get", "get_many", "get_or_set", "has_key", "add", "set", "set_many", "delete", "delete_many",
                 "incr", "touch"):
        operation = getattr(backend, name)

        def counted(self, *args, _operation=operation, _name=name, **kwargs):
            outer = not getattr(depth, "inside", False)
            if outer:
                trips.append(_name)
            depth.inside = True
            try:
                return _operation(self, *args, **kwargs)
            finally:
                depth.inside = not outer

        monkeypatch.setattr(backend, name, counted)
    send = redis.Connection.send_packed_command

    def sent(self, command, check_health=True):
        trips.append("redis")
        return send(self, command, check_health)

    monkeypatch.setattr(redis.Connection, "send_packed_command", sent)
    return trips
