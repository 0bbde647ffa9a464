"""Sniffing an upload's type from its bytes, and the type and disposition each stored type is served with."""
import pytest

from difyapi.filetypes import INLINE_TYPES, SERVED_TYPES, served_type, sniff_mime_type

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
GIF = b"GIF89a\x01\x00\x01\x00"
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 "
HTML = b"<!doctype html><script>alert(document.domain)</script>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'


@pytest.mark.parametrize(("head", "extension", "mime_type"), [
    (PNG, "png", "image/png"), (JPEG, "jpg", "image/jpeg"), (JPEG, "jpeg", "image/jpeg"), (GIF, "gif", "image/gif"),
    (WEBP, "webp", "image/webp"), (PNG, "jpg", "image/png"), (b"GIF87a", "gif", "image/gif"),
])
def test_raster_images_are_known_by_their_signature(head, extension, mime_type):
    assert sniff_mime_type(head, extension=extension) == mime_type


@pytest.mark.parametrize("head", [HTML, SVG, b"", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"%PDF-1.7", b"\x89PNX"])
def test_an_image_name_on_other_bytes_is_refused(head):
    assert sniff_mime_type(head, extension="png") is None


@pytest.mark.parametrize(("head", "extension", "mime_type"), [
    (b"%PDF-1.4\n", "pdf", "application/pdf"),
    (b"PK\x03\x04\x14\x00", "xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
    (b"PK\x03\x04\x14\x00", "epub", "application/epub+zip"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00", "xls", "application/vnd.ms-excel"),
])
def test_binary_documents_need_their_container_signature(head, extension, mime_type):
    assert sniff_mime_type(head, extension=extension) == mime_type
    assert sniff_mime_type(HTML, extension=extension) is None


@pytest.mark.parametrize(("head", "extension", "mime_type"), [
    (b"plain words", "txt", "text/plain"), (b"a,b\n1,2\n", "csv", "text/csv"),
    (b'{"a": 1}', "json", "application/json"), (b"# Title", "md", "text/markdown"),
    ("caf\xe9".encode("latin-1"), "csv", "text/csv"), ("日本語".encode()[:-1], "txt", "text/plain"),
])
def test_text_documents(head, extension, mime_type):
    assert sniff_mime_type(head, extension=extension) == mime_type


@pytest.mark.parametrize("extension", ["html", "htm", "xml", "txt"])
@pytest.mark.parametrize("head", [HTML, SVG, b'<html xmlns="http://www.w3.org/1999/xhtml"><script/></html>'])
def test_markup_is_plain_text_whatever_its_name(head, extension):
    assert sniff_mime_type(head, extension=extension) == "text/plain"


@pytest.mark.parametrize("head", [b"MZ\x90\x00", "text".encode("utf-16"), PNG])
def test_binaries_are_not_text(head):
    assert sniff_mime_type(head, extension="txt") is None


@pytest.mark.parametrize("extension", ["svg", "xhtml", "exe", "", "mp3"])
def test_extensions_outside_the_allow_list_are_refused(extension):
    assert sniff_mime_type(b"<svg/>", extension=extension) is None


def test_only_raster_images_may_be_inline():
    assert INLINE_TYPES == {"image/png", "image/jpeg", "image/gif", "image/webp"}
    for mime_type in SERVED_TYPES:
        assert served_type(mime_type) == (mime_type, mime_type in INLINE_TYPES)
        assert not mime_type.endswith(("/html", "/xml", "+xml", "javascript"))


@pytest.mark.parametrize("stored", ["text/html", "image/svg+xml", "application/xhtml+xml", "text/xml",
                                    "application/xml", "text/javascript", "image/png; charset=x", ""])
def test_types_the_sniffer_never_gives_are_served_as_opaque_downloads(stored):
    assert served_type(stored) == ("application/octet-stream", False)
