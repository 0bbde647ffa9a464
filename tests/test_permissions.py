"""opsagent.common.permissions.ActionPermissions and agentcore.permissions: Django permissions decide, the staff flag
never."""
from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser
from rest_framework.test import APIRequestFactory

from agentcore.models import MCPServer, ToolPolicy
from agentcore.permissions import (
    APPROVE_SHELL,
    DECIDE_APPROVALS,
    approval_decision_permissions,
    may_see_every_approval,
    may_see_mcp_secrets,
    mcp_server_is_command,
)
from opsagent.common.permissions import ActionPermissions

pytestmark = pytest.mark.django_db


class _ViewSet:
    """What ActionPermissions reads from a DRF viewset."""

    action_map = {"get": "list", "post": "create"}
    action_permissions = {"list": (), "create": ("llmconfigs.add_llmconfig",)}

    def __init__(self, action):
        self.action = action


class _APIView:
    action_permissions = {"post": ()}


def _allowed(user, view, method: str = "get") -> bool:
    request = getattr(APIRequestFactory(), method)("/")
    request.user = user
    return ActionPermissions().has_permission(request, view)


def test_anonymous_is_refused_even_an_open_action():
    assert not _allowed(AnonymousUser(), _ViewSet("list"))


def test_an_open_action_lets_any_authenticated_user_in(plain_user):
    assert _allowed(plain_user, _ViewSet("list"))


def test_the_staff_flag_alone_grants_no_named_permission(bare_staff_user):
    assert not _allowed(bare_staff_user, _ViewSet("create"), "post")


def test_the_named_permission_grants_the_action(plain_user, grant):
    assert not _allowed(plain_user, _ViewSet("create"), "post")
    assert _allowed(grant(plain_user, "llmconfigs.add_llmconfig"), _ViewSet("create"), "post")


def test_a_superuser_passes_every_named_action(django_user_model):
    root = django_user_model.objects.create_superuser(username="root", password="pw-root-123")
    assert _allowed(root, _ViewSet("create"), "post")


def test_an_action_the_view_does_not_name_is_refused_to_everyone(django_user_model):
    root = django_user_model.objects.create_superuser(username="root", password="pw-root-123")
    assert not _allowed(root, _ViewSet("destroy"), "delete")


def test_a_method_the_viewset_does_not_route_is_left_to_its_405(plain_user):
    assert _allowed(plain_user, _ViewSet(None), "put")


def test_plain_views_are_named_by_method(plain_user):
    assert _allowed(plain_user, _APIView(), "post")
    assert not _allowed(plain_user, _APIView(), "delete")


def test_options_metadata_is_open_to_authenticated_users(plain_user):
    assert _allowed(plain_user, _ViewSet("metadata"), "options")


# ----- the agent's rules -----


def test_run_shell_needs_approve_shell_whatever_its_approver():
    for approver in ToolPolicy.Approver.values:
        assert approval_decision_permissions(tool="run_shell", approver=approver) == (APPROVE_SHELL,)


def test_a_staff_approver_tool_needs_the_decide_permission_and_a_requester_tool_none():
    assert approval_decision_permissions(tool="http_check", approver="staff") == (DECIDE_APPROVALS,)
    assert approval_decision_permissions(tool="http_check", approver="requester") == ()


def test_every_approval_is_visible_with_view_or_change_approval(plain_user, bare_staff_user, grant):
    assert not may_see_every_approval(bare_staff_user)
    assert may_see_every_approval(grant(plain_user, "agentcore.view_approval"))


def test_change_approval_alone_also_shows_every_approval(plain_user, grant):
    assert may_see_every_approval(grant(plain_user, "agentcore.change_approval"))


def test_stdio_servers_are_commands_http_ones_are_not():
    assert mcp_server_is_command(MCPServer(transport="stdio", command="x"))
    assert not mcp_server_is_command(MCPServer(transport="streamable_http", url="http://h/"))
    assert not mcp_server_is_command(None)


def test_mcp_secrets_are_for_manage_mcp_stdio_holders_only(plain_user, bare_staff_user, grant):
    assert not may_see_mcp_secrets(None)
    assert not may_see_mcp_secrets(bare_staff_user)
    assert not may_see_mcp_secrets(grant(plain_user, "agentcore.change_mcpserver"))
    assert may_see_mcp_secrets(grant(plain_user, "agentcore.manage_mcp_stdio"))
