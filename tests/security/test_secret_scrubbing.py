"""Attack (issue 15, item 5): a provider that echoes the API key in its error text must not get the key stored.

Against a real daphne, turns through the Dify API (blocking and streaming) and the REST agent chat meet upstream
errors 401, 429 and 500 whose body echoes the key and the whole Authorization header. Afterwards the key, and its
distinctive middle part, appear in no byte of the database (SQLite: the files; PostgreSQL: every column of every
table, checkpoint tables included) and in no line of the server's log; the error categories stay as they were.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from django.db import connection
from rest_framework.authtoken.models import Token

from agentcore.models import AgentApp, Message
from difyapi.auth import api_key_create
from tests.fakes.upstream import Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

API_KEY = "sk-live-4f9QzR7mXc2VbN8pLk3TyW6sD1gH5jA0"
MIDDLE = API_KEY[10:-10]
ECHO = "Incorrect API key provided: {api_key}. You sent: {authorization}."
FAULTS = [(401, "auth"), (429, "rate_limit"), (500, "upstream_error")]


@pytest.fixture
def setup(make_llm_config, plain_user):
    config = make_llm_config(name="echoing-provider", api_key=API_KEY, default=True)
    agent = AgentApp.objects.create(name="agent", mode=AgentApp.Mode.AGENT_CHAT)
    chat = AgentApp.objects.create(name="chat", mode=AgentApp.Mode.CHAT)
    keys = {app.mode: api_key_create(app=app)[1] for app in (agent, chat)}
    token = Token.objects.create(user=plain_user).key
    return config, {"agent": agent, "chat": chat}, keys, token


def _dify(client: httpx.Client, key: str, mode: str) -> str:
    body = {"inputs": {}, "query": "is the disk full?", "user": "anonymous-1", "response_mode": mode,
            "auto_generate_name": False}
    response = client.post("/v1/chat-messages", json=body, headers={"Authorization": f"Bearer {key}"})
    return response.text


def _rest(client: httpx.Client, token: str, app_id, mode: str) -> str:
    response = client.post("/api/agent/chat/", json={"message": "is the disk full?", "app_id": str(app_id),
                                                     "response_mode": mode},
                           headers={"Authorization": f"Token {token}"})
    return response.text


def database_bytes() -> bytes:
    """Every stored byte: the SQLite files, or on PostgreSQL every column of every table of the test schema (bytea
    as its raw bytes, so that keys inside binary checkpoint blobs are found too)."""
    if connection.vendor == "sqlite":
        # Read by a child process: opening and closing the file here would drop every POSIX lock this process holds
        # on it, including the shared lock of its own SQLite connection. The next daphne to close its connection
        # would then take itself for the last one and delete the WAL this process still writes to, and every later
        # write of this process would land in a deleted file that no server can see.
        name = Path(connection.settings_dict["NAME"])
        paths = [str(path) for path in (name, Path(f"{name}-wal"), Path(f"{name}-journal")) if path.exists()]
        return subprocess.run(["cat", *paths], capture_output=True, check=True).stdout
    chunks = []
    with connection.cursor() as cursor:
        cursor.execute("SELECT table_name, column_name FROM information_schema.columns "
                       "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position")
        columns = cursor.fetchall()
        assert {"checkpoints", "checkpoint_writes", "checkpoint_blobs"} <= {table for table, _ in columns}
        for table, column in columns:
            cursor.execute(f'SELECT "{column}" FROM "{table}"')
            for (value,) in cursor.fetchall():
                if isinstance(value, memoryview | bytes):
                    chunks.append(bytes(value))
                elif value is not None:
                    chunks.append(str(value).encode())
    return b"\n".join(chunks)


def test_echoed_keys_reach_no_table_checkpoint_log_or_response(start_daphne, setup, fake_upstream):
    config, apps, keys, token = setup
    server = start_daphne(LOG_LEVEL="DEBUG")
    answers = []
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for status, _ in FAULTS:
            for turn in (lambda: _dify(client, keys["agent-chat"], "streaming"),  # Dify: agent apps only stream
                         lambda: _dify(client, keys["chat"], "blocking"),
                         lambda: _dify(client, keys["chat"], "streaming"),
                         lambda: _rest(client, token, apps["agent"].pk, "blocking"),
                         lambda: _rest(client, token, apps["chat"].pk, "streaming")):
                fake_upstream.script(Reply(status=status, error_message=ECHO))
                answers.append(turn())

    # The attack was real: the upstream did echo the key it was sent, fifteen times.
    assert len(fake_upstream.chat_requests) == 15, answers
    assert all(request.api_key == API_KEY for request in fake_upstream.chat_requests)
    # The errors kept their category (the mapping to each surface's error codes depends on it).
    categories = sorted(Message.objects.values_list("error_category", flat=True))
    assert categories == sorted([category for _, category in FAULTS for _ in range(5)])
    assert Message.objects.exclude(error="").count() == 15

    stored = database_bytes()
    assert b"checkpoint" in stored or connection.vendor == "postgresql"
    log = server.log()
    for secret in (API_KEY, MIDDLE):
        assert all(secret not in answer for answer in answers)
        assert secret.encode() not in stored
        assert secret not in log
