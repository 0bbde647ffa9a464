"""Per-process tool caches (built-in tools, provider schemas) never hide a policy change from the next run."""
from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from agentcore.models import Session, Task, ToolPolicy
from agentcore.network import NOTHING_PRIVATE
from agentcore.runs import TurnRequest
from agentcore.tests.factories import run_all
from agentcore.tools.policies import tool_policy_update
from agentcore.tools.registry import builtin_tools
from tests.fakes.upstream import Reply

pytestmark = pytest.mark.django_db(transaction=True)


def _sent_tools(fake_upstream) -> dict[str, dict]:
    return {t["function"]["name"]: t["function"] for t in fake_upstream.chat_requests[-1].body.get("tools", [])}


async def test_a_disabled_tool_is_gone_from_the_next_run(agent_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="one"), Reply(text="two"))
    await run_all(TurnRequest(app=agent_app, query="first", owner=plain_user))
    first = _sent_tools(fake_upstream)
    assert "dns_lookup" in first and "update_plan" in first
    assert first["dns_lookup"]["parameters"]["required"] == ["host"]

    await database_sync_to_async(tool_policy_update)(name="dns_lookup", enabled=False)
    await run_all(TurnRequest(app=agent_app, query="second", owner=plain_user))
    second = _sent_tools(fake_upstream)
    assert "dns_lookup" not in second
    assert second["update_plan"] == first["update_plan"]  # the cached schema is the one derived from the signature


async def test_turns_do_not_rewrite_existing_policy_rows(agent_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="one"), Reply(text="two"))
    await run_all(TurnRequest(app=agent_app, query="first", owner=plain_user))
    await ToolPolicy.objects.filter(name="current_time").aupdate(requires_approval=True, description="edited")
    await ToolPolicy.objects.filter(name="http_check").adelete()
    await run_all(TurnRequest(app=agent_app, query="second", owner=plain_user))
    edited = await ToolPolicy.objects.aget(name="current_time")
    assert (edited.requires_approval, edited.description) == (True, "edited")
    recreated = await ToolPolicy.objects.aget(name="http_check")  # a missing built-in row is created again
    assert recreated.enabled and not recreated.requires_approval
    assert "http_check" in _sent_tools(fake_upstream)


async def test_plan_tool_of_each_run_writes_to_its_own_session(agent_app, plain_user):
    first = await Session.objects.acreate(app=agent_app, owner=plain_user, name="a")
    second = await Session.objects.acreate(app=agent_app, owner=plain_user, name="b")
    tool_a = builtin_tools(session_id=str(first.pk), allow=NOTHING_PRIVATE)["update_plan"]
    tool_b = builtin_tools(session_id=str(second.pk), allow=NOTHING_PRIVATE)["update_plan"]
    await tool_a.ainvoke({"tasks": [{"title": "check A"}]})
    await tool_b.ainvoke({"tasks": [{"title": "check B"}, {"title": "fix B"}]})
    assert [t.title async for t in Task.objects.filter(session=first)] == ["check A"]
    assert [t.title async for t in Task.objects.filter(session=second).order_by("order")] == ["check B", "fix B"]
