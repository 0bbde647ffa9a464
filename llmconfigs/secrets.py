"""Showing and hiding API keys: the mask shown everywhere, scrubbing keys out of text before it leaves us, and the
origin (scheme, host, port) a stored secret belongs to."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

MASK_HEAD = 3
MASK_TAIL = 4


def mask_secret(secret: str) -> str:
    """`sk-a…f9e2`-style mask: the first 3 and last 4 characters. Short secrets are hidden completely."""
    if not secret:
        return ""
    if len(secret) <= MASK_HEAD + MASK_TAIL + 4:
        return "…" + "*" * 4
    return f"{secret[:MASK_HEAD]}…{secret[-MASK_TAIL:]}"


def scrub(text: str, *secrets: str) -> str:
    """Remove every given secret, and anything that looks like a bearer key, from `text`."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, mask_secret(secret))
    # Keys that providers echo back partially or that we did not know about (e.g. in a proxy's error text).
    text = re.sub(r"(?i)(bearer\s+)[A-Za-z0-9._\-]{8,}", r"\1[redacted]", text)
    return text


_DEFAULT_PORTS = {"http": 80, "https": 443}


def url_origin(url: str) -> str:
    """`scheme://host:port` of `url` (default port filled in, lower case), "" for no URL. A stored secret is sent
    only to the origin it was entered for: two URLs with the same origin reach the same server."""
    url = (url or "").strip()
    if not url:
        return ""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: keep the text, so that any change to it is a change
        return f"{scheme}://{parts.netloc.rsplit('@', 1)[-1].lower()}"
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS.get(scheme, '')}"
