"""Built-in tools and policies: a tool turn end to end, safety rules, output limits, tool sets per app and turn."""
from __future__ import annotations

import json
import socket

import pytest

from agentcore.errors import InvalidInput
from agentcore.events import ThoughtUpdate
from agentcore.graph import LIMIT_REACHED
from agentcore.models import AgentApp, Task, Thought, ToolPolicy
from agentcore.network import NOTHING_PRIVATE, NetworkAllowList, parse_networks
from agentcore.runs import TurnOverrides, TurnRequest, aturn_prepare
from agentcore.selectors import tool_list
from agentcore.tests import factories
from agentcore.tests.factories import run_all
from agentcore.tools import builtin
from agentcore.tools.policies import tool_policy_update
from llmconfigs.models import AuditLog
from tests.fakes.upstream import Reply, ToolCall

pytestmark = pytest.mark.django_db(transaction=True)
LOOPBACK = NetworkAllowList(networks=parse_networks(["127.0.0.1/32", "::1/128"]))


def _tool_names(request) -> set[str]:
    return {t["function"]["name"] for t in request.body.get("tools", [])}


async def test_tool_turn_end_to_end(agent_app, plain_user, fake_upstream, counting_target):
    fake_upstream.script(
        Reply(text="Let me check.", tool_calls=[ToolCall("http_check", {"url": counting_target.url}, id="c1")]),
        Reply(text="The site answers 200."),
    )
    events = await run_all(TurnRequest(app=agent_app, query="is it up?", owner=plain_user))
    assert events[-1].status == "normal"
    assert events[-1].answer == "Let me check.\nThe site answers 200."
    assert counting_target.hits == 1
    phases = [(e.phase, e.tool) for e in events if isinstance(e, ThoughtUpdate)]
    assert phases == [("start", ""), ("tool_call", "http_check"), ("tool_result", "http_check"), ("start", ""),
                      ("answer", "")]
    thoughts = [t async for t in Thought.objects.filter(message_id=events[0].message_id).order_by("position")]
    assert [(t.position, t.tool, t.status) for t in thoughts] == [(1, "http_check", "done"), (2, "", "done")]
    observation = json.loads(thoughts[0].observation)
    assert observation["status"] == 200 and observation["bytes"] == 2
    second = fake_upstream.chat_requests[-1].messages
    assert second[-1]["role"] == "tool" and second[-1]["tool_call_id"] == "c1"


async def test_tool_errors_become_observations(agent_app, plain_user, fake_upstream):
    fake_upstream.script(
        Reply(tool_calls=[ToolCall("current_time", {"timezone": "Mars/Olympus"}),
                          ToolCall("no_such_tool", {})]),
        Reply(text="Sorry."),
    )
    events = await run_all(TurnRequest(app=agent_app, query="time on mars", owner=plain_user))
    assert events[-1].status == "normal"
    results = [e for e in events if isinstance(e, ThoughtUpdate) and e.phase == "tool_result"]
    assert "unknown timezone" in results[0].observation
    assert results[1].status == "error" and "not available" in results[1].observation


@pytest.mark.parametrize("limit", [1, 2])
async def test_iteration_limit_ends_the_turn(agent_app, plain_user, fake_upstream, limit):
    """At the limit the tools asked for are refused, not run; a limit of 1 is reached by the turn's first answer,
    made before the graph starts (the graph then routes that answer to its limit)."""
    agent_app.max_iterations = limit
    await agent_app.asave()
    fake_upstream.default = Reply(tool_calls=[ToolCall("current_time", {})])
    events = await run_all(TurnRequest(app=agent_app, query="loop", owner=plain_user))
    assert events[-1].status == "normal"
    assert len(fake_upstream.chat_requests) == limit
    results = [e for e in events if isinstance(e, ThoughtUpdate) and e.phase == "tool_result"]
    assert len(results) == limit and results[-1].observation == LIMIT_REACHED


async def test_disabled_and_unlisted_tools_are_not_offered(agent_app, plain_user, fake_upstream):
    await run_all(TurnRequest(app=agent_app, query="hi", owner=plain_user))
    offered = _tool_names(fake_upstream.chat_requests[-1])
    assert {"current_time", "http_check", "dns_lookup", "system_status", "update_plan"} <= offered
    assert "run_shell" not in offered  # disabled until an admin enables it
    agent_app.enabled_tools = ["current_time", "dns_lookup"]
    await agent_app.asave()
    await run_all(TurnRequest(app=agent_app, query="hi", owner=plain_user))
    assert _tool_names(fake_upstream.chat_requests[-1]) == {"current_time", "dns_lookup"}
    overrides = TurnOverrides(tools=["dns_lookup"])
    await run_all(TurnRequest(app=agent_app, query="hi", owner=plain_user, overrides=overrides))
    assert _tool_names(fake_upstream.chat_requests[-1]) == {"dns_lookup"}
    with pytest.raises(InvalidInput) as caught:
        await aturn_prepare(TurnRequest(app=agent_app, query="hi", owner=plain_user,
                                       overrides=TurnOverrides(tools=["rm_rf"])))
    assert caught.value.field == "tools"


async def test_update_plan_writes_the_sessions_tasks(agent_app, plain_user, fake_upstream):
    plan = [{"title": "Check DNS", "status": "done"}, {"title": "Check HTTP", "status": "in_progress"}]
    fake_upstream.script(Reply(tool_calls=[ToolCall("update_plan", {"tasks": plan})]), Reply(text="Planned."))
    events = await run_all(TurnRequest(app=agent_app, query="plan it", owner=plain_user))
    tasks = [(t.title, t.status, t.order) async for t in Task.objects.filter(session_id=events[0].session_id)]
    assert tasks == [("Check DNS", "done", 0), ("Check HTTP", "in_progress", 1)]


EVERYTHING = NetworkAllowList(hosts=frozenset({"metadata.google.internal"}),
                              networks=parse_networks(["0.0.0.0/0", "::/0"]))
PUBLIC = "93.184.215.14"


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/",
                                 "http://100.100.100.200/", "http://[fd00:ec2::254]/", "http://[::ffff:169.254.169.254]/",
                                 "http://[64:ff9b::a9fe:a9fe]/", "http://metadata.google.internal/"])
async def test_http_check_refuses_metadata_and_link_local_whatever_the_allow_list(url, scripted_dns,
                                                                                  outbound_connections):
    scripted_dns.answers["metadata.google.internal"] = ["169.254.169.254"]
    assert (await builtin.http_check_url(url, allow=EVERYTHING)).startswith("Error: refused")
    assert outbound_connections == []


async def test_http_check_refuses_other_schemes():
    assert "only http" in await builtin.http_check_url("file:///etc/passwd", allow=EVERYTHING)
    assert "only http" in await builtin.http_check_url("ftp://example.com/", allow=EVERYTHING)


async def test_http_check_reaches_loopback_only_through_the_allow_list(counting_target):
    refused = await builtin.http_check_url(counting_target.url, allow=NOTHING_PRIVATE)
    assert refused == ("Error: refused: 127.0.0.1 resolves to 127.0.0.1, a private address this app's network "
                       "allow-list does not open.")
    other_port = NetworkAllowList(networks=parse_networks(["127.0.0.0/8"]),
                                  ports=frozenset({counting_target.port + 1}))
    assert (await builtin.http_check_url(counting_target.url, allow=other_port)).startswith("Error: refused")
    assert counting_target.hits == 0
    listed = NetworkAllowList(networks=parse_networks(["127.0.0.0/8"]), ports=frozenset({counting_target.port}))
    assert json.loads(await builtin.http_check_url(counting_target.url, allow=listed))["status"] == 200
    by_name = NetworkAllowList(hosts=frozenset({"localhost"}))
    local_url = counting_target.url.replace("127.0.0.1", "localhost")
    assert json.loads(await builtin.http_check_url(local_url, allow=by_name))["status"] == 200
    assert counting_target.hits == 2


@pytest.mark.parametrize("answers", [
    [PUBLIC, "127.0.0.1"], ["127.0.0.1", PUBLIC],
    [PUBLIC, "169.254.169.254"], ["169.254.169.254", PUBLIC],
    [PUBLIC, "fd00:ec2::254"], ["100.100.100.200", PUBLIC],
], ids=lambda answers: "+".join(answers))
async def test_http_check_of_a_name_with_one_refused_address_sends_nothing(counting_target, scripted_dns,
                                                                         outbound_connections, answers):
    # The DNS form of SSRF: one public and one private or metadata answer, in either order.
    scripted_dns.answers["mixed.example"] = answers
    result = await builtin.http_check_url(f"http://mixed.example:{counting_target.port}/health",
                                          allow=NOTHING_PRIVATE)
    assert result.startswith("Error: refused: mixed.example resolves to")
    assert outbound_connections == []
    assert counting_target.hits == 0


@pytest.mark.parametrize("answers", [[PUBLIC, "169.254.169.254"], ["169.254.169.254", PUBLIC]],
                         ids=lambda answers: "+".join(answers))
async def test_http_check_reports_a_redirect_to_such_a_name_without_following_it(scripted_dns, outbound_connections,
                                                                               answers):
    scripted_dns.answers["mixed.example"] = answers
    target = factories.LocalHTTPServer({"/go": (302, {"Location": "http://mixed.example/latest/meta-data"}, b"")})
    try:
        result = json.loads(await builtin.http_check_url(f"{target.base_url}/go", allow=LOOPBACK))
    finally:
        target.close()
    assert result["status"] == 302 and result["location"] == "http://mixed.example/latest/meta-data"
    assert outbound_connections == [("127.0.0.1", target.port)]
    assert "mixed.example" not in scripted_dns.asked



async def test_http_check_of_a_silent_server_is_a_timeout_result_at_the_floor_of_its_timeout():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # connections are accepted by the kernel; nothing is ever sent back
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
    try:
        result = json.loads(await builtin.http_check_url(url, timeout=0.1, allow=LOOPBACK))  # raised to 0.5 s
    finally:
        silent.close()
    assert result == {"url": url, "ok": False, "error": "timed out after 0.5 s"}


async def test_http_check_of_a_refused_connection_is_an_error_result_naming_the_error():
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/"
    result = json.loads(await builtin.http_check_url(url, allow=LOOPBACK))
    assert sorted(result) == ["error", "ok", "url"] and (result["url"], result["ok"]) == (url, False)
    assert result["error"].startswith("ConnectError: ")


async def test_http_check_counts_every_chunk_of_the_body_and_stops_at_its_limit(monkeypatch):
    monkeypatch.setattr(builtin, "HTTP_MAX_BYTES", 100_000)
    body = bytes(range(256)) * 1024  # 262,144 bytes: several chunks
    server = factories.LocalHTTPServer({"/short": (200, {}, body[:99_999]), "/long": (200, {}, body),
                                        "/refused": (400, {}, b"bad request")})
    try:
        short, long, refused = [json.loads(await builtin.http_check_url(f"{server.base_url}/{path}", allow=LOOPBACK))
                                for path in ("short", "long", "refused")]
    finally:
        server.close()
    assert sorted(short) == ["addresses", "bytes", "latency_ms", "ok", "status", "total_ms", "truncated", "url"]
    assert (short["url"], short["addresses"]) == (f"{server.base_url}/short", ["127.0.0.1"])
    assert (short["ok"], short["status"], short["bytes"], short["truncated"]) == (True, 200, 99_999, False)
    assert long["truncated"] is True and 100_000 <= long["bytes"] < len(body)
    for result in (short, long):
        assert 0 <= result["latency_ms"] <= result["total_ms"]
    assert (refused["ok"], refused["status"]) == (False, 400)  # a client error is not a healthy answer
    assert server.agents == ["OpsAgent-http-check"] * 3  # the name the checked server's logs show


async def test_each_run_checks_with_its_own_apps_allow_list(agent_app, plain_user, fake_upstream, counting_target):
    closed = await AgentApp.objects.acreate(name="Public", mode=AgentApp.Mode.AGENT_CHAT)
    for app in (closed, agent_app, closed):
        fake_upstream.script(Reply(tool_calls=[ToolCall("http_check", {"url": counting_target.url})]),
                             Reply(text="Done."))
        await run_all(TurnRequest(app=app, query="check it", owner=plain_user))
    observations = [t.observation async for t in Thought.objects.filter(tool="http_check").order_by("created_at")]
    assert [o.startswith("Error: refused") for o in observations] == [True, False, True]
    assert counting_target.hits == 1


async def test_dns_lookup_and_system_status_are_real():
    lookup = json.loads(await builtin.dns_lookup("localhost"))
    assert lookup["ok"] and ("127.0.0.1" in lookup["ipv4"] or "::1" in lookup["ipv6"])
    status = json.loads(await builtin.system_status())
    assert status["disk_root"]["total_bytes"] > 0 and "1m" in status["load_average"]
    assert json.loads(await builtin.current_time("Europe/Paris"))["timezone"] == "Europe/Paris"


async def test_run_shell_is_bounded():
    output = json.loads(await builtin.run_shell("yes x | head -c 20000"))
    assert output["exit_code"] == 0 and "truncated" in output["output"] and len(output["output"]) < 8200
    slow = json.loads(await builtin.run_shell("sleep 5", timeout=1))
    assert slow["exit_code"] is None and "timed out" in slow["error"]


def test_tool_list_has_every_builtin_with_its_policy(db):
    tools = {t["name"]: t for t in tool_list()}
    assert set(tools) >= {"current_time", "http_check", "dns_lookup", "system_status", "run_shell", "update_plan"}
    assert tools["run_shell"] | {"description": ""} == {"name": "run_shell", "description": "", "source": "builtin",
                                                        "enabled": False, "requires_approval": True,
                                                        "approver": "staff"}
    assert tools["http_check"]["requires_approval"] is False and tools["http_check"]["description"]


def test_tool_list_is_a_pure_read(db):
    listed = {t["name"]: t for t in tool_list()}
    assert ToolPolicy.objects.count() == 0  # built-in tools without a row are shown with their defaults
    assert listed["run_shell"]["enabled"] is False and listed["dns_lookup"]["enabled"] is True
    ToolPolicy.objects.create(name="dns_lookup", description="edited", enabled=False)
    listed = {t["name"]: t for t in tool_list()}
    assert (listed["dns_lookup"]["enabled"], listed["dns_lookup"]["description"]) == (False, "edited")
    assert ToolPolicy.objects.count() == 1


def test_tool_policy_update_refuses_unknown_fields_and_edits_the_description(db):
    with pytest.raises(InvalidInput, match=r"^Unknown field\(s\): name_, pk\.$") as caught:
        tool_policy_update(name="dns_lookup", pk=999, name_="shell", enabled=False)
    assert caught.value.field == "name_"
    assert not ToolPolicy.objects.filter(enabled=False, name="dns_lookup").exists()  # nothing of it is saved
    policy = tool_policy_update(name="dns_lookup", description="Resolve a host name.")
    assert ToolPolicy.objects.get(pk=policy.pk).description == "Resolve a host name."
    # Called without a request (a shell, a command), the audit row says so: no made-up source or user agent.
    row = AuditLog.objects.filter(target_type="agentcore.ToolPolicy").get()
    assert (row.source, row.ip_address, row.user_agent) == ("", None, "")
    assert row.changes["description"]["new"] == "Resolve a host name."


def test_tool_policy_update(db):
    policy = tool_policy_update(name="dns_lookup", enabled=False, requires_approval=True, approver="staff")
    assert (policy.enabled, policy.requires_approval, policy.approver) == (False, True, "staff")
    assert ToolPolicy.objects.get(name="dns_lookup").enabled is False
    with pytest.raises(InvalidInput, match=r"^Unknown tool 'nope'\.$") as caught:
        tool_policy_update(name="nope", enabled=True)
    assert caught.value.field == "name"
    with pytest.raises(InvalidInput, match=r"^approver must be one of requester, staff\.$") as caught:
        tool_policy_update(name="dns_lookup", approver="anyone")
    assert caught.value.field == "approver"
    assert tool_policy_update(name="run_shell", enabled=True).enabled is True
    listed_twice = [tool_list(), tool_list()]
    assert len(listed_twice[0]) == len(listed_twice[1])

