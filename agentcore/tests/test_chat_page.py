"""The chat page (/chat/) as the server sends it: who may open it, where `/` leads, the policy it is served under and
the starting data it embeds (no key, ranges from the provider registry, approval rights). The page at work in a
browser is tests/browser/test_chat_browser.py."""
from __future__ import annotations

import json
import re

import pytest
from django.conf import settings
from django.test import Client

from agentcore.models import AgentApp

pytestmark = pytest.mark.django_db


def _data(response) -> dict:
    match = re.search(r'<script id="chat-data" type="application/json">(.*?)</script>', response.content.decode(),
                      re.S)
    assert match, "the page embeds its starting data"
    return json.loads(match.group(1))


def test_anonymous_visitors_are_sent_to_the_login_page():
    client = Client()
    home = client.get("/")
    assert home.status_code == 302 and home["Location"] == "/login/?next=%2Fchat%2F"
    page = client.get("/chat/")
    assert page.status_code == 302 and page["Location"].startswith("/login/?next=/chat/")


def test_any_active_user_signs_in_for_the_chat_page_with_the_admins_brakes_on_guessing(plain_user, settings):
    """The admin's login admits staff only; the chat page's admits any active user, and shares the admin login's
    lockout after repeated failures (same counters, same message)."""
    client = Client()
    assert client.get("/login/").status_code == 200
    # The admin refuses this user: not staff.
    refused = client.post("/admin/login/?next=/admin/", {"username": "alice", "password": "pw-alice-123"})
    assert refused.status_code == 200 and "_auth_user_id" not in client.session
    signed_in = client.post("/login/", {"username": "alice", "password": "pw-alice-123", "next": "/chat/"})
    assert signed_in.status_code == 302 and signed_in["Location"] == "/chat/"
    assert client.get("/chat/").status_code == 200
    assert client.post("/logout/").status_code == 302
    assert client.get("/chat/").status_code == 302

    settings.ADMIN_LOGIN_FAILURE_LIMIT = 2
    for _ in range(2):
        wrong = client.post("/login/", {"username": "alice", "password": "wrong-password"})
        assert wrong.status_code == 200 and "Please enter a correct username and password" in wrong.content.decode()
    locked = client.post("/login/", {"username": "alice", "password": "pw-alice-123"})
    assert "Too many failed login attempts" in locked.content.decode()
    assert "_auth_user_id" not in client.session


def test_the_right_password_at_the_admin_is_no_failure_for_a_user_who_is_not_staff(plain_user, settings):
    """The admin refuses a non-staff user with the right password; that must not lock the user out of /login/."""
    settings.ADMIN_LOGIN_FAILURE_LIMIT = 2
    client = Client()
    for _ in range(3):
        refused = client.post("/admin/login/?next=/admin/", {"username": "alice", "password": "pw-alice-123"})
        assert refused.status_code == 200 and "Too many failed login attempts" not in refused.content.decode()
    signed_in = client.post("/login/", {"username": "alice", "password": "pw-alice-123", "next": "/chat/"})
    assert signed_in.status_code == 302 and signed_in["Location"] == "/chat/"


def test_signed_in_users_land_on_the_chat_page(plain_user):
    client = Client()
    client.force_login(plain_user)
    assert client.get("/")["Location"] == "/chat/"
    response = client.get("/chat/")
    assert response.status_code == 200
    assert response.templates[0].name == "chat/index.html"
    assert "csrftoken" in response.cookies  # the page's REST calls send it back
    assert client.post("/chat/").status_code == 405


def test_the_page_runs_under_the_csp_without_inline_script_or_style(plain_user):
    client = Client()
    client.force_login(plain_user)
    response = client.get("/chat/")
    assert response["Content-Security-Policy"] == settings.CONTENT_SECURITY_POLICY
    html = response.content.decode()
    # Scripts come from files; the one inline <script> is JSON data, which a browser never runs.
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert [attributes for attributes, body in scripts if body.strip()] == [' id="chat-data" type="application/json"']
    assert any('src="/static/agentcore/chat.js"' in attributes for attributes, _ in scripts)
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"<[^>]*\son[a-z]+\s*=", html, re.I)  # no inline event handler


def test_the_starting_data_has_models_with_their_provider_ranges_and_no_key(plain_user, make_llm_config, grant):
    zhipu = make_llm_config(name="glm", provider="zhipu", model_name="glm-4-flash", temperature=0.5, top_p=0.9)
    default = make_llm_config(name="main", default=True)
    make_llm_config(name="off", is_active=False)
    make_llm_config(name="vectors", is_embedding=True, model_name="text-embedding-3-small")
    AgentApp.objects.create(name="ops", opening_statement="Hi <b>there</b>")
    AgentApp.objects.create(name="retired", is_active=False)
    AgentApp.objects.create(name="runbooks", mode="completion")  # no conversations: not offered
    client = Client()
    client.force_login(plain_user)
    response = client.get("/chat/")
    data = _data(response)
    assert [config["name"] for config in data["configs"]] == ["main", "glm"]
    assert data["configs"][0]["id"] == str(default.pk) and data["configs"][0]["is_default"] is True
    assert data["providers"]["zhipu"]["temperature"] == {"low": 0.0, "high": 1.0, "low_open": True,
                                                        "high_open": False, "text": "(0, 1]"}
    assert data["providers"]["zhipu"]["top_p"]["text"] == "(0, 1)"
    assert [app["name"] for app in data["apps"]] == ["ops"]
    assert data["routes"] == []
    for config in (zhipu, default):
        assert config.api_key not in response.content.decode()
    assert "api_key" not in response.content.decode()
    # The data is JSON in an inert element: markup in it is escaped.
    assert "Hi <b>there</b>" not in response.content.decode() and data["apps"][0]["opening_statement"] == (
        "Hi <b>there</b>")
    assert data["may_decide"] == {"command": False, "staff": False}
    allowed = grant(plain_user, "agentcore.approve_shell", "agentcore.change_approval")
    client.force_login(allowed)
    assert _data(client.get("/chat/"))["may_decide"] == {"command": True, "staff": True}


def test_the_admin_is_titled_opsagent_and_links_to_the_chat(django_user_model):
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("root", "r@example.com", "pw-root-123"))
    page = client.get("/admin/").content.decode()
    assert '<div id="site-name"><a href="/admin/">OpsAgent</a></div>' in page
    assert "<title>Models, agent apps, keys and conversations | OpsAgent admin</title>" in page
    assert '<a href="/">View site</a>' in page
    assert "LLM configurations" in page and "Llm" not in page


def test_the_starting_data_lists_pools_with_their_members_in_order(plain_user, make_llm_config):
    low = make_llm_config(name="b-low", route="fast", priority=0)
    high = make_llm_config(name="a-high", route="fast", priority=5)
    second = make_llm_config(name="c-also-high", route="fast", priority=5)
    make_llm_config(name="alone")
    make_llm_config(name="off", route="fast", is_active=False)
    client = Client()
    client.force_login(plain_user)
    data = _data(client.get("/chat/"))
    assert data["routes"] == [{"name": "fast", "members": [str(high.pk), str(second.pk), str(low.pk)]}]


def test_the_admin_link_follows_permissions_not_the_staff_flag(plain_user, bare_staff_user, staff_user):
    for user, linked in ((plain_user, False), (bare_staff_user, False), (staff_user, True)):
        client = Client()
        client.force_login(user)
        html = client.get("/chat/").content.decode()
        assert ('href="/admin/"' in html) is linked, user.username


def test_a_request_without_an_app_gets_the_pages_first_app_never_a_disabled_one(plain_user, user_client,
                                                                                 default_llm_config):
    """The page offers active apps with conversations; the REST endpoints it calls (a session without app_id, a
    chat without one) reach no other app than those."""
    from agentcore.models import Session

    AgentApp.objects.create(name="retired", is_active=False)
    AgentApp.objects.create(name="runbooks", mode="completion")
    client = Client()
    client.force_login(plain_user)
    assert _data(client.get("/chat/"))["apps"] == []
    response = user_client.post("/api/sessions/", {}, format="json")
    assert response.status_code == 404 and response.json()["detail"] == "Agent app not found."
    response = user_client.post("/api/agent/chat/", {"message": "hi"}, format="json")
    assert response.status_code == 404 and response.json()["detail"] == "Agent app not found."
    assert not Session.objects.exists() and AgentApp.objects.count() == 2  # no demo app slipped in either

    ops = AgentApp.objects.create(name="ops")
    assert [app["id"] for app in _data(client.get("/chat/"))["apps"]] == [str(ops.pk)]
    response = user_client.post("/api/sessions/", {}, format="json")
    assert response.status_code == 201 and response.json()["app_id"] == str(ops.pk)
