"""Annotation replies in the admin: annotations written through the same service as the API (embedded, attributed
to their author), an app's reply setting saved through the enable/disable job, permissions, and no key on a page."""
from __future__ import annotations

import pytest

from difyapi.annotations import annotation_reply_metadata
from difyapi.models import Annotation, AnnotationJob, AnnotationSetting
from difyapi.tests.factories import DifyClient, make_app, make_key
from tests.fakes.upstream import Reply

pytestmark = pytest.mark.django_db

ANNOTATIONS = "/admin/difyapi/annotation/"
SETTINGS = "/admin/difyapi/annotationsetting/"


@pytest.fixture
def embedding_config(make_llm_config):
    return make_llm_config(name="vectors", is_embedding=True, provider="openai", model_name="embed-small")


def enable(client, app, config, threshold="0.85", follow=False):
    return client.post(f"{SETTINGS}add/", {"app": str(app.pk), "enabled": "on", "score_threshold": threshold,
                                           "embedding_config": str(config.pk)}, follow=follow)


def test_saving_a_setting_runs_the_enable_job_and_new_annotations_are_embedded(admin_client, admin_user,
                                                                              embedding_config, fake_upstream):
    app = make_app(name="ops")
    Annotation.objects.create(app=app, question="Where are the logs?", answer="/var/log")
    response = enable(admin_client, app, embedding_config)
    assert response.status_code == 302, response.content.decode()[:2000]
    setting = AnnotationSetting.objects.get(app=app)
    assert (setting.enabled, setting.score_threshold, setting.embedding_config_id) == (True, 0.85,
                                                                                        embedding_config.pk)
    assert AnnotationJob.objects.get(app=app).status == "completed"
    assert Annotation.objects.get(app=app).embedding_config_id == embedding_config.pk

    fake_upstream.requests.clear()
    response = admin_client.post(f"{ANNOTATIONS}add/", {"app": str(app.pk), "question": "Restart nginx?",
                                                         "answer": "systemctl restart nginx"})
    assert response.status_code == 302
    annotation = Annotation.objects.get(question="Restart nginx?")
    assert annotation.created_by == admin_user and annotation.embedding_config_id == embedding_config.pk
    assert [r.body["input"] for r in fake_upstream.embedding_requests] == [["Restart nginx?"]]
    # Dify's annotation_reply names the account that wrote it.
    assert annotation_reply_metadata(annotation)["account"] == {"id": str(admin_user.pk), "name": "admin"}

    before = AnnotationSetting.objects.get(app=app).index_version
    admin_client.post(f"{ANNOTATIONS}{annotation.pk}/delete/", {"post": "yes"})
    assert not Annotation.objects.filter(pk=annotation.pk).exists()
    assert AnnotationSetting.objects.get(app=app).index_version > before  # every worker's index is stale


def test_a_failing_enable_job_is_reported_and_changes_nothing(admin_client, embedding_config, fake_upstream):
    app = make_app(name="ops")
    Annotation.objects.create(app=app, question="Where are the logs?", answer="/var/log")
    fake_upstream.script_embeddings(Reply(status=401, error_message="Incorrect API key provided: {api_key}"))
    page = enable(admin_client, app, embedding_config, follow=True).content.decode()
    assert "Embedding with config" in page and "401" in page
    assert "sk-test" not in page and "secretvalue" not in page
    assert not AnnotationSetting.objects.filter(app=app, enabled=True).exists()


def test_the_setting_page_shows_no_key_and_refuses_a_missing_config(admin_client, embedding_config):
    app = make_app(name="ops")
    page = admin_client.get(f"{SETTINGS}add/").content.decode()
    assert "vectors" in page and embedding_config.api_key not in page and "secretvalue" not in page
    response = admin_client.post(f"{SETTINGS}add/", {"app": str(app.pk), "enabled": "on", "score_threshold": "0.9"})
    assert response.status_code == 200 and "need an embedding config" in response.content.decode()
    assert not AnnotationSetting.objects.exists()


def test_annotation_admin_needs_its_permissions(client, django_user_model, grant):
    user = django_user_model.objects.create_user(username="op", password="pw-op-123", is_staff=True)
    client.force_login(user)
    assert client.get(ANNOTATIONS).status_code == 403  # the staff flag alone grants nothing
    grant(user, "difyapi.view_annotation")
    assert client.get(ANNOTATIONS).status_code == 200
    assert client.get(f"{ANNOTATIONS}add/").status_code == 403
    assert client.get(SETTINGS).status_code == 403


def test_parameters_report_whether_annotation_replies_are_on(admin_client, embedding_config):
    app = make_app(name="ops")
    client = DifyClient(make_key(app))
    assert client.get("/v1/parameters").json()["annotation_reply"] == {"enabled": False}
    enable(admin_client, app, embedding_config)
    assert client.get("/v1/parameters").json()["annotation_reply"] == {"enabled": True}
