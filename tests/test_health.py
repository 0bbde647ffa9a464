"""GET /health/: status of the database and the cache; 503 when the database cannot be reached."""
import socket

import pytest
from django.db import connections


@pytest.mark.django_db
def test_health_reports_database_cache_and_time(client):
    response = client.get("/health/")
    assert response.status_code == 200
    data = response.json()
    assert data["status"] == "ok" and data["database"] == "ok" and data["cache"] == "ok"
    assert data["timestamp"].startswith("20")


@pytest.mark.django_db
def test_health_only_answers_get(client):
    assert client.post("/health/").status_code == 405


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def unreachable_database(django_db_blocker):
    """Swap the default connection for one pointing at nothing: a closed port on PostgreSQL, a path in a directory
    that does not exist on SQLite."""
    original = connections["default"]
    settings_dict = dict(original.settings_dict)
    if original.vendor == "sqlite":
        settings_dict["NAME"] = "/nonexistent-directory/opsagent/db.sqlite3"
    else:
        settings_dict.update(HOST="127.0.0.1", PORT=str(_closed_port()))
        # Without the pool: Django keeps one pool per alias, which would still hand out the working connections.
        options = {k: v for k, v in settings_dict.get("OPTIONS", {}).items() if k != "pool"}
        settings_dict["OPTIONS"] = {**options, "connect_timeout": 2}
    broken = original.__class__(settings_dict, alias="default")
    connections["default"] = broken
    with django_db_blocker.unblock():
        yield
    broken.close()
    connections["default"] = original


def test_health_is_503_when_the_database_is_unreachable(client, unreachable_database):
    response = client.get("/health/")
    assert response.status_code == 503
    data = response.json()
    assert data["status"] == "unavailable" and data["database"] == "unavailable"
    assert data["cache"] == "ok"
