"""The request-log middleware: method, path, status, duration; JSON when asked; never bodies, queries or headers."""
import json
import logging

import pytest

from opsagent.common.logging import JSONFormatter

pytestmark = pytest.mark.django_db

SECRET = "tok-request-log-secret-123456"


def _request_records(caplog):
    return [r for r in caplog.records if r.name == "opsagent.requests"]


def test_each_request_is_logged_with_method_path_status_duration(client, caplog):
    caplog.set_level(logging.DEBUG, logger="opsagent.requests")
    client.get("/health/")
    (record,) = _request_records(caplog)
    assert record.levelno == logging.INFO
    assert (record.method, record.path, record.status) == ("GET", "/health/", 200)
    assert record.duration_ms >= 0
    assert record.getMessage().startswith("GET /health/ 200 ")


def test_json_format_has_the_request_fields(client, caplog):
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    client.get("/api/llm-configs/")
    (record,) = _request_records(caplog)
    line = json.loads(JSONFormatter().format(record))
    assert line["logger"] == "opsagent.requests" and line["level"] == "INFO"
    assert (line["method"], line["path"], line["status"]) == ("GET", "/api/llm-configs/", 401)
    assert isinstance(line["duration_ms"], float)
    assert line["time"].endswith("+00:00")


def test_bodies_query_strings_and_authorization_never_logged(client, caplog):
    caplog.set_level(logging.DEBUG, logger="opsagent.requests")
    client.post(
        f"/api/llm-configs/?api_key={SECRET}",
        data=json.dumps({"api_key": SECRET}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Token {SECRET}",
    )
    (record,) = _request_records(caplog)
    assert record.path == "/api/llm-configs/"
    formatted = JSONFormatter().format(record) + logging.Formatter("%(message)s").format(record)
    assert SECRET not in formatted
    assert SECRET not in caplog.text


def test_slow_requests_are_warnings(client, caplog, settings):
    settings.REQUEST_SLOW_SECONDS = 0.0
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    client.get("/health/")
    (record,) = _request_records(caplog)
    assert record.levelno == logging.WARNING


async def test_async_requests_are_logged_too(async_client, caplog):
    caplog.set_level(logging.INFO, logger="opsagent.requests")
    response = await async_client.get("/api/llm-configs/providers/")
    assert response.status_code == 401
    (record,) = _request_records(caplog)
    assert (record.method, record.path, record.status) == ("GET", "/api/llm-configs/providers/", 401)
