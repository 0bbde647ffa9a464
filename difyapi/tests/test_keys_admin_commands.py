"""App keys outside the API: the admin (key shown once, then masked; revoke; read-only Dify rows), the create_app
command (idempotent with --key) and the seed hook."""
from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from agentcore.models import AgentApp
from difyapi.auth import api_key_hash
from difyapi.models import ApiKey, EndUser
from difyapi.services import dify_seed_demo_key
from difyapi.tests.factories import DifyClient, assert_error, make_app, make_key

pytestmark = pytest.mark.django_db

KEY_RE = re.compile(r"app-[A-Za-z0-9_-]{20,}")


def test_admin_creates_a_key_shows_it_once_then_only_the_mask(admin_client):
    app = make_app(name="demo")
    response = admin_client.post("/admin/difyapi/apikey/add/", {"app": str(app.pk), "name": "ci"})
    key = ApiKey.objects.get(app=app)
    # Post/redirect/get: the page showing the key is a GET, so reloading it cannot create a second key.
    assert response.status_code == 302 and response["Location"] == f"/admin/difyapi/apikey/{key.pk}/created/"
    assert not KEY_RE.search(str(dict(admin_client.session)))  # sealed, not in plain text
    response = admin_client.get(response["Location"])
    page = response.content.decode()
    [raw] = KEY_RE.findall(page)
    assert "no-store" in response["Cache-Control"]
    assert key.key_hash == api_key_hash(raw) and key.last4 == raw[-4:] and key.name == "ci"
    assert DifyClient(raw).get("/v1/info").status_code == 200

    reload = admin_client.get(f"/admin/difyapi/apikey/{key.pk}/created/")
    assert reload.status_code == 200 and "cannot be shown again" in reload.content.decode()
    assert ApiKey.objects.filter(app=app).count() == 1

    for url in ("/admin/difyapi/apikey/", f"/admin/difyapi/apikey/{key.pk}/change/"):
        page = admin_client.get(url).content.decode()
        assert raw not in page and key.key_hash not in page
        assert f"app-…{raw[-4:]}" in page


def test_admin_revoke_action(admin_client):
    app = make_app()
    raw = make_key(app)
    client = DifyClient(raw)
    assert client.get("/v1/info").status_code == 200
    key = ApiKey.objects.get(app=app)
    response = admin_client.post(
        "/admin/difyapi/apikey/", {"action": "revoke", "_selected_action": [str(key.pk)]}, follow=True
    )
    assert "Revoked 1 API key(s)." in response.content.decode()
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert_error(client.get("/v1/info"), 401, "unauthorized", "Access token is invalid")


def test_admin_revoke_action_needs_the_change_permission(client, django_user_model, grant):
    """Seeing the key list is not enough to revoke keys: the action is offered, and performed, only with
    difyapi.change_apikey (a view-only staff user's POST changes nothing)."""
    app = make_app()
    raw = make_key(app)
    key = ApiKey.objects.get(app=app)
    viewer = grant(django_user_model.objects.create_user(username="viewer", password="pw-viewer-1", is_staff=True),
                   "difyapi.view_apikey")
    client.force_login(viewer)
    page = client.get("/admin/difyapi/apikey/")
    assert page.status_code == 200 and 'value="revoke"' not in page.content.decode()
    client.post("/admin/difyapi/apikey/", {"action": "revoke", "_selected_action": [str(key.pk)]})
    key.refresh_from_db()
    assert key.revoked_at is None
    assert DifyClient(raw).get("/v1/info").status_code == 200

    changer = grant(viewer, "difyapi.change_apikey")
    client.force_login(changer)
    assert 'value="revoke"' in client.get("/admin/difyapi/apikey/").content.decode()
    client.post("/admin/difyapi/apikey/", {"action": "revoke", "_selected_action": [str(key.pk)]})
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_admin_keys_cannot_be_deleted_and_dify_rows_are_read_only(admin_client):
    app = make_app()
    make_key(app)
    key = ApiKey.objects.get(app=app)
    assert admin_client.get(f"/admin/difyapi/apikey/{key.pk}/delete/").status_code == 403
    end_user = EndUser.objects.create(app=app, session_id="alice")
    assert admin_client.get("/admin/difyapi/enduser/").status_code == 200
    assert admin_client.get("/admin/difyapi/enduser/add/").status_code == 403
    response = admin_client.post(f"/admin/difyapi/enduser/{end_user.pk}/change/", {"session_id": "mallory"})
    assert response.status_code == 403
    end_user.refresh_from_db()
    assert end_user.session_id == "alice"
    for model in ("uploadfile", "feedback"):
        assert admin_client.get(f"/admin/difyapi/{model}/").status_code == 200


def run_create_app(*args: str) -> str:
    out = StringIO()
    call_command("create_app", *args, stdout=out, stderr=StringIO())
    return out.getvalue().strip()


def test_create_app_prints_a_working_key():
    raw = run_create_app("--name", "Ops Bot", "--mode", "agent-chat")
    assert KEY_RE.fullmatch(raw)
    app = AgentApp.objects.get(name="Ops Bot")
    assert app.mode == "agent-chat"
    assert DifyClient(raw).get("/v1/info").json()["mode"] == "agent-chat"


def test_create_app_with_key_is_idempotent():
    key = "app-automation-key-0123456789"
    assert run_create_app("--name", "Auto", "--mode", "chat", "--key", key) == key
    assert run_create_app("--name", "Auto", "--mode", "chat", "--key", key) == key
    assert AgentApp.objects.filter(name="Auto").count() == 1
    assert ApiKey.objects.filter(key_hash=api_key_hash(key)).count() == 1
    assert DifyClient(key).get("/v1/info").json()["name"] == "Auto"


def test_create_app_reuses_the_app_by_name_with_a_new_key():
    first = run_create_app("--name", "Reuse", "--mode", "chat")
    second = run_create_app("--name", "Reuse", "--mode", "chat")
    assert first != second
    assert AgentApp.objects.filter(name="Reuse").count() == 1
    assert ApiKey.objects.filter(app__name="Reuse").count() == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "M", "--mode", "agent-chat"], "already exists with mode 'chat'"),
        (["--name", "M", "--mode", "chat", "--key", "sk-not-an-app-key-123456"], "must start with 'app-'"),
        (["--name", "  ", "--mode", "chat"], "--name must not be blank"),
    ],
)
def test_create_app_refuses_bad_input(args, message):
    make_app(name="M", mode="chat")
    with pytest.raises(CommandError, match=message):
        run_create_app(*args)


def test_create_app_refuses_another_apps_key():
    key = "app-shared-key-0123456789abc"
    run_create_app("--name", "One", "--mode", "chat", "--key", key)
    with pytest.raises(CommandError, match="another app"):
        run_create_app("--name", "Two", "--mode", "chat", "--key", key)
    assert not AgentApp.objects.filter(name="Two").exists()  # nothing half-written


def test_seed_hook_gives_a_key_the_first_time_only():
    app = make_app(name="demo")
    raw = dify_seed_demo_key(app=app)
    assert raw and KEY_RE.fullmatch(raw)
    assert DifyClient(raw).get("/v1/info").status_code == 200
    assert dify_seed_demo_key(app=app) is None
    assert ApiKey.objects.filter(app=app).count() == 1


def test_the_created_page_shows_no_key_after_its_time_or_to_another_admin(admin_client, django_user_model, settings,
                                                                         monkeypatch):
    import time

    from django.test import Client

    from difyapi import admin as dify_admin

    app = make_app(name="late")
    location = admin_client.post("/admin/difyapi/apikey/add/", {"app": str(app.pk), "name": "x"})["Location"]
    sealed = next(value for name, value in admin_client.session.items() if name.startswith("difyapi:created-key:"))
    assert dify_admin._created_key_open(sealed).startswith("app-")
    now = time.time()
    # Past the time to live and the clock skew the signer allows.
    monkeypatch.setattr(time, "time", lambda: now + dify_admin.CREATED_KEY_TTL_SECONDS + 120)
    assert dify_admin._created_key_open(sealed) is None
    monkeypatch.undo()
    settings.FIELD_ENCRYPTION_KEY = "another-field-key"
    assert dify_admin._created_key_open(sealed) is None
    assert dify_admin._created_key_open("not base64!") is None
    other = django_user_model.objects.create_superuser("other", "o@example.com", "pw-other-123")
    client = Client()
    client.force_login(other)
    assert KEY_RE.findall(client.get(location).content.decode()) == []
