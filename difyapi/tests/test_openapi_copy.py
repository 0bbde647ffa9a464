"""The project's copy of the structure of Dify's schemas (dify_schemas.json) is the document's, when it is at hand."""
import json

import pytest

from difyapi.tests.openapi import BUNDLED, document_path, schema_errors, schemas_structure


def test_the_bundled_schemas_are_the_documents():
    path = document_path()
    if path is None:
        pytest.skip("Dify's openapi_service.json is not beside this checkout (set DIFY_OPENAPI_JSON)")
    assert json.loads(BUNDLED.read_text()) == schemas_structure(json.loads(path.read_text())), (
        "dify_schemas.json is stale: python -m difyapi.tests.openapi <openapi_service.json>")


def test_the_bundled_schemas_still_validate():
    # Their validating keywords survived the copy: a body missing required fields, or with a wrong type, is caught.
    assert schema_errors({"id": "x"}, "ConversationListItem")
    assert any("name" in error for error in schema_errors(
        {"id": "c", "name": 5, "inputs": {}, "status": "normal", "introduction": "", "created_at": 1,
         "updated_at": 1}, "ConversationListItem"))
