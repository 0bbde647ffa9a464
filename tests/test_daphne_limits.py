"""opsagent.daphne_limits' request class, driven without a server: what Twisted does with a body before daphne hands
it to the app."""
from __future__ import annotations

from types import SimpleNamespace

from twisted.web.test.requesthelper import DummyChannel

from opsagent.daphne_limits import BoundedWebRequest


class _Received(BoundedWebRequest):
    """Stops where daphne would start the app (process)."""

    processed = False

    def process(self):
        self.processed = True


def test_a_form_post_reaches_the_app_as_sent_without_twisted_parsing_it():
    """Daphne never reads Twisted's `request.args`; parsing a form body into it (and every POST's Content-Type
    through the email package) was CPU spent on each request for nothing."""
    channel = DummyChannel()
    channel.factory = SimpleNamespace(server=SimpleNamespace(protocol_connected=lambda request: None))
    body = b"user=u1&query=hello"
    request = _Received(channel)
    request.gotLength(len(body))
    request.handleContentChunk(body)
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/x-www-form-urlencoded"])
    request.requestReceived(b"POST", b"/v1/chat-messages", b"HTTP/1.1")
    assert request.processed
    assert request.args == {}
    assert request.content.read() == body
