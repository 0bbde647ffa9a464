"""One test per permission rule of the agent's REST API: without the permission the call is refused (403, or 404 for
someone else's object) and nothing changes; granted the permission, the same user gets through. is_staff counts for
nothing."""
from __future__ import annotations

import sys

import pytest

from agentcore.models import Approval, MCPServer, Session, ToolPolicy
from agentcore.tools.policies import tool_policy_update
from tests.fakes.upstream import Reply, ToolCall
from tests.fixtures import client_for

pytestmark = pytest.mark.django_db

TOKEN_ARG = "--token=ghp_secret_token_in_args_1234567890"


@pytest.fixture
def http_server(db):
    return MCPServer.objects.create(name="http-ops", transport="streamable_http", url="http://127.0.0.1:9/mcp",
                                    headers={"Authorization": "Bearer header-secret-value-123"})


@pytest.fixture
def stdio_server(db):
    return MCPServer.objects.create(name="stdio-ops", transport="stdio", command="/nonexistent/mcp-server",
                                    args=[TOKEN_ARG], env={"API_TOKEN": "env-secret-value-123"})


# ----- tools -----


def test_changing_a_tool_policy_needs_change_toolpolicy(bare_staff_user, grant):
    assert client_for(bare_staff_user).patch("/api/tools/http_check/", {"enabled": False}, format="json"
                                          ).status_code == 403
    assert ToolPolicy.objects.filter(name="http_check", enabled=False).count() == 0
    user = grant(bare_staff_user, "agentcore.change_toolpolicy")
    assert client_for(user).patch("/api/tools/http_check/", {"enabled": False}, format="json").status_code == 200


# ----- MCP servers -----


@pytest.mark.parametrize("path", ["/api/mcp-servers/", "/api/mcp-servers/{id}/"])
def test_reading_mcp_servers_needs_view_mcpserver(bare_staff_user, grant, http_server, path):
    path = path.format(id=http_server.id)
    assert client_for(bare_staff_user).get(path).status_code == 403
    assert client_for(grant(bare_staff_user, "agentcore.view_mcpserver")).get(path).status_code == 200


def test_adding_an_http_server_needs_add_mcpserver(bare_staff_user, grant):
    body = {"name": "web", "transport": "streamable_http", "url": "http://127.0.0.1:9/mcp"}
    assert client_for(bare_staff_user).post("/api/mcp-servers/", body, format="json").status_code == 403
    assert not MCPServer.objects.exists()
    user = grant(bare_staff_user, "agentcore.add_mcpserver")
    assert client_for(user).post("/api/mcp-servers/", body, format="json").status_code == 201


def test_adding_a_stdio_server_needs_manage_mcp_stdio_too(bare_staff_user, grant):
    body = {"name": "cmd", "transport": "stdio", "command": "/bin/true"}
    user = grant(bare_staff_user, "agentcore.add_mcpserver")
    refused = client_for(user).post("/api/mcp-servers/", body, format="json")
    assert refused.status_code == 403 and "manage_mcp_stdio" in refused.json()["detail"]
    assert not MCPServer.objects.exists()
    user = grant(user, "agentcore.manage_mcp_stdio")
    assert client_for(user).post("/api/mcp-servers/", body, format="json").status_code == 201


def test_changing_an_http_server_needs_change_mcpserver(bare_staff_user, grant, http_server):
    path = f"/api/mcp-servers/{http_server.id}/"
    assert client_for(bare_staff_user).patch(path, {"enabled": False}, format="json").status_code == 403
    user = grant(bare_staff_user, "agentcore.change_mcpserver")
    assert client_for(user).patch(path, {"enabled": False}, format="json").status_code == 200
    assert not MCPServer.objects.get(pk=http_server.pk).enabled


@pytest.mark.parametrize("body", [{"enabled": False}, {"args": ["--other"]}])
def test_changing_a_stdio_server_needs_manage_mcp_stdio_too(bare_staff_user, grant, stdio_server, body):
    path = f"/api/mcp-servers/{stdio_server.id}/"
    user = grant(bare_staff_user, "agentcore.change_mcpserver")
    assert client_for(user).patch(path, body, format="json").status_code == 403
    assert MCPServer.objects.get(pk=stdio_server.pk).args == [TOKEN_ARG]
    user = grant(user, "agentcore.manage_mcp_stdio")
    assert client_for(user).patch(path, body, format="json").status_code == 200


def test_turning_an_http_server_into_a_stdio_one_needs_manage_mcp_stdio(bare_staff_user, grant, http_server):
    path = f"/api/mcp-servers/{http_server.id}/"
    user = grant(bare_staff_user, "agentcore.change_mcpserver")
    body = {"transport": "stdio", "command": "/bin/sh", "args": ["-c", "id"]}
    assert client_for(user).patch(path, body, format="json").status_code == 403
    assert MCPServer.objects.get(pk=http_server.pk).transport == "streamable_http"


def test_deleting_an_mcp_server_needs_delete_mcpserver(bare_staff_user, grant, stdio_server):
    path = f"/api/mcp-servers/{stdio_server.id}/"
    assert client_for(bare_staff_user).delete(path).status_code == 403
    assert client_for(grant(bare_staff_user, "agentcore.delete_mcpserver")).delete(path).status_code == 204


def test_testing_an_http_server_needs_change_mcpserver(bare_staff_user, grant, http_server):
    path = f"/api/mcp-servers/{http_server.id}/test/"
    assert client_for(bare_staff_user).post(path).status_code == 403
    response = client_for(grant(bare_staff_user, "agentcore.change_mcpserver")).post(path)
    assert response.status_code == 200 and response.json()["ok"] is False  # nothing listens on port 9


@pytest.mark.django_db(transaction=True)
def test_testing_a_stdio_server_needs_manage_mcp_stdio_too(bare_staff_user, grant, tmp_path):
    marker = tmp_path / "started"
    script = tmp_path / "probe.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    server = MCPServer.objects.create(name="probe", command=sys.executable, args=[str(script)])
    user = grant(bare_staff_user, "agentcore.change_mcpserver")
    assert client_for(user).post(f"/api/mcp-servers/{server.id}/test/").status_code == 403
    assert not marker.exists()  # the command never started
    user = grant(user, "agentcore.manage_mcp_stdio")
    assert client_for(user).post(f"/api/mcp-servers/{server.id}/test/").status_code == 200
    assert marker.exists()


def test_stdio_args_are_masked_without_manage_mcp_stdio(bare_staff_user, grant, stdio_server, http_server):
    viewer = grant(bare_staff_user, "agentcore.view_mcpserver")
    masked = client_for(viewer).get("/api/mcp-servers/")
    assert masked.status_code == 200
    for secret in (TOKEN_ARG, "env-secret-value-123", "header-secret-value-123"):
        assert secret not in masked.content.decode()
    manager = grant(viewer, "agentcore.manage_mcp_stdio")
    shown = client_for(manager).get(f"/api/mcp-servers/{stdio_server.id}/").json()
    assert shown["args"] == [TOKEN_ARG]
    assert shown["env"]["API_TOKEN"] != "env-secret-value-123"  # env and headers stay masked for everyone


def test_moving_an_http_server_to_another_host_needs_its_headers_again(staff_client, http_server):
    path = f"/api/mcp-servers/{http_server.id}/"
    refused = staff_client.patch(path, {"url": "http://evil.example/mcp"}, format="json")
    assert refused.status_code == 400 and list(refused.json()) == ["headers"]
    assert MCPServer.objects.get(pk=http_server.pk).url == "http://127.0.0.1:9/mcp"
    assert staff_client.patch(path, {"url": "http://127.0.0.1:9/other"}, format="json").status_code == 200
    moved = staff_client.patch(path, {"url": "http://evil.example/mcp", "headers": {"X": "new"}}, format="json")
    assert moved.status_code == 200


# ----- other people's sessions -----


@pytest.fixture
def someone_elses_session(agent_app, django_user_model):
    owner = django_user_model.objects.create_user(username="owner")
    return Session.objects.create(app=agent_app, owner=owner, name="theirs")


@pytest.mark.parametrize("method, suffix, body, permission, allowed_status", [
    ("get", "", None, "agentcore.view_session", 200),
    ("get", "messages/", None, "agentcore.view_session", 200),
    ("patch", "", {"name": "mine now"}, "agentcore.change_session", 200),
    ("delete", "", None, "agentcore.delete_session", 204),
])
def test_someone_elses_session_needs_the_session_permission(bare_staff_user, grant, someone_elses_session, method,
                                                            suffix, body, permission, allowed_status):
    path = f"/api/sessions/{someone_elses_session.id}/{suffix}"
    call = getattr(client_for(bare_staff_user), method)
    assert (call(path, body, format="json") if body else call(path)).status_code == 404
    call = getattr(client_for(grant(bare_staff_user, permission)), method)
    assert (call(path, body, format="json") if body else call(path)).status_code == allowed_status


# ----- approvals -----


def _pause(client, fake_upstream, tool: str, arguments: dict) -> str:
    fake_upstream.script(Reply(tool_calls=[ToolCall(tool, arguments)]), Reply(text="Done."))
    body = client.post("/api/agent/chat/", {"message": "do it"}, format="json").json()
    assert body["status"] == "paused", body
    return body["pending_approvals"][0]["id"]


@pytest.mark.django_db(transaction=True)
def test_seeing_other_peoples_approvals_needs_view_approval(plain_user, bare_staff_user, grant, agent_app,
                                                            fake_upstream, counting_target):
    tool_policy_update(name="http_check", requires_approval=True)
    approval_id = _pause(client_for(plain_user), fake_upstream, "http_check", {"url": counting_target.url})
    assert client_for(bare_staff_user).get("/api/approvals/").json()["count"] == 0
    assert client_for(bare_staff_user).get(f"/api/approvals/{approval_id}/").status_code == 404
    viewer = grant(bare_staff_user, "agentcore.view_approval")
    assert [a["id"] for a in client_for(viewer).get("/api/approvals/").json()["results"]] == [approval_id]
    assert client_for(viewer).post(f"/api/approvals/{approval_id}/approve/", {}, format="json").status_code == 404
    assert counting_target.hits == 0


@pytest.mark.django_db(transaction=True)
def test_deciding_a_staff_approver_tool_needs_change_approval(plain_user, bare_staff_user, grant, agent_app,
                                                              fake_upstream, counting_target):
    tool_policy_update(name="http_check", requires_approval=True, approver="staff")
    approval_id = _pause(client_for(plain_user), fake_upstream, "http_check", {"url": counting_target.url})
    assert client_for(plain_user).post(f"/api/approvals/{approval_id}/approve/", {}, format="json").status_code == 403
    assert client_for(bare_staff_user).post(f"/api/approvals/{approval_id}/approve/", {}, format="json"
                                         ).status_code == 404
    approver = grant(bare_staff_user, "agentcore.change_approval")
    response = client_for(approver).post(f"/api/approvals/{approval_id}/approve/", {}, format="json")
    assert response.status_code == 200 and counting_target.hits == 1


@pytest.mark.django_db(transaction=True)
def test_deciding_run_shell_needs_approve_shell(plain_user, grant, agent_app, fake_upstream, tmp_path):
    tool_policy_update(name="run_shell", enabled=True)
    marker = tmp_path / "ran.txt"
    approval_id = _pause(client_for(plain_user), fake_upstream, "run_shell", {"command": f"echo hi > {marker}"})
    for decision in ("approve", "reject"):
        refused = client_for(plain_user).post(f"/api/approvals/{approval_id}/{decision}/", {}, format="json")
        assert refused.status_code == 403 and "approve_shell" in refused.json()["detail"]
    assert Approval.objects.get(pk=approval_id).status == "pending" and not marker.exists()
    shell_approver = grant(plain_user, "agentcore.approve_shell")
    response = client_for(shell_approver).post(f"/api/approvals/{approval_id}/approve/", {}, format="json")
    assert response.status_code == 200 and marker.read_text().strip() == "hi"
