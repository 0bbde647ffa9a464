"""Size limits inside daphne. Daphne (through Twisted) reads a whole request body, into memory or a temporary file,
before the ASGI app hears of the request, then queues all of it for the app at once: a limit checked by the app comes
too late to save that memory. This request class applies `opsagent.common.limits` while the body arrives, so a body
over its path's limit is answered with the surface's 413 as soon as its size is known and is never stored. WebSocket
messages get WEBSOCKET_MESSAGE_MAX_BYTES as daphne's own limit, closed with 1009 (daphne's default drops the
connection without a close frame, and an app may not send 1009 through it)."""
from __future__ import annotations

import io
import sys
from urllib.parse import unquote

from daphne import http_protocol, ws_protocol
from django.conf import settings
from twisted.web.http import Request

from opsagent.common.limits import body_limit, too_large

# After the 413, what the client still sends is read and dropped for this long before the connection closes: closing
# on unread data resets the connection, and the client could lose the answer before reading it.
LINGER_SECONDS = 2.0
REASONS = {413: b"Payload Too Large"}
# Daphne writes every part of a response body with `http.Request.write`, reading `Request` from `twisted.web.http` each
# time: a module behind Twisted's deprecation proxy, whose attribute reads run Python-level hooks. Read once here.
_request_write = Request.write


def _request_path(channel) -> str:
    # Twisted keeps the request line on the channel until the body has arrived (a private attribute, the only place
    # the path is known this early); daphne decodes the path the same way for the scope.
    raw = getattr(channel, "_path", b"") or b""
    return unquote(raw.split(b"?", 1)[0].decode("ascii", "replace"))


class BoundedWebRequest(http_protocol.WebRequest):
    """Daphne's request, with the body counted as it arrives against its path's limit."""

    refused = False
    body_received = 0
    body_max = None

    def __init__(self, *args, **kwargs):
        # Twisted parses a POST's form body into `request.args` (the Content-Type through the email package first:
        # about 40 us for every POST, any type) unless told not to; daphne never reads `args` and hands the app the
        # raw body, which Django parses itself.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)

    def gotLength(self, length):
        path = _request_path(self.channel)
        self.body_max = body_limit(path)
        if length is not None and length > self.body_max:
            # No "100 Continue" after the answer: the client need not send the body at all.
            self.requestHeaders.removeHeader(b"Expect")
            self.content = io.BytesIO()
            self._refuse(path)
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.refused:
            return
        self.body_received += len(data)
        if self.body_max is not None and self.body_received > self.body_max:
            self.content.truncate(0)
            self._refuse(_request_path(self.channel))
            return
        super().handleContentChunk(data)

    def handle_reply(self, message):
        # A part of a streamed body with more to come (every event of a stream): what daphne does with it, without the
        # lookup through the proxy module (about a tenth of the server's CPU for a long streamed answer).
        if (message.get("more_body") and message.get("type") == "http.response.body" and self._response_started
                and not self.finished and self.channel is not None):
            _request_write(self, message.get("body", b""))
            return
        super().handle_reply(message)

    def requestReceived(self, command, path, version):
        if self.refused:  # the body ended while it was being dropped: nothing to hand to the app
            return
        super().requestReceived(command, path, version)

    def _refuse(self, path: str) -> None:
        from twisted.internet import reactor  # daphne has installed its reactor by the time a request arrives

        self.refused = True
        refusal = too_large(path, self.body_max)
        head = [b"HTTP/1.1 %d %s" % (refusal.status, REASONS[refusal.status])]
        head += [name + b": " + value for name, value in refusal.raw_headers()]
        head += [b"Content-Length: %d" % len(refusal.body), b"Connection: close"]
        channel = self.channel
        channel.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + refusal.body)
        channel.dataReceived = lambda data: None
        reactor.callLater(LINGER_SECONDS, channel.transport.loseConnection)


class BoundedWebSocketFactory(ws_protocol.WebSocketFactory):
    def setProtocolOptions(self, **options):
        limit = settings.WEBSOCKET_MESSAGE_MAX_BYTES
        for name in ("maxMessagePayloadSize", "maxFramePayloadSize"):
            options[name] = min(options.get(name) or limit, limit)
        super().setProtocolOptions(failByDrop=False, **options)


def install() -> None:
    """Make daphne build its requests from BoundedWebRequest (its HTTP factory looks the class up by this name) and,
    inside a daphne process (whose server module is loaded before the app), its WebSocket factory from
    BoundedWebSocketFactory."""
    http_protocol.WebRequest = BoundedWebRequest
    server = sys.modules.get("daphne.server")
    if server is not None:
        server.WebSocketFactory = BoundedWebSocketFactory
