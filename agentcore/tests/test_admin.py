"""Agent admin: every page renders without secrets; approval actions resume the run; policies go through the
service; MCP secrets are write-only; the MCP test action reports the server's tools."""
from __future__ import annotations

import re
import sys
import textwrap

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.urls import reverse

from agentcore.limits import LIMIT_FIELDS
from agentcore.models import AgentApp, Approval, MCPServer, Message, Session, Thought, ToolPolicy
from llmconfigs.models import AuditLog
from tests.fakes.upstream import Reply, ToolCall
from tests.stored_secrets import assert_stored_encrypted

SECRET = "mcp-env-secret-value-7c1d"
HEADER_SECRET = "hdr-secret-value-55aa"


@pytest.fixture
def mcp_server(db):
    return MCPServer.objects.create(name="ops", command="ops-mcp", env={"API_TOKEN": SECRET},
                                    headers={"X-Key": HEADER_SECRET})


@pytest.mark.django_db
def test_every_agent_admin_page_renders_without_secrets(admin_client, agent_app, plain_user, mcp_server):
    session = Session.objects.create(app=agent_app, owner=plain_user, name="disk check")
    message = Message.objects.create(session=session, query="disk?", answer="Disk is 40% full.", status="normal")
    Thought.objects.create(message=message, position=1, tool="system_status", observation="disk 40%", status="done")
    approval = Approval.objects.create(session=session, message=message, tool="http_check",
                                       tool_input={"url": "http://x"})
    ToolPolicy.objects.create(name="ops__uptime", source="mcp", mcp_server=mcp_server)
    pages = [
        reverse("admin:agentcore_agentapp_changelist"), reverse("admin:agentcore_agentapp_change", args=[agent_app.pk]),
        reverse("admin:agentcore_session_changelist"), reverse("admin:agentcore_session_change", args=[session.pk]),
        reverse("admin:agentcore_message_change", args=[message.pk]),
        reverse("admin:agentcore_approval_changelist"), reverse("admin:agentcore_approval_change", args=[approval.pk]),
        reverse("admin:agentcore_mcpserver_changelist"), reverse("admin:agentcore_mcpserver_add"),
        reverse("admin:agentcore_mcpserver_change", args=[mcp_server.pk]),
        reverse("admin:agentcore_toolpolicy_changelist"),
        reverse("admin:agentcore_toolpolicy_change", args=["ops__uptime"]),
    ]
    for page in pages:
        response = admin_client.get(page)
        assert response.status_code == 200, page
        html = response.content.decode()
        assert SECRET not in html and HEADER_SECRET not in html, page
    session_page = admin_client.get(reverse("admin:agentcore_session_change", args=[session.pk])).content.decode()
    assert "Disk is 40% full." in session_page and "system_status" in session_page and "disk 40%" in session_page
    mcp_page = admin_client.get(reverse("admin:agentcore_mcpserver_change", args=[mcp_server.pk])).content.decode()
    assert SECRET[-4:] in mcp_page  # the mask


@pytest.mark.django_db
def test_mcp_secrets_are_kept_when_left_blank_and_replaced_when_given(admin_client, mcp_server):
    url = reverse("admin:agentcore_mcpserver_change", args=[mcp_server.pk])
    form = {"name": "ops", "transport": "stdio", "command": "ops-mcp", "args": "[]", "env": "", "url": "",
            "headers": "", "enabled": "on", "allowed_tools": "[]", "requires_approval_default": "on"}
    response = admin_client.post(url, form)
    assert response.status_code == 302, response.content.decode()[-2000:]
    mcp_server.refresh_from_db()
    assert mcp_server.env == {"API_TOKEN": SECRET} and mcp_server.headers == {"X-Key": HEADER_SECRET}
    response = admin_client.post(url, {**form, "env": '{"API_TOKEN": "new-value-123456"}'})
    assert response.status_code == 302
    mcp_server.refresh_from_db()
    assert mcp_server.env == {"API_TOKEN": "new-value-123456"}
    assert_stored_encrypted(mcp_server, "env", {"API_TOKEN": "new-value-123456"}, secrets=("new-value-123456",))
    response = admin_client.post(url, {**form, "env": '{"API_TOKEN": 5}'})
    assert response.status_code == 200 and "JSON object of strings" in response.content.decode()


@pytest.mark.django_db
def test_run_shell_policy_can_be_enabled_but_its_approval_rule_is_locked(admin_client):
    admin_client.get(reverse("admin:agentcore_toolpolicy_changelist"))  # policies exist once tools are listed
    from agentcore.tools.policies import tool_policy_add_builtins

    tool_policy_add_builtins()
    url = reverse("admin:agentcore_toolpolicy_change", args=["run_shell"])
    response = admin_client.post(url, {"enabled": "on", "requires_approval": "", "approver": "requester"})
    assert response.status_code == 302
    policy = ToolPolicy.objects.get(name="run_shell")
    assert policy.enabled and policy.requires_approval and policy.approver == "staff"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("http_check_needs_approval")
def test_approve_action_runs_the_tool_and_finishes_the_answer(admin_client, user_client, agent_app, fake_upstream,
                                                              counting_target):
    fake_upstream.script(Reply(tool_calls=[ToolCall("http_check", {"url": counting_target.url})]), Reply(text="Up."))
    body = user_client.post("/api/agent/chat/", {"message": "up?"}, format="json").json()
    approval_id = body["pending_approvals"][0]["id"]
    assert counting_target.hits == 0
    response = admin_client.post(reverse("admin:agentcore_approval_changelist"),
                                 {"action": "approve", ACTION_CHECKBOX_NAME: [approval_id]}, follow=True)
    assert response.status_code == 200
    assert "approved; the answer ended normal" in response.content.decode()
    approval = Approval.objects.get(id=approval_id)
    assert approval.status == "approved" and approval.decided_by.username == "admin"
    [row] = AuditLog.objects.filter(action="decide", target_id=approval_id)
    assert (row.actor, row.source, row.changes["status"]["new"]) == (approval.decided_by, "admin", "approved")
    message = Message.objects.get(id=body["message_id"])
    assert (message.status, message.answer) == ("normal", "Up.")
    assert counting_target.hits == 1

    response = admin_client.post(reverse("admin:agentcore_approval_changelist"),
                                 {"action": "reject", ACTION_CHECKBOX_NAME: [approval_id]}, follow=True)
    assert "already approved" in response.content.decode()
    assert Approval.objects.get(id=approval_id).status == "approved"
    assert AuditLog.objects.filter(action="decide").count() == 1  # the refused second decision left no row


@pytest.mark.django_db(transaction=True)
def test_mcp_test_action_lists_the_servers_tools(admin_client, tmp_path):
    script = tmp_path / "tiny_mcp.py"
    script.write_text(textwrap.dedent("""
        from mcp.server.fastmcp import FastMCP

        server = FastMCP("tiny")

        @server.tool()
        def uptime() -> str:
            \"\"\"How long the host has been up.\"\"\"
            return "up 3 days"

        server.run()
    """))
    server = MCPServer.objects.create(name="tiny", command=sys.executable, args=[str(script)])
    response = admin_client.post(reverse("admin:agentcore_mcpserver_changelist"),
                                 {"action": "test_connection", ACTION_CHECKBOX_NAME: [str(server.pk)]}, follow=True)
    assert response.status_code == 200
    assert "connected; tools: tiny__uptime" in response.content.decode()


@pytest.mark.django_db
def test_app_admin_saves_an_app(admin_client, default_llm_config):
    response = admin_client.post(reverse("admin:agentcore_agentapp_add"), {
        "name": "Helper", "mode": "chat", "description": "", "system_prompt": "Be brief.", "opening_statement": "",
        "suggested_questions": "[]", "llm_config": "",
        "max_iterations": "8", "max_active_requests": "0", "user_input_form": "[]", "file_upload": "{}",
        "is_active": "on", **dict.fromkeys(LIMIT_FIELDS, "0"),
    })
    assert response.status_code == 302, response.content.decode()[-3000:]
    assert AgentApp.objects.filter(name="Helper", mode="chat", enabled_tools=[], model_parameters={}).exists()


def _app_form(**fields) -> dict:
    return {"name": "Ops", "mode": "agent-chat", "description": "", "system_prompt": "", "opening_statement": "",
            "suggested_questions": "[]", "llm_config": "", "max_iterations": "8", "max_active_requests": "0",
            "user_input_form": "[]", "file_upload": "{}", "network_allow_hosts": "",
            "network_allow_networks": "", "network_allow_ports": "", "is_active": "on",
            **dict.fromkeys(LIMIT_FIELDS, "0"), **fields}


@pytest.mark.django_db
def test_the_app_form_offers_the_completion_mode(admin_client, default_llm_config):
    page = admin_client.get(reverse("admin:agentcore_agentapp_add")).content.decode()
    assert '<option value="completion">' in page
    response = admin_client.post(reverse("admin:agentcore_agentapp_add"),
                                 _app_form(name="Runbooks", mode="completion", system_prompt="Runbook for {{host}}."))
    assert response.status_code == 302, response.content.decode()[-3000:]
    assert AgentApp.objects.get(name="Runbooks").mode == "completion"


@pytest.mark.django_db
def test_app_form_has_tools_as_checkboxes_and_parameters_checked_against_the_provider(admin_client, make_llm_config):
    zhipu = make_llm_config(name="glm", provider="zhipu", model_name="glm-4-flash", top_p=0.9, temperature=0.5)
    page = admin_client.get(reverse("admin:agentcore_agentapp_add")).content.decode()
    assert 'type="checkbox" name="enabled_tools" value="http_check"' in page
    assert "run_shell: " in page and "(needs approval, switched off in Tool policies)" in page
    assert 'name="temperature"' in page and 'name="model_parameters"' not in page

    refused = admin_client.post(reverse("admin:agentcore_agentapp_add"),
                                _app_form(llm_config=str(zhipu.pk), top_p="1", temperature="0.3"))
    assert refused.status_code == 200
    assert "Zhipu GLM accepts top_p in (0, 1), got 1. (model: glm)" in refused.content.decode()
    assert not AgentApp.objects.exists()

    saved = admin_client.post(reverse("admin:agentcore_agentapp_add"), _app_form(
        llm_config=str(zhipu.pk), top_p="0.8", max_tokens="512", enabled_tools=["http_check", "dns_lookup"]))
    assert saved.status_code == 302, saved.content.decode()[-2000:]
    app = AgentApp.objects.get()
    assert sorted(app.enabled_tools) == ["dns_lookup", "http_check"]
    assert app.model_parameters == {"top_p": 0.8, "max_tokens": 512}

    # Other keys of model_parameters stay; an emptied field drops its key.
    AgentApp.objects.filter(pk=app.pk).update(model_parameters={"top_p": 0.8, "seed": 7})
    change = reverse("admin:agentcore_agentapp_change", args=[app.pk])
    page = admin_client.get(change).content.decode()
    assert 'name="top_p" value="0.8"' in page
    assert "checked" in re.search(r'<input[^>]*name="enabled_tools" value="http_check"[^>]*>', page).group(0)
    assert "checked" not in re.search(r'<input[^>]*name="enabled_tools" value="current_time"[^>]*>', page).group(0)
    assert admin_client.post(change, _app_form(llm_config=str(zhipu.pk))).status_code == 302
    app.refresh_from_db()
    assert app.model_parameters == {"seed": 7} and app.enabled_tools == []


@pytest.mark.django_db
def test_app_form_lists_are_lines_and_the_input_form_is_checked(admin_client):
    page = admin_client.get(reverse("admin:agentcore_agentapp_add")).content.decode()
    assert '<textarea name="suggested_questions"' in page and '<textarea name="network_allow_ports"' in page
    response = admin_client.post(reverse("admin:agentcore_agentapp_add"), _app_form(
        suggested_questions="Is example.com up?\n\n  What is the load?  ", network_allow_hosts="grafana.internal",
        network_allow_networks="10.20.0.0/16\n127.0.0.1/32", network_allow_ports="443\n8080",
        user_input_form='[{"text-input": {"variable": "host", "label": "Host", "required": true}}]'))
    assert response.status_code == 302, response.content.decode()[-2000:]
    app = AgentApp.objects.get()
    assert app.suggested_questions == ["Is example.com up?", "What is the load?"]
    assert (app.network_allow_hosts, app.network_allow_networks, app.network_allow_ports) == (
        ["grafana.internal"], ["10.20.0.0/16", "127.0.0.1/32"], [443, 8080])
    page = admin_client.get(reverse("admin:agentcore_agentapp_change", args=[app.pk])).content.decode()
    assert "Is example.com up?\nWhat is the load?</textarea>" in page

    for fields, error in [
        ({"user_input_form": '[{"select": {"variable": "env", "label": "Env"}}]'},
         "Item 1: a select needs &quot;options&quot;, a list of strings."),
        ({"user_input_form": '[{"slider": {"variable": "x"}}]'}, "Item 1: unknown kind &#x27;slider&#x27;"),
        ({"user_input_form": '{"text-input": {}}'}, "A list of items such as"),
        ({"user_input_form": "[oops"}, "Enter a valid JSON."),
        ({"network_allow_ports": "https"}, "One whole number per line."),
        ({"network_allow_networks": "not-a-network"}, "not-a-network"),
    ]:
        response = admin_client.post(reverse("admin:agentcore_agentapp_add"), _app_form(name="Other", **fields))
        assert response.status_code == 200 and error in response.content.decode(), fields
