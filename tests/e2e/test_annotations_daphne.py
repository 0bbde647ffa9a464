"""Annotation replies over real HTTP against daphne: annotations written and replies enabled through the API (the
enable job runs in the server's background thread), then a streamed chat query answered by the annotation with no
chat model call, and a far one answered by the model."""
from __future__ import annotations

import time

import httpx
import pytest

from agentcore.models import AgentApp
from difyapi.auth import api_key_create
from tests.e2e.dify_servers import parse_sse

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

QUESTION, CLOSE, FAR = "How do I restart nginx?", "nginx restart please", "what is the weather"
ANSWER = "systemctl restart nginx"


def test_annotation_reply_over_real_http(daphne_server, default_llm_config, make_llm_config, fake_upstream):
    make_llm_config(name="vectors", is_embedding=True, provider="openai", model_name="embed-small")
    fake_upstream.embedding_vectors.update({QUESTION: [1.0, 0.0], CLOSE: [0.96, 0.28], FAR: [0.0, 1.0]})
    app = AgentApp.objects.create(name="e2e-annotations", mode="agent-chat")
    _, key = api_key_create(app=app)
    base = f"{daphne_server.base_url}/v1"
    with httpx.Client(timeout=20, headers={"Authorization": f"Bearer {key}"}) as client:
        created = client.post(f"{base}/apps/annotations", json={"question": QUESTION, "answer": ANSWER})
        assert created.status_code == 201
        job = client.post(f"{base}/apps/annotation-reply/enable", json={
            "score_threshold": 0.9, "embedding_provider_name": "langgenius/openai/openai",
            "embedding_model_name": "embed-small"}).json()
        deadline = time.monotonic() + 15
        while (status := client.get(f"{base}/apps/annotation-reply/enable/status/{job['job_id']}").json())[
                "job_status"] not in ("completed", "error") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == {"job_id": job["job_id"], "job_status": "completed", "error_msg": ""}

        fake_upstream.requests.clear()
        chat = {"inputs": {}, "user": "alice", "response_mode": "streaming", "auto_generate_name": False}
        response = client.post(f"{base}/chat-messages", json={**chat, "query": CLOSE})
        events = [e for e in parse_sse(response.content) if isinstance(e, dict)]
        assert [e["event"] for e in events] == ["message"] * len(ANSWER) + ["message_end"]
        assert "".join(e["answer"] for e in events[:-1]) == ANSWER
        assert events[-1]["metadata"]["annotation_reply"] == {
            "id": created.json()["id"], "account": {"id": str(app.pk), "name": "e2e-annotations"}}
        assert not fake_upstream.chat_requests

        response = client.post(f"{base}/chat-messages", json={**chat, "query": FAR})
        events = [e for e in parse_sse(response.content) if isinstance(e, dict)]
        assert events[-1]["event"] == "message_end" and events[-1]["metadata"]["annotation_reply"] is None
        assert len(fake_upstream.chat_requests) == 1
        listed = client.get(f"{base}/apps/annotations").json()
        assert listed["data"][0]["hit_count"] == 1
