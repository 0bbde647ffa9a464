"""ASGI entry point: Django for HTTP, with the Dify streaming consumer and the agent WebSocket routed by Channels, all
behind the limits on request bodies and WebSocket messages."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "opsagent.settings")
# Build Django's app first: it sets up the app registry the consumers' imports need.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from agentcore.routing import websocket_application  # noqa: E402
from difyapi.routing import http_urlpatterns as dify_http_urlpatterns  # noqa: E402
from opsagent import daphne_limits  # noqa: E402
from opsagent.common.limits import HttpBodyLimit, WebSocketMessageLimit  # noqa: E402
from opsagent.common.rlimits import open_files_limit_raise  # noqa: E402

daphne_limits.install()
open_files_limit_raise()  # each stream holds two sockets: a soft limit of 1,024 fails near 500 streams

application = ProtocolTypeRouter(
    {
        "http": HttpBodyLimit(URLRouter([*dify_http_urlpatterns, re_path(r"", django_asgi_app)])),
        "websocket": WebSocketMessageLimit(websocket_application),
    }
)
