"""What an uploaded file is, decided from its bytes (never from the client's declared type or the name alone), and
the type and disposition a browser may get it with."""
from __future__ import annotations

# Enough of the head of a file for every signature below and for telling text from binary.
SNIFF_BYTES = 8192

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "gif"})
TEXT_EXTENSIONS = frozenset({
    "txt", "md", "markdown", "mdx", "csv", "json", "log", "yaml", "yml", "html", "htm", "xml", "eml",
})
ZIP = b"PK\x03\x04"
OLE2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
# Binary documents: the signature their bytes must start with and the type they are reported and served as.
CONTAINER_TYPES = {
    "pdf": (b"%PDF-", "application/pdf"),
    "docx": (ZIP, "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
    "xlsx": (ZIP, "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
    "pptx": (ZIP, "application/vnd.openxmlformats-officedocument.presentationml.presentation"),
    "epub": (ZIP, "application/epub+zip"),
    "xls": (OLE2, "application/vnd.ms-excel"),
    "msg": (OLE2, "application/vnd.ms-outlook"),
}
DOCUMENT_EXTENSIONS = TEXT_EXTENSIONS | frozenset(CONTAINER_TYPES)

# Text keeps a type of its own only where that type is inert in a browser; markup (html, htm, xml, and svg or xhtml
# under a text name) is plain text: the model reads it as text and a browser never gets an active type for it.
TEXT_TYPES = {"csv": "text/csv", "json": "application/json", "md": "text/markdown", "markdown": "text/markdown",
              "mdx": "text/markdown"}
PLAIN_TEXT = "text/plain"

# Raster images a browser renders without running anything: the only types ever served inline.
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# Every type `sniff_mime_type` can give; anything else in the table (a row stored before types were sniffed) is
# served as opaque bytes.
SERVED_TYPES = (INLINE_TYPES | {mime for _, mime in CONTAINER_TYPES.values()} | set(TEXT_TYPES.values())
                | {PLAIN_TEXT})
OPAQUE = "application/octet-stream"


def raster_image_type(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def is_text(head: bytes) -> bool:
    """No NUL byte: UTF-8 and the 8-bit code pages spreadsheets still export qualify, binaries and UTF-16 do not."""
    return b"\x00" not in head


def sniff_mime_type(head: bytes, *, extension: str) -> str | None:
    """The type of a file whose first SNIFF_BYTES are `head` and whose name ends in `.extension`, or None when the
    bytes are not what an accepted extension promises (an image name on HTML, a PDF name on a script, ...)."""
    if extension in IMAGE_EXTENSIONS:
        return raster_image_type(head)
    if extension in CONTAINER_TYPES:
        signature, mime = CONTAINER_TYPES[extension]
        return mime if head.startswith(signature) else None
    if extension in TEXT_EXTENSIONS and is_text(head):
        return TEXT_TYPES.get(extension, PLAIN_TEXT)
    return None


def served_type(stored_mime_type: str) -> tuple[str, bool]:
    """(Content-Type, may be inline) of a stored file: a safe raster image may be shown, anything else is a
    download, and a type this module did not produce is never echoed back."""
    if stored_mime_type in SERVED_TYPES:
        return stored_mime_type, stored_mime_type in INLINE_TYPES
    return OPAQUE, False
