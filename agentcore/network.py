"""Where the server may connect on a run's behalf (tools, documents given by URL): address checks and allow-lists.

Dify end users are anonymous, so a URL they choose must not open the private network to them. Public addresses are
reachable; loopback and private ones only when the app's allow-list names them; link-local, cloud metadata and
non-unicast addresses never. Every address a name resolves to is checked, and the connection goes to an address that
was checked (pinned), so a second DNS answer cannot swap it.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from django.core.exceptions import ValidationError

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata endpoints outside the link-local range (Alibaba, AWS IPv6).
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("100.100.100.200"), ipaddress.ip_address("fd00:ec2::254")})
# NAT64's well-known prefix carries an IPv4 address in its last 32 bits; a NAT64 gateway connects to that address.
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
# Listing one of these in an allow-list is refused when it is saved (it could never take effect).
NEVER_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10", "224.0.0.0/4", "ff00::/8"))
ALLOW_LIST_MAX_ENTRIES = 100
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class NetworkRefused(Exception):
    """Why a URL may not be opened (safe to show: it names the URL's host and address, nothing else)."""


# ----- addresses -----

def ip_of(address: str) -> IPAddress:
    """The IP of a resolved address, without an IPv6 zone; IPv4-mapped and NAT64 IPv6 addresses as their IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return ip.ipv4_mapped
        if ip in NAT64_PREFIX:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (sorted, without duplicates). Tests replace this function to script DNS."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def never_reachable(ip: IPAddress) -> str | None:
    """Why no allow-list can open `ip`, or None."""
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_link_local:  # 169.254.0.0/16 holds the metadata service of most clouds
        return "a link-local address"
    if ip.is_multicast or ip.is_unspecified or (ip.is_reserved and not ip.is_loopback):  # ::1 lies in ::/8
        return "not a unicast address"
    return None


# ----- allow-lists -----

def parse_hosts(values: Any) -> frozenset[str]:
    """Host names (lower case, without a trailing dot); ValueError names the first bad entry."""
    names = set()
    for value in _entries(values, "host names"):
        name = value.strip().lower().rstrip(".")
        if _is_address(name):
            raise ValueError(f"{value!r} is an address: list it under networks (e.g. {name}/32).")
        if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
            raise ValueError(f"{value!r} is not a host name.")
        names.add(name)
    return frozenset(names)


def parse_networks(values: Any) -> tuple[IPNetwork, ...]:
    """CIDR networks (a bare address is its own /32 or /128); ValueError names the first bad entry."""
    networks = []
    for value in _entries(values, "networks"):
        try:
            network = ipaddress.ip_network(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a network in CIDR form (e.g. 10.0.0.0/8) or has host bits set.") \
                from None
        if _never_reachable_network(network):
            raise ValueError(f"{value!r} is link-local, multicast or a metadata address: never reachable, whatever "
                             "the allow-list says.")
        networks.append(network)
    return tuple(networks)


def parse_ports(values: Any) -> frozenset[int]:
    if not isinstance(values, list) or len(values) > ALLOW_LIST_MAX_ENTRIES:
        raise ValueError(f"ports must be a list of at most {ALLOW_LIST_MAX_ENTRIES} port numbers.")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535 for v in values):
        raise ValueError("ports must be whole numbers from 1 to 65535.")
    return frozenset(values)


def _entries(values: Any, what: str) -> list[str]:
    if not isinstance(values, list) or len(values) > ALLOW_LIST_MAX_ENTRIES:
        raise ValueError(f"{what} must be a list of at most {ALLOW_LIST_MAX_ENTRIES} entries.")
    if not all(isinstance(v, str) and 0 < len(v) <= 300 for v in values):
        raise ValueError(f"{what} must be non-empty strings.")
    return values


def _never_reachable_network(network: IPNetwork) -> bool:
    if network.num_addresses == 1 and network.network_address in METADATA_ADDRESSES:
        return True
    return any(network.version == never.version and network.subnet_of(never) for never in NEVER_NETWORKS)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _as_validation_error(parse, value: Any) -> None:
    try:
        parse(value)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None


# Model field validators (importable by name, as migrations refer to them).
def validate_hosts(value: Any) -> None:
    _as_validation_error(parse_hosts, value)


def validate_networks(value: Any) -> None:
    _as_validation_error(parse_networks, value)


def validate_ports(value: Any) -> None:
    _as_validation_error(parse_ports, value)


@dataclass(frozen=True)
class NetworkAllowList:
    """Loopback and private targets one app may reach: a name in `hosts` or an address in `networks`, on one of
    `ports` when ports are listed. Empty: none."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    ports: frozenset[int] = field(default_factory=frozenset)

    def permits(self, *, host: str, ip: IPAddress, port: int) -> bool:
        if self.ports and port not in self.ports:
            return False
        return host.lower().rstrip(".") in self.hosts or any(ip in network for network in self.networks)


NOTHING_PRIVATE = NetworkAllowList()


def allow_list_for(app: Any) -> NetworkAllowList:
    """The allow-list stored on an app. Entries are validated when saved; a row written around that validation
    opens nothing (and is logged) rather than something unintended."""
    try:
        return NetworkAllowList(hosts=parse_hosts(app.network_allow_hosts),
                                networks=parse_networks(app.network_allow_networks),
                                ports=parse_ports(app.network_allow_ports))
    except ValueError as exc:
        logger.warning("app %s has an invalid network allow-list, treated as empty: %s", app.pk, exc)
        return NOTHING_PRIVATE


def address_refusal(address: str, *, host: str, port: int, allow: NetworkAllowList) -> str | None:
    """Why the server may not connect to `address` (one answer for `host`) on `port`, or None."""
    ip = ip_of(address)
    reason = never_reachable(ip)
    if reason:
        return reason
    if ip.is_global or allow.permits(host=host, ip=ip, port=port):
        return None
    return "a private address this app's network allow-list does not open"


# ----- checked targets -----

@dataclass(frozen=True)
class Target:
    """A URL whose every address passed the checks, rewritten to connect to one of them."""

    url: str  # the URL with the checked address in place of the host name
    host: str  # the original host name (for errors)
    headers: dict[str, str]  # Host: the original name, so virtual hosts answer as they would
    extensions: dict[str, Any]  # TLS: the original name for SNI and certificate checks
    addresses: list[str]

    def stream_get(self, client: httpx.AsyncClient, *, user_agent: str):
        """GET the checked address (a streaming response context), as the original name for HTTP and TLS."""
        return client.stream("GET", self.url, headers={**self.headers, "User-Agent": user_agent},
                             extensions=self.extensions)


def checked_client(*, timeout: float) -> httpx.AsyncClient:
    """The HTTP client for checked targets: it follows no redirect (each hop must be checked on its own) and takes
    no proxy from the environment (a proxy would resolve the name again, unchecked)."""
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)


async def target_check(url: str, *, allow: NetworkAllowList) -> Target:
    """Resolve `url`'s host and check every address; NetworkRefused when one of them may not be reached."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise NetworkRefused("the URL's port is not a number from 0 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NetworkRefused("only http and https URLs with a host can be opened")
    host = parts.hostname
    try:
        addresses = await resolve(host, port)
    except (OSError, UnicodeError):
        raise NetworkRefused(f"cannot resolve {host}") from None
    if not addresses:
        raise NetworkRefused(f"cannot resolve {host}")
    for address in addresses:  # all of them: one public and one private answer is refused
        reason = address_refusal(address, host=host, port=port, allow=allow)
        if reason:
            raise NetworkRefused(f"refused: {host} resolves to {address}, {reason}")
    address = addresses[0]
    netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return Target(
        url=urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")),
        host=host,
        headers={"Host": host if parts.port is None else f"{host}:{parts.port}"},
        extensions={"sni_hostname": host} if parts.scheme == "https" else {},
        addresses=addresses,
    )
