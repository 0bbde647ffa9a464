"""The agent's WebSocket routes, authenticated by the Django session or a `?token=<DRF token>` query parameter."""
from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http.request import validate_host
from django.urls import path

from agentcore.consumers import SessionConsumer
from opsagent.common.client_input import text_problem
from opsagent.common.clients import scope_client_ip
from opsagent.common.throttling import auth_failure_record, auth_locked_for


@database_sync_to_async
def _token_user(key: str, ip: str | None):
    """The token's user; None for a wrong token (counted against the address) and for any token while the address is
    locked after too many failures."""
    from rest_framework.authtoken.models import Token

    if auth_locked_for(ip=ip):
        return None
    # A NUL character: no token has one, and PostgreSQL would refuse the query.
    if text_problem(key) is None:
        token = Token.objects.select_related("user").filter(key=key).first()
        if token and token.user.is_active:
            return token.user
    auth_failure_record(ip=ip)
    return None


def _cross_site(scope) -> bool:
    """True when a browser opened the socket from a page on another host. Browsers always send Origin on a
    WebSocket; other clients may not, and they can't carry a victim's session cookie anyway."""
    origin = dict(scope.get("headers", [])).get(b"origin")
    if origin is None:
        return False
    host = urlsplit(origin.decode("latin1")).hostname or ""
    return not validate_host(host, settings.ALLOWED_HOSTS)


class TokenAuthMiddleware:
    """Sets scope["user"] from `?token=` when one is given (browsers can't send an Authorization header on a
    WebSocket). Otherwise the session user set by AuthMiddlewareStack stays, unless the page that opened the socket
    is on another host: a session cookie is not proof of intent from a foreign page (cross-site WebSocket
    hijacking)."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        keys = parse_qs(scope.get("query_string", b"").decode("latin1")).get("token")
        if keys:
            scope = {**scope, "user": await _token_user(keys[0], scope_client_ip(scope)) or AnonymousUser()}
        elif _cross_site(scope):
            scope = {**scope, "user": AnonymousUser()}
        return await self.inner(scope, receive, send)


websocket_urlpatterns = [
    path("ws/agent/sessions/<uuid:session_id>/", SessionConsumer.as_asgi()),
]
websocket_application = AuthMiddlewareStack(TokenAuthMiddleware(URLRouter(websocket_urlpatterns)))
