"""The audit trail of what an attacker or a careless admin would change: one row per change, written by the services
(so the admin, the REST API and the management commands all get it), naming who (actor), from where (source, IP,
user agent), what (action, target) and never a secret."""
from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.forms.models import model_to_dict

from agentcore.limits import LIMIT_FIELDS
from agentcore.models import AgentApp, MCPServer, ToolPolicy
from difyapi.models import ApiKey
from llmconfigs.models import AuditLog
from tests.fixtures import client_for

pytestmark = pytest.mark.django_db

UA = "audit-trail-test/1.0"
IP = "10.20.30.40"
HEADER_SECRET = "Bearer mcp-header-secret-0099"


def _request_meta() -> dict:
    return {"REMOTE_ADDR": IP, "HTTP_USER_AGENT": UA}


def _only_row(**filters) -> AuditLog:
    [row] = AuditLog.objects.filter(**filters)
    return row


def _assert_row(row: AuditLog, *, actor, source: str, action: str, target, secrets: tuple[str, ...] = ()) -> None:
    assert (row.actor, row.source, row.action) == (actor, source, action)
    assert (row.target_type, row.target_id) == (target._meta.label, str(target.pk))
    if source in ("admin", "api"):
        assert (row.ip_address, row.user_agent) == (IP, UA)
    text = json.dumps(model_to_dict(row), default=str)
    for secret in secrets:
        assert secret not in text, f"{secret!r} in the audit row"


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser(username="root", password="pw-root-123", email="r@x.io")


@pytest.fixture
def admin_browser(client, admin_user):
    client.force_login(admin_user)
    return client


# ----- tool policies -----


def test_enabling_run_shell_over_rest_is_audited(staff_user):
    response = client_for(staff_user).patch("/api/tools/run_shell/", {"enabled": True}, format="json",
                                            **_request_meta())
    assert response.status_code == 200, response.content
    row = _only_row(target_type="agentcore.ToolPolicy")
    _assert_row(row, actor=staff_user, source="api", action="update", target=ToolPolicy.objects.get(name="run_shell"))
    assert row.target_repr == "run_shell" and row.changes == {"enabled": {"old": False, "new": True}}


def test_approval_rule_changed_in_the_admin_is_audited(admin_browser, admin_user):
    from agentcore.tools.policies import tool_policy_add_builtins

    tool_policy_add_builtins()
    policy = ToolPolicy.objects.get(name="http_check")
    response = admin_browser.post(f"/admin/agentcore/toolpolicy/{policy.pk}/change/",
                                  {"enabled": "on", "requires_approval": "on", "approver": "staff"}, **_request_meta())
    assert response.status_code == 302, response.content.decode()[:2000]
    row = _only_row(target_type="agentcore.ToolPolicy")
    _assert_row(row, actor=admin_user, source="admin", action="update", target=policy)
    assert row.changes == {"requires_approval": {"old": False, "new": True},
                           "approver": {"old": "requester", "new": "staff"}}


def test_a_policy_saved_unchanged_writes_no_row(staff_user):
    client_for(staff_user).patch("/api/tools/current_time/", {"enabled": True}, format="json")
    assert not AuditLog.objects.filter(target_type="agentcore.ToolPolicy").exists()


# ----- MCP servers -----


def test_mcp_server_create_change_delete_test_are_audited_with_secrets_masked(staff_user):
    client = client_for(staff_user)
    body = {"name": "ops", "transport": "streamable_http", "url": "http://127.0.0.1:9/mcp",
            "headers": {"Authorization": HEADER_SECRET}}
    created = client.post("/api/mcp-servers/", body, format="json", **_request_meta())
    assert created.status_code == 201, created.content
    server = MCPServer.objects.get(name="ops")
    client.patch(f"/api/mcp-servers/{server.pk}/", {"headers": {"Authorization": HEADER_SECRET + "-new"}},
                 format="json", **_request_meta())
    client.post(f"/api/mcp-servers/{server.pk}/test/", **_request_meta())
    client.delete(f"/api/mcp-servers/{server.pk}/", **_request_meta())

    rows = list(AuditLog.objects.filter(target_type="agentcore.MCPServer").order_by("id"))
    assert [row.action for row in rows] == ["create", "update", "test_connection", "delete"]
    for row in rows:
        _assert_row(row, actor=staff_user, source="api", action=row.action, target=server,
                    secrets=(HEADER_SECRET, "mcp-header-secret"))
    assert rows[1].changes["headers"] == {"changed": True}


# ----- agent apps -----


def _app_form(**fields) -> dict:
    form = {"name": "Team app", "mode": "agent-chat", "description": "", "system_prompt": "Be brief.",
            "opening_statement": "", "suggested_questions": "[]", "max_iterations": "8", "max_active_requests": "0",
            "user_input_form": "[]", "file_upload": "{}", "is_active": "on", "network_allow_hosts": "[]",
            "network_allow_networks": "[]", "network_allow_ports": "[]", **dict.fromkeys(LIMIT_FIELDS, "0")}
    form.update(fields)
    return form


def test_agent_app_create_change_delete_in_the_admin_are_audited(admin_browser, admin_user):
    added = admin_browser.post("/admin/agentcore/agentapp/add/", _app_form(), **_request_meta())
    assert added.status_code == 302, added.content.decode()[:3000]
    app = AgentApp.objects.get(name="Team app")
    admin_browser.post(f"/admin/agentcore/agentapp/{app.pk}/change/",
                       _app_form(system_prompt="Be thorough.", max_iterations="12"), **_request_meta())
    admin_browser.post(f"/admin/agentcore/agentapp/{app.pk}/delete/", {"post": "yes"}, **_request_meta())

    rows = list(AuditLog.objects.filter(target_type="agentcore.AgentApp").order_by("id"))
    assert [row.action for row in rows] == ["create", "update", "delete"]
    for row in rows:
        _assert_row(row, actor=admin_user, source="admin", action=row.action, target=app)
    assert rows[0].changes["name"] == {"new": "Team app"}
    assert rows[1].changes == {"system_prompt": {"old": "Be brief.", "new": "Be thorough."},
                               "max_iterations": {"old": 8, "new": 12}}
    assert not AgentApp.objects.filter(pk=app.pk).exists()


def test_bulk_delete_of_apps_in_the_admin_is_audited_per_app(admin_browser, admin_user):
    apps = [AgentApp.objects.create(name=f"bulk-{n}") for n in (1, 2)]
    admin_browser.post("/admin/agentcore/agentapp/", {"action": "delete_selected", "post": "yes",
                                                      "_selected_action": [str(a.pk) for a in apps]})
    assert sorted(AuditLog.objects.filter(action="delete", target_type="agentcore.AgentApp")
                  .values_list("target_repr", flat=True)) == ["bulk-1", "bulk-2"]


# ----- API keys -----


def test_api_key_create_and_revoke_in_the_admin_are_audited_without_the_key(admin_browser, admin_user):
    import re

    app = AgentApp.objects.create(name="keyed")
    # The key is shown on the page the add form redirects to.
    page = admin_browser.post("/admin/difyapi/apikey/add/", {"app": str(app.pk), "name": "ci"}, follow=True,
                              **_request_meta()).content.decode()
    [raw] = re.findall(r"app-[A-Za-z0-9_-]{20,}", page)
    key = ApiKey.objects.get(app=app)
    admin_browser.post("/admin/difyapi/apikey/", {"action": "revoke", "_selected_action": [str(key.pk)]},
                       **_request_meta())
    admin_browser.post("/admin/difyapi/apikey/", {"action": "revoke", "_selected_action": [str(key.pk)]})

    rows = list(AuditLog.objects.filter(target_type="difyapi.ApiKey").order_by("id"))
    assert [row.action for row in rows] == ["create", "revoke"]  # revoking a revoked key records nothing
    for row in rows:
        _assert_row(row, actor=admin_user, source="admin", action=row.action, target=key,
                    secrets=(raw, raw[:-4], key.key_hash))
        assert row.target_repr == f"app-…{raw[-4:]}"
    assert rows[0].changes["app"] == {"new": "keyed"}


def test_create_app_command_audits_the_app_and_its_key(db):
    out = StringIO()
    call_command("create_app", "--name", "from-cli", "--mode", "chat", stdout=out, stderr=StringIO())
    raw = out.getvalue().strip()
    app, key = AgentApp.objects.get(name="from-cli"), ApiKey.objects.get(app__name="from-cli")
    app_row = _only_row(target_type="agentcore.AgentApp")
    key_row = _only_row(target_type="difyapi.ApiKey")
    _assert_row(app_row, actor=None, source="command", action="create", target=app)
    _assert_row(key_row, actor=None, source="command", action="create", target=key, secrets=(raw, key.key_hash))

    call_command("create_app", "--name", "from-cli", "--mode", "chat", "--key", raw, stdout=StringIO(),
                 stderr=StringIO())
    assert AuditLog.objects.count() == 2  # the idempotent rerun created nothing, so it recorded nothing


def test_deleting_policies_in_the_admin_is_audited_with_what_they_said(admin_browser, admin_user):
    from agentcore.tools.policies import tool_policy_add_builtins

    tool_policy_add_builtins()
    shell = ToolPolicy.objects.get(name="run_shell")
    admin_browser.post(f"/admin/agentcore/toolpolicy/{shell.pk}/delete/", {"post": "yes"}, **_request_meta())
    others = list(ToolPolicy.objects.filter(name__in=["http_check", "dns_lookup"]))
    admin_browser.post("/admin/agentcore/toolpolicy/", {"action": "delete_selected", "post": "yes",
                                                        "_selected_action": [str(p.pk) for p in others]})

    row = _only_row(action="delete", target_repr="run_shell")
    _assert_row(row, actor=admin_user, source="admin", action="delete", target=shell)
    assert row.changes == {"enabled": {"old": False}, "requires_approval": {"old": True}, "approver": {"old": "staff"}}
    assert sorted(AuditLog.objects.filter(action="delete", target_type="agentcore.ToolPolicy")
                  .values_list("target_repr", flat=True)) == ["dns_lookup", "http_check", "run_shell"]
