"""Network reach: which addresses an app may reach, and allow-lists that are validated where admins write them."""
from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from agentcore.limits import LIMIT_FIELDS
from agentcore.models import AgentApp
from agentcore.network import (
    NOTHING_PRIVATE,
    NetworkAllowList,
    NetworkRefused,
    address_refusal,
    allow_list_for,
    ip_of,
    parse_networks,
    target_check,
)

PUBLIC = "93.184.215.14"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
INTERNAL = NetworkAllowList(hosts=frozenset({"grafana.internal"}), networks=parse_networks(["10.20.0.0/16"]),
                            ports=frozenset({443}))
EVERYTHING = NetworkAllowList(hosts=frozenset({"metadata.internal"}), networks=parse_networks(["0.0.0.0/0", "::/0"]))


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "::ffff:127.0.0.1", "10.1.2.3", "172.16.0.1",
                                     "192.168.0.10", "fd00::1", "100.64.0.1"])
def test_loopback_and_private_addresses_are_refused_by_default(address):
    assert address_refusal(address, host="x.example", port=80, allow=NOTHING_PRIVATE) == \
        "a private address this app's network allow-list does not open"


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
def test_public_addresses_are_reachable(address):
    assert address_refusal(address, host="example.com", port=8443, allow=NOTHING_PRIVATE) is None


@pytest.mark.parametrize(("address", "reason"), [
    ("169.254.169.254", "a link-local address"), ("fe80::1%eth0", "a link-local address"),
    ("::ffff:169.254.169.254", "a link-local address"), ("64:ff9b::a9fe:a9fe", "a link-local address"),
    ("100.100.100.200", "a cloud metadata address"), ("fd00:ec2::254", "a cloud metadata address"),
    ("fd00:ec2::254%eth0", "a cloud metadata address"),  # a zone must not make it a different address
    ("0.0.0.0", "not a unicast address"), ("224.0.0.1", "not a unicast address"),
    ("240.0.0.1", "not a unicast address"),
])
def test_link_local_metadata_and_non_unicast_are_refused_even_when_listed(address, reason):
    assert address_refusal(address, host="metadata.internal", port=80, allow=EVERYTHING) == reason


def test_a_private_target_needs_a_listed_network_or_host_and_a_listed_port():
    assert address_refusal("10.20.3.4", host="db.internal", port=443, allow=INTERNAL) is None
    assert address_refusal("10.20.3.4", host="db.internal", port=5432, allow=INTERNAL) is not None
    assert address_refusal("10.21.0.1", host="db.internal", port=443, allow=INTERNAL) is not None
    assert address_refusal("192.168.9.9", host="Grafana.Internal.", port=443, allow=INTERNAL) is None
    assert address_refusal("192.168.9.9", host="grafana.internal", port=80, allow=INTERNAL) is not None
    assert address_refusal("192.168.9.9", host="other.internal", port=443, allow=INTERNAL) is not None


def _app(**fields) -> AgentApp:
    return AgentApp(name="x", **fields)


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"network_allow_networks": ["10.0.0.1/8"]}, "network_allow_networks", "CIDR form"),
    ({"network_allow_networks": ["10.0.0.0/8", "intranet"]}, "network_allow_networks", "'intranet'"),
    ({"network_allow_networks": ["169.254.0.0/16"]}, "network_allow_networks",
     "'169.254.0.0/16' is link-local, multicast or a metadata address: never reachable, whatever the allow-list says."),
    ({"network_allow_networks": ["100.100.100.200/32"]}, "network_allow_networks", "never reachable"),
    ({"network_allow_networks": "10.0.0.0/8"}, "network_allow_networks",
     "networks must be a list of at most 100 entries."),
    ({"network_allow_hosts": "grafana.internal"}, "network_allow_hosts",
     "host names must be a list of at most 100 entries."),
    ({"network_allow_hosts": ["a" * 301]}, "network_allow_hosts", "host names must be non-empty strings."),
    ({"network_allow_hosts": ["a" * 300]}, "network_allow_hosts", "is not a host name."),
    ({"network_allow_hosts": [".".join(["a" * 63] * 3 + ["a" * 62])]}, "network_allow_hosts", "is not a host name."),
    ({"network_allow_ports": "443"}, "network_allow_ports", "ports must be a list of at most 100 port numbers."),
    ({"network_allow_ports": list(range(1, 102))}, "network_allow_ports", "at most 100 port numbers."),
    ({"network_allow_ports": [65536]}, "network_allow_ports", "ports must be whole numbers from 1 to 65535."),
    ({"network_allow_networks": [f"10.{i}.0.0/16" for i in range(101)]}, "network_allow_networks", "at most 100"),
    ({"network_allow_hosts": ["10.1.2.3"]}, "network_allow_hosts", "list it under networks"),
    ({"network_allow_hosts": ["bad_name.internal"]}, "network_allow_hosts", "not a host name"),
    ({"network_allow_hosts": [""]}, "network_allow_hosts", "non-empty strings"),
    ({"network_allow_ports": [0]}, "network_allow_ports", "from 1 to 65535"),
    ({"network_allow_ports": ["443"]}, "network_allow_ports", "from 1 to 65535"),
    ({"network_allow_ports": [True]}, "network_allow_ports", "from 1 to 65535"),
])
def test_bad_allow_list_entries_are_refused_with_the_fields_name(fields, field, message):
    with pytest.raises(ValidationError) as caught:
        _app(**fields).clean_fields()
    assert list(caught.value.message_dict) == [field]
    assert message in caught.value.message_dict[field][0]


def test_allow_lists_at_their_limits_are_accepted():
    longest_name = ".".join(["a" * 63] * 3 + ["a" * 61])  # 253 characters
    app = _app(network_allow_hosts=[" Grafana.Internal. ", "a", longest_name] + [f"h{i}" for i in range(97)],
               network_allow_networks=["10.1.2.3/32", "fd12::1/128"] + [f"172.16.{i}.0/24" for i in range(98)],
               network_allow_ports=[1, 65535] + list(range(2, 100)))
    app.clean_fields()
    allow = allow_list_for(app)
    assert {"grafana.internal", "a", longest_name} <= allow.hosts and len(allow.hosts) == 100
    assert len(allow.networks) == 100 and {1, 65535} <= allow.ports and len(allow.ports) == 100
    assert allow.permits(host="x", ip=ip_of("10.1.2.3"), port=65535)
    assert not allow.permits(host="x", ip=ip_of("10.1.2.4"), port=65535)


def test_a_stored_allow_list_is_read_and_an_invalid_one_opens_nothing(caplog):
    app = _app(network_allow_hosts=["grafana.internal"], network_allow_networks=["10.20.0.0/16", "fd12::/16"],
               network_allow_ports=[443])
    assert allow_list_for(app) == NetworkAllowList(hosts=frozenset({"grafana.internal"}),
                                                   networks=parse_networks(["10.20.0.0/16", "fd12::/16"]),
                                                   ports=frozenset({443}))
    # Written around the validation (e.g. SQL): nothing is opened, and the log says why.
    broken = _app(network_allow_networks=["10.0.0.0/8", "169.254.0.0/16"])
    assert allow_list_for(broken) is NOTHING_PRIVATE
    [record] = [r for r in caplog.records if r.name == "agentcore.network"]
    assert record.getMessage() == (
        f"app {broken.pk} has an invalid network allow-list, treated as empty: '169.254.0.0/16' is link-local, "
        "multicast or a metadata address: never reachable, whatever the allow-list says.")


@pytest.mark.parametrize(("url", "checked_url", "host_header", "extensions"), [
    ("https://API.example/v1?q=1#frag", "https://93.184.215.14:443/v1?q=1", "api.example",
     {"sni_hostname": "api.example"}),
    ("http://api.example", "http://93.184.215.14:80/", "api.example", {}),
    ("http://api.example:8080/x", "http://93.184.215.14:8080/x", "api.example:8080", {}),
    ("https://v6.example/", "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]:443/", "v6.example",
     {"sni_hostname": "v6.example"}),
])
async def test_a_checked_target_connects_to_the_checked_address_under_the_names_host(scripted_dns, url, checked_url,
                                                                                   host_header, extensions):
    scripted_dns.answers.update({"api.example": [PUBLIC], "v6.example": [PUBLIC_V6]})
    target = await target_check(url, allow=NOTHING_PRIVATE)
    assert (target.url, target.headers, target.extensions) == (checked_url, {"Host": host_header}, extensions)
    assert target.host == host_header.split(":")[0] and target.addresses == scripted_dns.answers[target.host]


async def test_the_default_port_of_https_is_the_one_an_allow_list_must_name(scripted_dns):
    scripted_dns.answers["grafana.internal"] = ["10.20.3.4"]
    https_only = NetworkAllowList(networks=parse_networks(["10.20.0.0/16"]), ports=frozenset({443}))
    assert (await target_check("https://grafana.internal/", allow=https_only)).url == "https://10.20.3.4:443/"
    with pytest.raises(NetworkRefused, match="does not open"):
        await target_check("http://grafana.internal/", allow=https_only)


@pytest.mark.parametrize(("url", "message"), [
    ("http://api.example:99999/", "the URL's port is not a number from 0 to 65535"),
    ("http://api.example:8o/", "the URL's port is not a number from 0 to 65535"),
    ("http:///nohost", "only http and https URLs with a host can be opened"),
    ("http://nowhere.example/", "cannot resolve nowhere.example"),
    ("http://empty.example/", "cannot resolve empty.example"),
])
async def test_urls_that_cannot_be_checked_are_refused_with_the_reason(monkeypatch, url, message):
    from agentcore import network

    async def resolve(host, port):
        if host == "empty.example":
            return []
        raise OSError("no such name")

    monkeypatch.setattr(network, "resolve", resolve)
    with pytest.raises(NetworkRefused) as refused:
        await target_check(url, allow=NOTHING_PRIVATE)
    assert str(refused.value) == message


@pytest.mark.django_db
def test_the_admin_edits_an_apps_allow_list_and_explains_a_bad_entry(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser(username="root", password="pw-root-12345"))
    app = AgentApp.objects.create(name="Ops")
    url = reverse("admin:agentcore_agentapp_change", args=[app.pk])
    page = client.get(url).content.decode()
    assert "Link-local and cloud metadata addresses are refused whatever is listed" in page
    form = {"name": "Ops", "mode": "agent-chat", "suggested_questions": "[]", "max_iterations": 8,
            "max_active_requests": 0, "user_input_form": "[]",
            "file_upload": "{}", "is_active": "on", **dict.fromkeys(LIMIT_FIELDS, "0"),
            "network_allow_hosts": '["grafana.internal"]',
            "network_allow_networks": '["10.20.0.0/16", "169.254.169.254/32"]', "network_allow_ports": "[443]"}
    response = client.post(url, form)
    assert response.status_code == 200
    assert "is link-local, multicast or a metadata address: never reachable" in response.content.decode()
    app.refresh_from_db()
    assert app.network_allow_networks == []
    response = client.post(url, {**form, "network_allow_networks": '["10.20.0.0/16"]'})
    assert response.status_code == 302
    app.refresh_from_db()
    assert (app.network_allow_hosts, app.network_allow_networks, app.network_allow_ports) == \
        (["grafana.internal"], ["10.20.0.0/16"], [443])


def test_a_retired_deployment_wide_switch_is_reported(monkeypatch):
    from django.core import checks

    monkeypatch.setenv("REMOTE_FILES_ALLOW_PRIVATE", "1")
    warnings = [m for m in checks.run_checks(tags=[checks.Tags.security]) if m.id == "agentcore.W001"]
    assert [w.msg for w in warnings] == [
        "REMOTE_FILES_ALLOW_PRIVATE is set but no longer read: loopback and private targets are opened per app."]
