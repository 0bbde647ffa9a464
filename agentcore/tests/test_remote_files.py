"""Documents given by URL: fetched with bounds, private targets only through the app's allow-list, every address of
every hop checked (no request is made when one of them may not be reached)."""
from __future__ import annotations

import pytest

from agentcore.network import NOTHING_PRIVATE, NetworkAllowList, parse_networks
from agentcore.remote_files import RemoteFileError, remote_file_fetch
from agentcore.tests.factories import LocalHTTPServer

LOOPBACK = NetworkAllowList(networks=parse_networks(["127.0.0.1/32", "::1/128"]))
PUBLIC = "93.184.215.14"


class DocumentServer(LocalHTTPServer):
    """A few documents, a redirect, a redirect loop and redirects to names the tests' DNS answers for."""

    def __init__(self) -> None:
        super().__init__({})
        self.routes.update({
            "/notes.md": (200, {}, b"# Disk\n/var is 93% full"),
            "/big.txt": (200, {}, b"x" * 5000),
            "/hop": (302, {"Location": "/notes.md"}, b""),
            "/away": (302, {"Location": f"http://169.254.169.254:{self.port}/latest/meta-data"}, b""),
            "/to-mixed": (302, {"Location": f"http://mixed.example:{self.port}/notes.md"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/r4": (302, {"Location": "/r3"}, b""),
            "/r3": (302, {"Location": "/r2"}, b""),
            "/created": (201, {"Location": "/notes.md"}, b"made"),
            "/refused": (400, {}, b"bad request"),
            "/large": (200, {}, bytes(range(256)) * 1024),
            "/r2": (302, {"Location": "/r1"}, b""),
            "/r1": (302, {"Location": "/notes.md"}, b""),
        })
        self.url = self.base_url


@pytest.fixture
def documents():
    server = DocumentServer()
    yield server
    server.close()


async def test_a_loopback_url_is_refused_without_a_request(documents):
    with pytest.raises(RemoteFileError, match="resolves to 127.0.0.1, a private address"):
        await remote_file_fetch(f"{documents.url}/notes.md", max_bytes=10_000, allow=NOTHING_PRIVATE)
    assert documents.requests == []


async def test_an_allow_list_for_another_port_opens_nothing(documents):
    allow = NetworkAllowList(networks=parse_networks(["127.0.0.0/8"]), ports=frozenset({documents.port + 1}))
    with pytest.raises(RemoteFileError, match="a private address"):
        await remote_file_fetch(f"{documents.url}/notes.md", max_bytes=10_000, allow=allow)
    assert documents.requests == []


async def test_a_document_is_fetched_and_redirects_are_followed(documents):
    assert await remote_file_fetch(f"{documents.url}/notes.md", max_bytes=10_000, allow=LOOPBACK) == \
        b"# Disk\n/var is 93% full"
    assert await remote_file_fetch(f"{documents.url}/hop", max_bytes=10_000, allow=LOOPBACK) == \
        b"# Disk\n/var is 93% full"
    assert documents.requests == ["/notes.md", "/hop", "/notes.md"]
    assert documents.agents == ["OpsAgent"] * 3  # the name the fetched server's logs show for every hop


async def test_a_redirect_to_metadata_is_refused_even_when_the_first_hop_is_allowed(documents, outbound_connections):
    with pytest.raises(RemoteFileError, match="169.254.169.254, a link-local address"):
        await remote_file_fetch(f"{documents.url}/away", max_bytes=10_000, allow=LOOPBACK)
    assert documents.requests == ["/away"]
    assert outbound_connections == [("127.0.0.1", documents.port)]


@pytest.mark.parametrize("answers", [
    [PUBLIC, "127.0.0.1"], ["127.0.0.1", PUBLIC],
    [PUBLIC, "169.254.169.254"], ["169.254.169.254", PUBLIC],
    [PUBLIC, "fd00:ec2::254"], ["100.100.100.200", PUBLIC],
], ids=lambda answers: "+".join(answers))
async def test_a_name_with_one_refused_address_is_not_fetched(documents, scripted_dns, outbound_connections, answers):
    # The DNS form of SSRF: a name that resolves to a public address and a private or metadata one, in either order.
    scripted_dns.answers["mixed.example"] = answers
    with pytest.raises(RemoteFileError, match="refused: mixed.example resolves to"):
        await remote_file_fetch(f"http://mixed.example:{documents.port}/notes.md", max_bytes=10_000,
                                allow=NOTHING_PRIVATE)
    assert outbound_connections == []
    assert documents.requests == []


@pytest.mark.parametrize("answers", [[PUBLIC, "10.1.2.3"], ["10.1.2.3", PUBLIC], [PUBLIC, "169.254.169.254"],
                                     ["169.254.169.254", PUBLIC]], ids=lambda answers: "+".join(answers))
async def test_a_redirect_to_a_name_with_one_refused_address_is_not_followed(documents, scripted_dns,
                                                                           outbound_connections, answers):
    scripted_dns.answers["mixed.example"] = answers
    with pytest.raises(RemoteFileError, match="refused: mixed.example resolves to"):
        await remote_file_fetch(f"{documents.url}/to-mixed", max_bytes=10_000, allow=LOOPBACK)
    assert outbound_connections == [("127.0.0.1", documents.port)]  # the first hop only
    assert documents.requests == ["/to-mixed"]


async def test_a_host_on_the_allow_list_is_fetched_from_its_checked_address(documents, scripted_dns):
    scripted_dns.answers["docs.internal"] = ["127.0.0.1"]
    allow = NetworkAllowList(hosts=frozenset({"docs.internal"}), ports=frozenset({documents.port}))
    assert await remote_file_fetch(f"http://docs.internal:{documents.port}/notes.md", max_bytes=10_000,
                                   allow=allow) == b"# Disk\n/var is 93% full"
    assert documents.hosts == [f"docs.internal:{documents.port}"]


async def test_size_status_and_redirect_limits(documents):
    with pytest.raises(RemoteFileError, match="larger than 1000 bytes"):
        await remote_file_fetch(f"{documents.url}/big.txt", max_bytes=1000, allow=LOOPBACK)
    with pytest.raises(RemoteFileError, match="answered HTTP 404"):
        await remote_file_fetch(f"{documents.url}/gone.txt", max_bytes=1000, allow=LOOPBACK)
    with pytest.raises(RemoteFileError, match="more than 3 redirects"):
        await remote_file_fetch(f"{documents.url}/loop", max_bytes=1000, allow=LOOPBACK)
    with pytest.raises(RemoteFileError, match="only http and https"):
        await remote_file_fetch("file:///etc/passwd", max_bytes=1000, allow=LOOPBACK)


async def test_the_request_goes_to_the_checked_address_with_the_names_host_header(documents, outbound_connections):
    # The connection goes to the address that was checked, not to the name (whose second lookup could answer
    # differently: DNS rebinding).
    assert await remote_file_fetch(f"http://localhost:{documents.port}/notes.md", max_bytes=10_000, allow=LOOPBACK)
    assert documents.hosts[-1] == f"localhost:{documents.port}"
    assert outbound_connections == [("127.0.0.1", documents.port)]


async def test_three_redirects_are_followed(documents):
    assert await remote_file_fetch(f"{documents.url}/r3", max_bytes=10_000, allow=LOOPBACK) == \
        b"# Disk\n/var is 93% full"
    assert documents.requests == ["/r3", "/r2", "/r1", "/notes.md"]


async def test_a_fourth_redirect_is_not_followed_and_a_location_without_a_redirect_is_not_one(documents):
    with pytest.raises(RemoteFileError, match=r"^more than 3 redirects$"):
        await remote_file_fetch(f"{documents.url}/r4", max_bytes=10_000, allow=LOOPBACK)
    assert documents.requests == ["/r4", "/r3", "/r2", "/r1"]
    assert await remote_file_fetch(f"{documents.url}/created", max_bytes=10_000, allow=LOOPBACK) == b"made"


async def test_a_proxy_from_the_environment_is_not_used(documents, monkeypatch):
    # A proxy would resolve the name again, unchecked: the fetch goes to the checked address or nowhere.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert await remote_file_fetch(f"{documents.url}/notes.md", max_bytes=10_000, allow=LOOPBACK) == \
        b"# Disk\n/var is 93% full"


async def test_a_server_that_never_answers_is_given_up_after_the_fetch_timeout(monkeypatch):
    import socket
    import time

    from agentcore import remote_files

    monkeypatch.setattr(remote_files, "FETCH_TIMEOUT_SECONDS", 0.5)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # connections are accepted by the kernel; nothing is ever sent back
    try:
        started = time.monotonic()
        with pytest.raises(RemoteFileError, match=r"^127.0.0.1 did not answer within 0.5 s$"):
            await remote_file_fetch(f"http://127.0.0.1:{silent.getsockname()[1]}/", max_bytes=100, allow=LOOPBACK)
        assert time.monotonic() - started < 4
    finally:
        silent.close()


async def test_a_body_of_exactly_the_limit_is_whole_and_a_400_is_an_error(documents):
    large = bytes(range(256)) * 1024
    assert await remote_file_fetch(f"{documents.url}/large", max_bytes=len(large), allow=LOOPBACK) == large
    with pytest.raises(RemoteFileError, match=r"^127.0.0.1 answered HTTP 400$"):
        await remote_file_fetch(f"{documents.url}/refused", max_bytes=1000, allow=LOOPBACK)


async def test_a_body_without_a_declared_length_is_bounded_while_it_streams():
    import socket
    import threading

    body = b"y" * 3000
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve() -> None:  # HTTP/1.0 without Content-Length: the body ends when the connection closes
        for _ in range(2):
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/stream"
    try:
        assert await remote_file_fetch(url, max_bytes=3000, allow=LOOPBACK) == body
        with pytest.raises(RemoteFileError, match=r"^larger than 2999 bytes$"):
            await remote_file_fetch(url, max_bytes=2999, allow=LOOPBACK)
    finally:
        listener.close()


async def test_a_connection_error_names_the_host_and_the_error():
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with pytest.raises(RemoteFileError, match=r"^127.0.0.1: ConnectError$"):
        await remote_file_fetch(f"http://127.0.0.1:{port}/", max_bytes=100, allow=LOOPBACK)
