"""Documents given by URL: fetched with bounds, never from private addresses unless allowed, redirects re-checked."""
from __future__ import annotations

import pytest

from agentcore.remote_files import RemoteFileError, remote_address_refusal, remote_file_fetch
from agentcore.tests.factories import LocalHTTPServer


class DocumentServer(LocalHTTPServer):
    """A few documents, a redirect, a redirect loop and a redirect to the cloud metadata address."""

    def __init__(self) -> None:
        super().__init__({})
        self.routes.update({
            "/notes.md": (200, {}, b"# Disk\n/var is 93% full"),
            "/big.txt": (200, {}, b"x" * 5000),
            "/hop": (302, {"Location": "/notes.md"}, b""),
            "/away": (302, {"Location": f"http://169.254.169.254:{self.port}/latest/meta-data"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
        })
        self.url = self.base_url


@pytest.fixture
def documents():
    server = DocumentServer()
    yield server
    server.close()


@pytest.fixture
def private_allowed(settings):
    settings.REMOTE_FILES_ALLOW_PRIVATE = True


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.10", "169.254.169.254", "::1",
                                     "::ffff:127.0.0.1", "fd00::1", "100.64.0.1", "0.0.0.0", "224.0.0.1"])
def test_private_and_special_addresses_are_refused_by_default(address):
    assert remote_address_refusal(address) == "not a public address"


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
def test_public_addresses_are_allowed(address):
    assert remote_address_refusal(address) is None


async def test_a_loopback_url_is_refused_without_a_request(documents):
    with pytest.raises(RemoteFileError, match="resolves to 127.0.0.1, not a public address"):
        await remote_file_fetch(f"{documents.url}/notes.md", max_bytes=10_000)
    assert documents.requests == []


@pytest.mark.usefixtures("private_allowed")
async def test_a_document_is_fetched_and_redirects_are_followed(documents):
    assert await remote_file_fetch(f"{documents.url}/notes.md", max_bytes=10_000) == b"# Disk\n/var is 93% full"
    assert await remote_file_fetch(f"{documents.url}/hop", max_bytes=10_000) == b"# Disk\n/var is 93% full"
    assert documents.requests == ["/notes.md", "/hop", "/notes.md"]


async def test_a_redirect_is_checked_again(documents, monkeypatch):
    import agentcore.remote_files as remote_files

    # The first hop's address passes (as a public one would); the redirect's target is checked as the first was.
    checked = []

    def first_only(address):
        checked.append(address)
        return None if len(checked) == 1 else "not a public address"

    monkeypatch.setattr(remote_files, "remote_address_refusal", first_only)
    with pytest.raises(RemoteFileError, match="169.254.169.254, not a public address"):
        await remote_file_fetch(f"{documents.url}/away", max_bytes=10_000)
    assert documents.requests == ["/away"]


@pytest.mark.usefixtures("private_allowed")
async def test_size_status_and_redirect_limits(documents):
    with pytest.raises(RemoteFileError, match="larger than 1000 bytes"):
        await remote_file_fetch(f"{documents.url}/big.txt", max_bytes=1000)
    with pytest.raises(RemoteFileError, match="answered HTTP 404"):
        await remote_file_fetch(f"{documents.url}/gone.txt", max_bytes=1000)
    with pytest.raises(RemoteFileError, match="more than 3 redirects"):
        await remote_file_fetch(f"{documents.url}/loop", max_bytes=1000)
    with pytest.raises(RemoteFileError, match="only http and https"):
        await remote_file_fetch("file:///etc/passwd", max_bytes=1000)


@pytest.mark.usefixtures("private_allowed")
async def test_the_request_goes_to_the_checked_address_with_the_names_host_header(documents):
    port = documents.url.rsplit(":", 1)[1]
    assert await remote_file_fetch(f"http://localhost:{port}/notes.md", max_bytes=10_000)
    assert documents.hosts[-1] == f"localhost:{port}"
