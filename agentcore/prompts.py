"""An app's prompt with a turn's values filled in: Dify's `{{variable}}` placeholders (the app's input form) and
`{{#query#}}`, as a completion app's prompt template uses them."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# Dify's variable names: a letter or underscore, then up to 29 letters, digits or underscores.
PLACEHOLDER = re.compile(r"\{\{([a-zA-Z_][a-zA-Z0-9_]{0,29}|#query#)\}\}")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def prompt_fill(template: str, *, inputs: Mapping[str, Any], query: str = "") -> str:
    """`template` with each placeholder replaced by its input (or the query); one with no value stays as written,
    as Dify leaves it."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name == "#query#":
            return query
        return _text(inputs[name]) if name in inputs else match.group(0)

    return PLACEHOLDER.sub(value, template)
