"""Bodies checked against the schemas of Dify's own published OpenAPI document (openapi_service.json, kept beside
the shared SPEC.md, outside the project): `assert_schema(body, "CompletionResponse")` fails the test with every place
where the body breaks the named schema. The schemas' structure (no descriptions or examples) is kept in the project
(dify_schemas.json), so the tests run in any checkout; `python -m difyapi.tests.openapi <openapi_service.json>` writes
it anew from the document, and a test compares the two when the document is at hand. OpenAPI 3.0's `nullable` is
read as JSON Schema's null type, and `oneOf` as `anyOf`: the document's alternatives (the input form's controls)
name no required keys, so an item fits several of them."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = Path(__file__).with_name("dify_schemas.json")
# Where the document itself is looked for: $DIFY_OPENAPI_JSON, else `shared/dify/` beside the checkout or its
# worktree root.
CANDIDATES = (ROOT.parent / "shared" / "dify" / "openapi_service.json",
              ROOT.parent.parent / "shared" / "dify" / "openapi_service.json")
# The keywords that validate; the rest (description, title, example, discriminator, default) only document.
VALIDATING = {"type", "properties", "required", "items", "enum", "$ref", "allOf", "anyOf", "oneOf", "nullable",
              "additionalProperties", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
              "minLength", "maxLength", "pattern", "minItems", "maxItems", "const", "not"}


def document_path() -> Path | None:
    """Dify's document, when it is at hand."""
    if os.environ.get("DIFY_OPENAPI_JSON"):
        return Path(os.environ["DIFY_OPENAPI_JSON"])
    return next((path for path in CANDIDATES if path.is_file()), None)


def schemas_structure(document: dict[str, Any]) -> dict[str, Any]:
    """The validating part of the document's component schemas (what dify_schemas.json holds)."""
    def strip(node: Any, names: bool = False) -> Any:
        if isinstance(node, list):
            return [strip(item) for item in node]
        if not isinstance(node, dict):
            return node
        if names:  # the keys of `properties` are field names, not keywords
            return {key: strip(value) for key, value in node.items()}
        return {key: strip(value, names=key == "properties") for key, value in node.items() if key in VALIDATING}

    return {"components": {"schemas": {name: strip(schema)
                                       for name, schema in document["components"]["schemas"].items()}}}


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0 as JSON Schema: `nullable: true` as a null type (or a null branch beside a $ref/allOf), `oneOf`
    as `anyOf`."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {("anyOf" if key == "oneOf" else key): _json_schema(value) for key, value in node.items()}
    if node.pop("nullable", False):
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


@functools.cache
def _components() -> dict[str, Any]:
    document = json.loads(BUNDLED.read_text())
    return {"components": _json_schema(document["components"])}


def schema_errors(body: Any, name: str) -> list[str]:
    """Where `body` breaks components.schemas[name] (empty when it conforms)."""
    schema = {**_components(), "$ref": f"#/components/schemas/{name}"}
    validator = Draft202012Validator(schema, format_checker=FormatChecker())
    return [f"{'/'.join(map(str, error.absolute_path)) or '<body>'}: {error.message}"
            for error in validator.iter_errors(body)]


def assert_schema(body: Any, name: str) -> Any:
    errors = schema_errors(body, name)
    assert not errors, f"{name}: {errors}"
    return body


if __name__ == "__main__":
    import sys

    source = json.loads(Path(sys.argv[1]).read_text())
    BUNDLED.write_text(json.dumps(schemas_structure(source), sort_keys=True, separators=(",", ":")) + "\n")
