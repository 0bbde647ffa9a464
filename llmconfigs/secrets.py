"""Showing and hiding API keys: the mask shown everywhere, and scrubbing keys out of text before it leaves us."""
from __future__ import annotations

import re

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
