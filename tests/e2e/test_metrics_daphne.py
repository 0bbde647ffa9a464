"""/metrics with two daphne workers in prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR shared): either
worker's scrape sums the turns both served; METRICS_TOKEN guards it over real HTTP."""
from __future__ import annotations

import httpx
import pytest
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from agentcore.models import AgentApp
from difyapi.auth import api_key_create
from tests.fakes.upstream import Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

TOKEN = "e2e-metrics-token-0b9a8c7d6e5f"


def _ask(client: httpx.Client, base_url: str, key: str) -> None:
    response = client.post(f"{base_url}/v1/chat-messages", headers={"Authorization": f"Bearer {key}"},
                           json={"inputs": {}, "query": "hi", "user": "alice", "response_mode": "blocking",
                                 "auto_generate_name": False})
    assert response.status_code == 200, response.text


def _turns(client: httpx.Client, base_url: str) -> float:
    response = client.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    return sum(sample.value for family in text_string_to_metric_families(response.text) for sample in family.samples
               if sample.name == "opsagent_chat_requests_total" and sample.labels["config"] == "metrics-e2e")


def test_either_worker_serves_the_counts_of_both(start_daphne, make_llm_config, fake_upstream, tmp_path):
    if connection.vendor != "postgresql":
        pytest.skip("two workers need a shared PostgreSQL database (SQLite is per process here)")
    make_llm_config(name="metrics-e2e", model_name="metrics-e2e-model", default=True)
    fake_upstream.default = Reply(text="Counted.")
    app = AgentApp.objects.create(name="metrics-e2e", mode="chat")
    _, key = api_key_create(app=app)
    environment = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "METRICS_TOKEN": TOKEN}
    first, second = start_daphne(**environment), start_daphne(**environment)
    with httpx.Client(timeout=30) as client:
        for _ in range(2):
            _ask(client, first.base_url, key)
        _ask(client, second.base_url, key)
        assert _turns(client, first.base_url) == 3
        assert _turns(client, second.base_url) == 3
        refused = client.get(f"{second.base_url}/metrics")
        assert refused.status_code == 401
        assert refused.headers["content-type"].startswith("text/plain")
    for server in (first, second):
        assert TOKEN not in server.log()
