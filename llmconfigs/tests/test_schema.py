"""The OpenAPI schema of /api generates cleanly and describes the LLM config endpoints; Swagger UI is served offline."""
import re

import pytest
import yaml
from django.core.management import call_command

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def schema(tmp_path_factory, django_db_blocker):
    path = tmp_path_factory.mktemp("schema") / "schema.yaml"
    with django_db_blocker.unblock():
        # --fail-on-warn: any warning or error of drf-spectacular fails the test (SchemaGenerationError).
        call_command("spectacular", "--fail-on-warn", "--validate", "--file", str(path))
    return yaml.safe_load(path.read_text())


def test_schema_describes_the_llm_config_endpoints(schema):
    paths = schema["paths"]
    for expected in (
        "/api/llm-configs/", "/api/llm-configs/{id}/", "/api/llm-configs/default/", "/api/llm-configs/providers/",
        "/api/llm-configs/{id}/set-default/", "/api/llm-configs/{id}/activate/", "/api/llm-configs/{id}/deactivate/",
        "/api/llm-configs/{id}/test/", "/api/audit-logs/",
    ):
        assert expected in paths, expected
    assert set(paths["/api/llm-configs/{id}/"]) >= {"get", "put", "patch", "delete"}
    list_params = {p["name"] for p in paths["/api/llm-configs/"]["get"]["parameters"]}
    assert {"is_active", "is_embedding", "provider", "search", "page", "page_size"} <= list_params


def test_the_key_is_write_only_in_the_schema(schema):
    components = schema["components"]["schemas"]
    assert components["LLMConfig"]["properties"]["api_key"]["writeOnly"] is True
    assert components["LLMConfig"]["properties"]["api_key_mask"]["readOnly"] is True
    assert components["ConnectionTest"]["properties"]["ok"]["type"] == "boolean"


def test_schema_and_docs_are_served(staff_client, client):
    assert staff_client.get("/api/schema/").status_code == 200
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "cdn.jsdelivr.net" not in html and "unpkg.com" not in html
    script = re.search(r'src="([^"]*swagger-ui-bundle\.js)"', html).group(1)
    assert client.get(script).status_code == 200  # the bundle comes from the sidecar package, no internet needed
