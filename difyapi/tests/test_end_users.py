"""GET /v1/end-users/{id}: the end user behind an id a client was given (an upload's `created_by`), as Dify's
EndUserDetail; scoped to the app; 404 `end_user_not_found` otherwise."""
from __future__ import annotations

import uuid

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from difyapi.models import EndUser
from difyapi.tests.factories import DifyClient, assert_error, make_app, make_key
from difyapi.tests.openapi import assert_schema

pytestmark = pytest.mark.django_db

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
END_USER_KEYS = {"id", "tenant_id", "app_id", "type", "external_user_id", "name", "is_anonymous", "session_id",
                 "created_at", "updated_at"}


@pytest.fixture
def app():
    return make_app(file_upload={"enabled": True})


@pytest.fixture
def client(app):
    return DifyClient(make_key(app))


def test_the_id_an_upload_reports_is_the_end_user(app, client, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    uploaded = client.upload("/v1/files/upload",
                             {"user": "alice", "file": SimpleUploadedFile("a.png", PNG, content_type="image/png")})
    assert uploaded.status_code == 201, uploaded.content
    end_user_id = uploaded.json()["created_by"]
    response = client.get(f"/v1/end-users/{end_user_id}")
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    data = assert_schema(response.json(), "EndUserDetail")
    assert set(data) == END_USER_KEYS
    created = EndUser.objects.get(pk=end_user_id).created_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert data == {
        "id": end_user_id, "tenant_id": str(app.id), "app_id": str(app.id), "type": "service-api",
        "external_user_id": "alice", "name": None, "is_anonymous": False, "session_id": "alice",
        "created_at": created, "updated_at": created,
    }


def test_the_shared_default_user_is_anonymous(app, client):
    end_user = EndUser.objects.create(app=app, session_id="DEFAULT-USER")
    data = assert_schema(client.get(f"/v1/end-users/{end_user.id}").json(), "EndUserDetail")
    assert data["is_anonymous"] is True and data["external_user_id"] == "DEFAULT-USER"


def test_unknown_or_another_apps_end_user_is_not_found(app, client):
    other = EndUser.objects.create(app=make_app(), session_id="alice")
    for end_user_id in (other.id, uuid.uuid4()):
        assert_error(client.get(f"/v1/end-users/{end_user_id}"), 404, "end_user_not_found", "End user not found.")
    assert_error(client.get("/v1/end-users/not-a-uuid"), 404, "not_found")


def test_needs_the_app_key_and_get(app, client):
    end_user = EndUser.objects.create(app=app, session_id="alice")
    assert_error(DifyClient(None).get(f"/v1/end-users/{end_user.id}"), 401, "unauthorized")
    assert_error(client.post(f"/v1/end-users/{end_user.id}", {}), 405, "method_not_allowed")
