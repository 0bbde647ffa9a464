"""The annotation endpoints: /v1/apps/annotations (list, create, update, delete) and /v1/apps/annotation-reply
(enable, disable, job status), their shapes checked against Dify's OpenAPI document, their errors in Dify's
envelope, and what the enable job does."""
from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from difyapi.annotations import ANNOTATIONS_PER_APP
from difyapi.models import Annotation, AnnotationJob, AnnotationSetting
from difyapi.tests.factories import DifyClient, assert_error, make_app_with_key
from difyapi.tests.openapi import assert_schema
from difyapi.vectors import vector_from_bytes
from tests.fakes.upstream import Reply

URL = "/v1/apps/annotations"
REPLY_BODY = {"score_threshold": 0.9, "embedding_provider_name": "openai", "embedding_model_name": "embed-small"}


@pytest.fixture
def api(db):
    app, key = make_app_with_key(name="ops-bot", mode="chat")
    return app, DifyClient(key)


@pytest.fixture
def embedding_config(make_llm_config):
    return make_llm_config(name="vectors", is_embedding=True, provider="openai", model_name="embed-small")


def put(client: DifyClient, path: str, data):
    return client.client.put(path, json.dumps(data), content_type="application/json", headers=client.headers)


def create(client: DifyClient, question: str, answer: str):
    response = client.post(URL, {"question": question, "answer": answer})
    assert response.status_code == 201, response.content
    return response.json()


def test_create_list_update_delete_have_difys_shapes(api):
    app, client = api
    created = assert_schema(create(client, "How do I restart nginx?", "systemctl restart nginx"), "AnnotationItem")
    assert set(created) == {"id", "question", "answer", "hit_count", "created_at"}
    assert created["hit_count"] == 0 and isinstance(created["created_at"], int)

    listed = client.get(URL).json()
    assert_schema(listed, "AnnotationListResponse")
    assert listed == {"data": [created], "has_more": False, "limit": 20, "total": 1, "page": 1}

    updated = put(client, f"{URL}/{created['id']}", {"question": "Restart nginx?", "answer": "Use systemctl."})
    assert updated.status_code == 200
    assert assert_schema(updated.json(), "AnnotationItem") == {**created, "question": "Restart nginx?",
                                                               "answer": "Use systemctl."}

    deleted = client.delete(f"{URL}/{created['id']}")
    assert deleted.status_code == 204 and deleted.content == b""
    assert not Annotation.objects.filter(app=app).exists()
    assert_error(client.delete(f"{URL}/{created['id']}"), 404, "not_found", "Annotation not found")
    assert_error(put(client, f"{URL}/{created['id']}", {"question": "q", "answer": "a"}), 404, "not_found",
                 "Annotation not found")


def test_list_pages_newest_first_filters_by_keyword_and_caps_the_limit(api):
    _, client = api
    first = create(client, "disk full on /var", "Clean the journal: journalctl --vacuum-size=500M")
    second = create(client, "nginx down", "Restart it")
    third = create(client, "dns fails", "Check /etc/resolv.conf")
    Annotation.objects.filter(pk=first["id"]).update(created_at="2026-01-01T00:00:00Z")
    Annotation.objects.filter(pk=second["id"]).update(created_at="2026-01-02T00:00:00Z")

    page1 = client.get(URL, {"limit": 2}).json()
    assert [a["id"] for a in page1["data"]] == [third["id"], second["id"]]
    assert (page1["has_more"], page1["total"], page1["page"], page1["limit"]) == (True, 3, 1, 2)
    page2 = client.get(URL, {"limit": 2, "page": 2}).json()
    assert [a["id"] for a in page2["data"]] == [first["id"]] and page2["has_more"] is False

    by_answer = client.get(URL, {"keyword": "JOURNAL"}).json()
    assert [a["id"] for a in by_answer["data"]] == [first["id"]] and by_answer["total"] == 1
    by_question = client.get(URL, {"keyword": "nginx"}).json()
    assert [a["id"] for a in by_question["data"]] == [second["id"]]

    assert client.get(URL, {"limit": 500}).json()["limit"] == 100
    assert_error(client.get(URL, {"page": 0}), 400, "invalid_param")
    assert_error(client.get(URL, {"limit": 0}), 400, "invalid_param")
    assert_error(client.get(URL, {"limit": "ten"}), 400, "invalid_param", "limit must be an integer")
    assert_error(client.get(URL, {"keyword": "k" * 256}), 400, "invalid_param")


def test_an_apps_annotations_are_its_own(api):
    _, client = api
    theirs = create(client, "secret runbook", "step 1")
    _, other_key = make_app_with_key(name="other-bot", mode="chat")
    other = DifyClient(other_key)
    assert other.get(URL).json()["data"] == []
    assert_error(put(other, f"{URL}/{theirs['id']}", {"question": "q", "answer": "a"}), 404, "not_found")
    assert_error(other.delete(f"{URL}/{theirs['id']}"), 404, "not_found")
    assert Annotation.objects.filter(pk=theirs["id"], question="secret runbook").exists()


def test_bad_annotation_bodies_are_refused_in_difys_envelope(api, settings):
    app, client = api
    assert_error(client.post(URL, {"answer": "a"}), 400, "invalid_param", "question is required")
    assert_error(client.post(URL, {"question": "q"}), 400, "invalid_param", "answer is required")
    assert_error(client.post(URL, {"question": ["q"], "answer": "a"}), 400, "invalid_param")
    assert_error(client.post(URL, {"question": "q", "answer": "a" * 100_001}), 400, "invalid_param")
    settings.QUERY_MAX_LENGTH = 10
    assert_error(client.post(URL, {"question": "q" * 11, "answer": "a"}), 400, "invalid_param")
    assert_error(client.post_raw(URL, "{not json", "application/json"), 400, "bad_request")
    assert_error(client.post_raw(URL, "question=q", "application/x-www-form-urlencoded"), 415,
                 "unsupported_media_type")
    assert_error(put(client, f"{URL}/not-a-uuid", {"question": "q", "answer": "a"}), 404, "not_found")
    assert_error(DifyClient(None).get(URL), 401, "unauthorized")
    assert not Annotation.objects.filter(app=app).exists()


def test_an_app_holds_a_bounded_number_of_annotations(api):
    app, client = api
    Annotation.objects.bulk_create(Annotation(app=app, question=f"q{i}", answer="a")
                                   for i in range(ANNOTATIONS_PER_APP))
    assert_error(client.post(URL, {"question": "one more", "answer": "a"}), 400, "invalid_param")
    assert Annotation.objects.filter(app=app).count() == ANNOTATIONS_PER_APP


def test_reply_action_checks_the_body_first_even_to_disable(api):
    _, client = api
    reply_url = "/v1/apps/annotation-reply/"
    assert_error(client.post(reply_url + "disable", {}), 400, "invalid_param", "score_threshold is required")
    assert_error(client.post(reply_url + "enable", {**REPLY_BODY, "score_threshold": "high"}), 400, "invalid_param")
    assert_error(client.post(reply_url + "enable", {**REPLY_BODY, "score_threshold": 1.5}), 400, "invalid_param")
    assert_error(client.post(reply_url + "enable", {**REPLY_BODY, "score_threshold": True}), 400, "invalid_param")
    without_model = {k: v for k, v in REPLY_BODY.items() if k != "embedding_model_name"}
    assert_error(client.post(reply_url + "enable", without_model), 400, "invalid_param",
                 "embedding_model_name is required")
    assert_error(client.post(reply_url + "toggle", REPLY_BODY), 400, "invalid_param",
                 "Unsupported annotation reply action")
    assert not AnnotationJob.objects.exists()


def test_status_of_an_unknown_job_is_difys_error(api):
    app, client = api
    unknown = uuid.uuid4()
    assert_error(client.get(f"/v1/apps/annotation-reply/enable/status/{unknown}"), 400, "invalid_param",
                 "The job does not exist.")
    job = AnnotationJob.objects.create(app=app, action="enable", score_threshold=0.9,
                                       embedding_provider_name="openai", embedding_model_name="m")
    # The action in the path is part of the job's name, as in Dify's key.
    assert_error(client.get(f"/v1/apps/annotation-reply/disable/status/{job.pk}"), 400, "invalid_param")
    _, other_key = make_app_with_key(name="other-bot", mode="chat")
    assert_error(DifyClient(other_key).get(f"/v1/apps/annotation-reply/enable/status/{job.pk}"), 400,
                 "invalid_param")


def _finished(client: DifyClient, action: str, job_id: str) -> dict:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status = client.get(f"/v1/apps/annotation-reply/{action}/status/{job_id}").json()
        if status["job_status"] in ("completed", "error"):
            return assert_schema(status, "InitialAnnotationReplySettingsStatusResponse")
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.django_db(transaction=True)
def test_enable_job_embeds_every_question_then_switches_replies_on(embedding_config, fake_upstream):
    app, key = make_app_with_key(name="ops-bot", mode="chat")
    client = DifyClient(key)
    create(client, "How do I restart nginx?", "systemctl restart nginx")
    create(client, "Where are the logs?", "/var/log")
    assert not fake_upstream.embedding_requests  # replies are off: nothing is embedded yet

    started = client.post("/v1/apps/annotation-reply/enable", {**REPLY_BODY, "score_threshold": 0.8})
    assert started.status_code == 200
    job = assert_schema(started.json(), "InitialAnnotationReplySettingsResponse")
    assert set(job) == {"job_id", "job_status"} and job["job_status"] == "waiting"
    assert _finished(client, "enable", job["job_id"]) == {"job_id": job["job_id"], "job_status": "completed",
                                                            "error_msg": ""}

    setting = AnnotationSetting.objects.get(app=app)
    assert (setting.enabled, setting.score_threshold, setting.embedding_config_id) == (True, 0.8,
                                                                                        embedding_config.pk)
    embedded = [text for r in fake_upstream.embedding_requests for text in r.body["input"]]
    assert sorted(embedded) == ["How do I restart nginx?", "Where are the logs?"]
    assert {r.body["model"] for r in fake_upstream.embedding_requests} == {"embed-small"}
    for annotation in Annotation.objects.filter(app=app):
        assert annotation.embedding_config_id == embedding_config.pk
        assert len(vector_from_bytes(bytes(annotation.embedding))) == 8

    # Enabled: a new annotation is embedded when it is written, an update only when its question changed.
    fake_upstream.requests.clear()
    created = create(client, "Disk full?", "Vacuum the journal")
    assert [r.body["input"] for r in fake_upstream.embedding_requests] == [["Disk full?"]]
    put(client, f"{URL}/{created['id']}", {"question": "Disk full?", "answer": "Vacuum it"})
    assert len(fake_upstream.embedding_requests) == 1
    put(client, f"{URL}/{created['id']}", {"question": "Disk is full?", "answer": "Vacuum it"})
    assert [r.body["input"] for r in fake_upstream.embedding_requests][-1] == ["Disk is full?"]

    stopped = client.post("/v1/apps/annotation-reply/disable", REPLY_BODY).json()
    assert _finished(client, "disable", stopped["job_id"])["job_status"] == "completed"
    assert AnnotationSetting.objects.get(app=app).enabled is False


@pytest.mark.django_db(transaction=True)
def test_enable_job_reports_an_unknown_embedding_model_and_changes_nothing(embedding_config, fake_upstream):
    app, key = make_app_with_key(name="ops-bot", mode="chat")
    client = DifyClient(key)
    job = client.post("/v1/apps/annotation-reply/enable", {**REPLY_BODY, "embedding_model_name": "nope"}).json()
    status = _finished(client, "enable", job["job_id"])
    assert status["job_status"] == "error" and "'nope'" in status["error_msg"]
    assert not AnnotationSetting.objects.filter(app=app, enabled=True).exists()


@pytest.mark.django_db(transaction=True)
def test_enable_job_failing_at_the_provider_says_so_without_the_key(embedding_config, fake_upstream):
    app, key = make_app_with_key(name="ops-bot", mode="chat")
    client = DifyClient(key)
    create(client, "How do I restart nginx?", "systemctl restart nginx")
    fake_upstream.script_embeddings(Reply(status=401, error_message="Incorrect API key provided: {api_key}"))
    job = client.post("/v1/apps/annotation-reply/enable", REPLY_BODY).json()
    status = _finished(client, "enable", job["job_id"])
    assert status["job_status"] == "error"
    assert "401" in status["error_msg"] and "vectors" in status["error_msg"]
    assert "sk-test" not in status["error_msg"] and "secretvalue" not in status["error_msg"]
    assert not AnnotationSetting.objects.filter(app=app, enabled=True).exists()


def test_a_second_enable_while_one_runs_is_the_same_job(api):
    app, client = api
    first = client.post("/v1/apps/annotation-reply/enable", REPLY_BODY).json()  # waits: its thread starts on commit
    again = client.post("/v1/apps/annotation-reply/enable", REPLY_BODY).json()
    assert again == {"job_id": first["job_id"], "job_status": "processing"}
    assert AnnotationJob.objects.filter(app=app).count() == 1


def test_a_job_interrupted_by_a_dead_process_does_not_hold_the_next_one(api):
    app, client = api
    first = client.post("/v1/apps/annotation-reply/enable", REPLY_BODY).json()
    AnnotationJob.objects.filter(pk=first["job_id"]).update(updated_at=timezone.now() - timedelta(minutes=11))
    again = client.post("/v1/apps/annotation-reply/enable", REPLY_BODY).json()
    assert again["job_id"] != first["job_id"] and again["job_status"] == "waiting"
    status = client.get(f"/v1/apps/annotation-reply/enable/status/{first['job_id']}").json()
    assert status == {"job_id": first["job_id"], "job_status": "error", "error_msg": "The job was interrupted."}


def test_plugin_style_provider_names_map_to_the_config(embedding_config):
    from difyapi.annotations import annotation_embedding_config_find

    found = annotation_embedding_config_find(provider_name="langgenius/openai/openai", model_name="embed-small")
    assert found == embedding_config
    assert annotation_embedding_config_find(provider_name="openai", model_name="vectors") == embedding_config
    assert annotation_embedding_config_find(provider_name="zhipu", model_name="embed-small") is None
