"""Issue 15, item 2: `is_staff` alone executed commands on the host. The attacks, over HTTP against a real daphne with
token auth: a staff user with no permission tries to create a stdio MCP server, test one, approve run_shell, edit an
LLM config and read the audit log, and is refused every time with nothing run or changed; a user granted the right
permissions does the same things successfully."""
from __future__ import annotations

import httpx
import pytest
from django.contrib.auth.models import Permission
from rest_framework.authtoken.models import Token

from agentcore.models import AgentApp, Approval, MCPServer
from agentcore.tools.policies import tool_policy_update
from llmconfigs.models import LLMConfig
from tests.fakes.upstream import Reply, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _http(server, user) -> httpx.Client:
    token, _ = Token.objects.get_or_create(user=user)
    return httpx.Client(base_url=server.base_url, headers={"Authorization": f"Token {token.key}"}, timeout=60)


def _grant(user, *names: str):
    for name in names:
        app_label, codename = name.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    return user


@pytest.fixture
def shell_request(default_llm_config, plain_user, fake_upstream, daphne_server, tmp_path):
    """A run_shell call waiting for its approval: asked for by a plain user through the REST chat."""
    AgentApp.objects.create(name="OpsAgent", mode=AgentApp.Mode.AGENT_CHAT)
    tool_policy_update(name="run_shell", enabled=True)
    marker = tmp_path / "shell-ran.txt"
    fake_upstream.script(Reply(tool_calls=[ToolCall("run_shell", {"command": f"echo pwned > {marker}"})]),
                         Reply(text="Done."))
    with _http(daphne_server, plain_user) as client:
        body = client.post("/api/agent/chat/", json={"message": "run it"}).json()
    assert body["status"] == "paused", body
    return body["pending_approvals"][0]["id"], marker


def test_a_staff_user_without_permissions_can_not_create_a_stdio_mcp_server(daphne_server, bare_staff_user,
                                                                             tmp_path):
    marker = tmp_path / "mcp-ran.txt"
    attack = {"name": "backdoor", "transport": "stdio", "command": "/bin/sh", "args": ["-c", f"touch {marker}"]}
    with _http(daphne_server, bare_staff_user) as client:
        assert client.post("/api/mcp-servers/", json=attack).status_code == 403
        # Nor smuggle one in by turning an HTTP server into a stdio one.
        web = MCPServer.objects.create(name="web", transport="streamable_http", url="http://127.0.0.1:9/mcp")
        assert client.patch(f"/api/mcp-servers/{web.pk}/", json={"transport": "stdio", "command": "/bin/sh"}
                            ).status_code == 403
    assert not MCPServer.objects.filter(transport="stdio").exists() and not marker.exists()


def test_a_staff_user_without_permissions_can_not_test_a_stdio_mcp_server(daphne_server, bare_staff_user,
                                                                          tmp_path):
    marker = tmp_path / "mcp-ran.txt"
    server = MCPServer.objects.create(name="probe", command="/bin/sh", args=["-c", f"touch {marker}"])
    with _http(daphne_server, bare_staff_user) as client:
        assert client.post(f"/api/mcp-servers/{server.pk}/test/").status_code == 403
        # Holding the MCP server model permission is still not enough for a command line.
        _grant(bare_staff_user, "agentcore.change_mcpserver")
        refused = client.post(f"/api/mcp-servers/{server.pk}/test/")
        assert refused.status_code == 403 and "manage_mcp_stdio" in refused.json()["detail"]
    assert not marker.exists()


def test_a_user_with_manage_mcp_stdio_creates_and_tests_a_stdio_server(daphne_server, plain_user, tmp_path):
    marker = tmp_path / "mcp-ran.txt"
    _grant(plain_user, "agentcore.add_mcpserver", "agentcore.change_mcpserver", "agentcore.manage_mcp_stdio")
    with _http(daphne_server, plain_user) as client:
        created = client.post("/api/mcp-servers/", json={
            "name": "probe", "transport": "stdio", "command": "/bin/sh", "args": ["-c", f"touch {marker}"]})
        assert created.status_code == 201, created.text
        tested = client.post(f"/api/mcp-servers/{created.json()['id']}/test/")
    assert tested.status_code == 200 and tested.json()["ok"] is False  # not an MCP server, but it was started
    assert marker.exists()


def test_a_staff_user_without_permissions_can_not_approve_run_shell(daphne_server, bare_staff_user, plain_user,
                                                                    shell_request):
    approval_id, marker = shell_request
    with _http(daphne_server, bare_staff_user) as client:
        assert client.post(f"/api/approvals/{approval_id}/approve/", json={}).status_code == 404
        assert client.get("/api/approvals/").json()["count"] == 0
    # The user who asked may not approve their own shell command either.
    with _http(daphne_server, plain_user) as client:
        assert client.post(f"/api/approvals/{approval_id}/approve/", json={}).status_code == 403
    assert Approval.objects.get(pk=approval_id).status == "pending" and not marker.exists()


def test_a_user_with_approve_shell_approves_run_shell(daphne_server, django_user_model, shell_request):
    approval_id, marker = shell_request
    approver = _grant(django_user_model.objects.create_user(username="oncall"),
                      "agentcore.change_approval", "agentcore.approve_shell")
    with _http(daphne_server, approver) as client:
        response = client.post(f"/api/approvals/{approval_id}/approve/", json={"comment": "ok"})
    assert response.status_code == 200, response.text
    assert response.json()["approval"]["decided_by"] == "oncall"
    assert marker.read_text().strip() == "pwned"


def test_a_staff_user_without_permissions_can_not_edit_configs(daphne_server, bare_staff_user, make_llm_config):
    config = make_llm_config(is_active=True)
    other = make_llm_config(default=True)
    with _http(daphne_server, bare_staff_user) as client:
        attempts = [
            client.post("/api/llm-configs/", json={"name": "x", "provider": "openai", "model_name": "m"}),
            client.patch(f"/api/llm-configs/{config.pk}/", json={"base_url": "http://127.0.0.1:1/v1"}),
            client.post(f"/api/llm-configs/{config.pk}/set-default/"),
            client.post(f"/api/llm-configs/{other.pk}/deactivate/"),
            client.post(f"/api/llm-configs/{config.pk}/test/"),
            client.delete(f"/api/llm-configs/{config.pk}/"),
        ]
        # Reading them, keys masked, stays open to every user.
        assert client.get("/api/llm-configs/").status_code == 200
    assert [response.status_code for response in attempts] == [403] * len(attempts)
    assert LLMConfig.objects.count() == 2 and LLMConfig.objects.get(pk=other.pk).is_default


def test_a_user_with_change_llmconfig_edits_configs(daphne_server, plain_user, make_llm_config):
    config = make_llm_config()
    _grant(plain_user, "llmconfigs.change_llmconfig")
    with _http(daphne_server, plain_user) as client:
        assert client.patch(f"/api/llm-configs/{config.pk}/", json={"temperature": 0.2}).status_code == 200
    assert LLMConfig.objects.get(pk=config.pk).temperature == 0.2


def test_a_staff_user_without_permissions_can_not_read_the_audit_log(daphne_server, bare_staff_user,
                                                                     django_user_model, make_llm_config):
    make_llm_config()
    with _http(daphne_server, bare_staff_user) as client:
        assert client.get("/api/audit-logs/").status_code == 403
    auditor = _grant(django_user_model.objects.create_user(username="auditor"), "llmconfigs.view_auditlog")
    with _http(daphne_server, auditor) as client:
        assert client.get("/api/audit-logs/").json()["count"] >= 1
