"""One test per permission rule of /api/llm-configs/ and /api/audit-logs/: a staff user without the permission gets
403 and nothing changes; the same user granted it is let through."""
import pytest

from llmconfigs.models import AuditLog, LLMConfig
from tests.fixtures import client_for

pytestmark = pytest.mark.django_db

URL = "/api/llm-configs/"


def _call(client, method: str, path: str, body=None):
    return getattr(client, method)(path, body, format="json") if body is not None else getattr(client, method)(path)


# (permission, method, path template, body, status when allowed)
RULES = [
    ("llmconfigs.add_llmconfig", "post", URL, {"name": "new", "provider": "openai", "model_name": "m",
                                               "api_key": "sk-new-key-0123456789"}, 201),
    ("llmconfigs.change_llmconfig", "patch", URL + "{id}/", {"temperature": 0.3}, 200),
    ("llmconfigs.change_llmconfig", "put", URL + "{id}/", {"name": "renamed", "provider": "openai",
                                                           "model_name": "m2"}, 200),
    ("llmconfigs.delete_llmconfig", "delete", URL + "{id}/", None, 204),
    ("llmconfigs.change_llmconfig", "post", URL + "{id}/set-default/", None, 200),
    ("llmconfigs.change_llmconfig", "post", URL + "{id}/deactivate/", None, 200),
    ("llmconfigs.change_llmconfig", "post", URL + "{id}/activate/", None, 200),
    ("llmconfigs.change_llmconfig", "post", URL + "{id}/test/", None, 200),
    ("llmconfigs.view_auditlog", "get", "/api/audit-logs/", None, 200),
]


@pytest.mark.parametrize("permission, method, path, body, allowed_status", RULES,
                         ids=[f"{method} {path} needs {perm}" for perm, method, path, *_ in RULES])
def test_each_write_and_sensitive_read_needs_its_permission(bare_staff_user, grant, make_llm_config, fake_upstream,
                                                            permission, method, path, body, allowed_status):
    config = make_llm_config(is_active=path.endswith("/activate/") is False)
    path = path.format(id=config.pk)
    before = list(LLMConfig.objects.values())

    refused = _call(client_for(bare_staff_user), method, path, body)
    assert refused.status_code == 403, refused.content
    assert list(LLMConfig.objects.values()) == before

    allowed = _call(client_for(grant(bare_staff_user, permission)), method, path, body)
    assert allowed.status_code == allowed_status, allowed.content


def test_an_audit_row_needs_view_auditlog(bare_staff_user, grant, make_llm_config):
    make_llm_config()
    row = AuditLog.objects.first()
    assert client_for(bare_staff_user).get(f"/api/audit-logs/{row.pk}/").status_code == 403
    assert client_for(grant(bare_staff_user, "llmconfigs.view_auditlog")).get(f"/api/audit-logs/{row.pk}/").json()[
        "id"] == row.pk


@pytest.mark.parametrize("path", [URL, URL + "{id}/", URL + "default/", URL + "providers/"])
def test_any_authenticated_user_reads_configs_masked(plain_user, make_llm_config, path):
    config = make_llm_config(default=True)
    response = client_for(plain_user).get(path.format(id=config.pk))
    assert response.status_code == 200
    assert config.api_key not in response.content.decode()


def test_a_superuser_needs_no_explicit_permission(django_user_model, make_llm_config):
    root = django_user_model.objects.create_superuser(username="root", password="pw-root-123")
    config = make_llm_config()
    assert client_for(root).patch(f"{URL}{config.pk}/", {"temperature": 0.2}, format="json").status_code == 200
    assert client_for(root).get("/api/audit-logs/").status_code == 200
