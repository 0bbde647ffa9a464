"""REST tools and MCP servers: policies (staff write), secrets write-only and masked, the connection test, schema."""
from __future__ import annotations

import sys
import textwrap

import pytest

from agentcore.models import MCPServer, ToolPolicy
from tests.stored_secrets import assert_stored_encrypted

pytestmark = pytest.mark.django_db

SECRET = "tok-supersecret-value-9f2e"


def test_tools_list_shows_policies_with_run_shell_locked_down(user_client):
    response = user_client.get("/api/tools/")
    assert response.status_code == 200
    tools = {tool["name"]: tool for tool in response.json()}
    assert {"current_time", "http_check", "dns_lookup", "system_status", "run_shell", "update_plan"} <= set(tools)
    shell = tools["run_shell"]
    assert (shell["enabled"], shell["requires_approval"], shell["approver"]) == (False, True, "staff")
    assert set(shell) == {"name", "description", "source", "enabled", "requires_approval", "approver"}


def test_staff_enable_run_shell(staff_client):
    response = staff_client.patch("/api/tools/run_shell/", {"enabled": True}, format="json")
    assert response.status_code == 200, response.json()
    assert response.json()["enabled"] is True
    assert ToolPolicy.objects.get(name="run_shell").enabled


def test_run_shell_can_not_be_made_approval_free(staff_client):
    response = staff_client.patch("/api/tools/run_shell/", {"requires_approval": False}, format="json")
    assert response.status_code == 400
    assert "requires_approval" in response.json()
    response = staff_client.patch("/api/tools/run_shell/", {"approver": "requester"}, format="json")
    assert response.status_code == 400 and "approver" in response.json()


def test_users_can_not_change_policies(user_client):
    response = user_client.patch("/api/tools/http_check/", {"enabled": False}, format="json")
    assert response.status_code == 403
    assert user_client.get("/api/tools/").status_code == 200
    assert ToolPolicy.objects.filter(name="http_check", enabled=False).count() == 0


def test_unknown_tool_is_404_and_bad_values_are_field_errors(staff_client):
    assert staff_client.patch("/api/tools/nope/", {"enabled": True}, format="json").status_code == 404
    response = staff_client.patch("/api/tools/http_check/", {"approver": "anyone"}, format="json")
    assert response.status_code == 400 and "approver" in response.json()


def test_mcp_server_secrets_are_write_only_and_masked(staff_client, user_client):
    response = staff_client.post("/api/mcp-servers/", {
        "name": "ops", "transport": "streamable_http", "url": "http://127.0.0.1:9/mcp",
        "headers": {"Authorization": f"Bearer {SECRET}"},
    }, format="json")
    assert response.status_code == 201, response.json()
    assert SECRET not in response.content.decode()
    assert response.json()["headers"]["Authorization"].endswith(SECRET[-4:])
    server_id = response.json()["id"]
    listing = staff_client.get("/api/mcp-servers/")
    assert listing.status_code == 200 and SECRET not in listing.content.decode()
    # Users without agentcore.view_mcpserver do not see the servers at all (tests/security/test_permissions.py).
    assert user_client.get("/api/mcp-servers/").status_code == 403
    # A patch without the secrets keeps them.
    response = staff_client.patch(f"/api/mcp-servers/{server_id}/", {"enabled": False}, format="json")
    assert response.status_code == 200
    server = MCPServer.objects.get(id=server_id)
    assert server.headers == {"Authorization": f"Bearer {SECRET}"} and not server.enabled
    assert_stored_encrypted(server, "headers", {"Authorization": f"Bearer {SECRET}"}, secrets=(SECRET,))


def test_users_can_not_write_mcp_servers(user_client):
    response = user_client.post("/api/mcp-servers/", {"name": "x", "command": "true"}, format="json")
    assert response.status_code == 403
    assert not MCPServer.objects.exists()


@pytest.mark.parametrize("body, field", [
    ({"name": "a", "transport": "stdio"}, "command"),
    ({"name": "a", "transport": "streamable_http"}, "url"),
    ({"name": "a", "transport": "streamable_http", "url": "file:///etc/passwd"}, "url"),
    ({"name": "a", "transport": "carrier-pigeon", "command": "x"}, "transport"),
    ({"name": "a", "command": "x", "args": "--not-a-list"}, "args"),
    ({"name": "a", "command": "x", "env": {"A": 1}}, "env"),
])
def test_mcp_server_bad_input_is_a_field_error(staff_client, body, field):
    response = staff_client.post("/api/mcp-servers/", body, format="json")
    assert response.status_code == 400
    assert field in response.json()


def test_an_mcp_server_name_taken_concurrently_is_a_409_conflict(staff_client, monkeypatch):
    from rest_framework.validators import UniqueValidator

    MCPServer.objects.create(name="ops", transport="streamable_http", url="http://127.0.0.1:9/mcp")
    # The other request's row commits between this request's validation and its insert: the unique index refuses it.
    monkeypatch.setattr(UniqueValidator, "__call__", lambda self, value, serializer_field: None)
    response = staff_client.post("/api/mcp-servers/", {
        "name": "ops", "transport": "streamable_http", "url": "http://127.0.0.1:9/other"}, format="json")
    assert response.status_code == 409, response.content
    assert response.json()["code"] == "conflict"
    assert MCPServer.objects.filter(name="ops").count() == 1


@pytest.mark.django_db(transaction=True)
def test_mcp_server_test_connects_and_lists_tools(staff_client, user_client, tmp_path):
    script = tmp_path / "tiny_mcp.py"
    script.write_text(textwrap.dedent("""
        from mcp.server.fastmcp import FastMCP

        server = FastMCP("tiny")

        @server.tool()
        def ping(host: str) -> str:
            \"\"\"Say pong.\"\"\"
            return "pong " + host

        server.run()
    """))
    server = MCPServer.objects.create(name="tiny", command=sys.executable, args=[str(script)])
    assert user_client.post(f"/api/mcp-servers/{server.id}/test/").status_code == 403
    response = staff_client.post(f"/api/mcp-servers/{server.id}/test/")
    assert response.status_code == 200, response.json()
    assert response.json()["ok"] is True
    assert [tool["name"] for tool in response.json()["tools"]] == ["tiny__ping"]

    broken = MCPServer.objects.create(name="broken", command=sys.executable, args=[str(tmp_path / "missing.py")])
    response = staff_client.post(f"/api/mcp-servers/{broken.id}/test/")
    assert response.status_code == 200
    # The process starts, then exits on the missing script before the MCP handshake: the session sees it close.
    assert response.json() == {"ok": False, "error": "McpError: Connection closed"}


def test_schema_generates_without_warnings(staff_client, capsys):
    from drf_spectacular.generators import SchemaGenerator

    generator = SchemaGenerator()
    schema = generator.get_schema(request=None, public=True)
    captured = capsys.readouterr()
    agent_paths = [path for path in schema["paths"] if not path.startswith("/api/llm")]
    assert "/api/agent/chat/" in agent_paths and "/api/approvals/{id}/approve/" in agent_paths
    problems = [line for line in (captured.err + captured.out).splitlines()
                if ("Warning" in line or "Error" in line) and ("agentcore" in line or "/api/" in line)]
    assert problems == []
