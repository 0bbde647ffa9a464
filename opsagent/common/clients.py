"""Who a client is, for audit records and the limits on failed authentications: its address (believing
X-Forwarded-For only from trusted proxies), its User-Agent, and the audit context every audited service takes."""
from __future__ import annotations

import ipaddress

from django.conf import settings


def client_ip(request) -> str | None:
    """The client's address, for audit records and the limits on failed authentications: REMOTE_ADDR, or the
    address a trusted proxy (TRUSTED_PROXY_IPS) put in X-Forwarded-For. Never a forwarded address from anyone else:
    the header is the client's to choose, and an audit trail or a lockout must not rest on what a client claims."""
    return _client_address(request.META.get("REMOTE_ADDR"), request.META.get("HTTP_X_FORWARDED_FOR"))


def scope_client_ip(scope) -> str | None:
    """`client_ip` for an ASGI scope (Channels consumers)."""
    client = scope.get("client")
    forwarded = next((value.decode("latin-1") for name, value in scope.get("headers", [])
                      if name.lower() == b"x-forwarded-for"), None)
    return _client_address(client[0] if client else None, forwarded)


def _client_address(remote: str | None, forwarded: str | None) -> str | None:
    trusted = settings.TRUSTED_PROXY_IPS
    if not remote or remote not in trusted or not forwarded:
        return remote or None
    # Each proxy appends the address it saw: the rightmost one no trusted proxy added is the client.
    hops = [_address(hop) for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if hop not in trusted:
            return hop
    return hops[0] if hops else remote


def _address(hop: str) -> str | None:
    """A forwarded hop as an IP address, without the port some proxies add (`203.0.113.7:5123`, `[2001:db8::1]:443`);
    None when it is no address ("unknown", garbage): only an address may go into an audit row (PostgreSQL's inet
    column refuses anything else) or name a lockout."""
    hop = hop.strip()
    if hop.startswith("["):
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None


# Enough to tell clients apart; a client-chosen header must not grow the audit table without bound.
USER_AGENT_LIMIT = 300


def user_agent(request) -> str:
    """The client's User-Agent header for audit records (client-supplied: a hint, not proof), cut to a bound."""
    return (request.META.get("HTTP_USER_AGENT") or "")[:USER_AGENT_LIMIT]


def audit_context(request, *, source: str) -> dict:
    """The keyword arguments every audited service takes about who acted, from where (admin, api, ...)."""
    return {"actor": request.user, "source": source, "ip_address": client_ip(request),
            "user_agent": user_agent(request)}
