"""Config history: every change keeps a numbered version (the key only as ciphertext, shown as changed/unchanged),
listed by /api/llm-configs/{id}/versions/ and restored by /rollback/ (validated, audited, itself a version)."""
import json

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from llmconfigs.models import AuditLog, LLMConfig, LLMConfigVersion
from llmconfigs.services import llm_config_rollback, llm_config_update
from tests.fixtures import client_for
from tests.stored_secrets import assert_stored_encrypted

pytestmark = pytest.mark.django_db

URL = "/api/llm-configs/"
OLD_KEY = "sk-version-old-key-0123456789"
NEW_KEY = "sk-version-new-key-9876543210"


def test_each_change_is_a_numbered_version_with_the_key_encrypted(make_llm_config, staff_user):
    config = make_llm_config(api_key=OLD_KEY, temperature=0.5)
    llm_config_update(config=config, temperature=0.2, actor=staff_user, source="api")
    llm_config_update(config=config, api_key=NEW_KEY, actor=staff_user, source="api")
    llm_config_update(config=config, description="")  # no change: no version

    versions = list(LLMConfigVersion.objects.filter(config=config).order_by("number"))
    assert [v.number for v in versions] == [1, 2, 3]
    assert [v.fields["temperature"] for v in versions] == [0.5, 0.2, 0.2]
    assert [v.key_changed for v in versions] == [False, False, True]
    assert versions[1].actor == staff_user and versions[1].source == "api"
    assert "api_key" not in versions[0].fields
    assert_stored_encrypted(versions[0], "api_key", OLD_KEY, secrets=(OLD_KEY,))
    assert_stored_encrypted(versions[2], "api_key", NEW_KEY, secrets=(NEW_KEY,))


def test_numbers_are_unique_per_config_in_the_database(make_llm_config):
    config = make_llm_config()
    with pytest.raises(IntegrityError), transaction.atomic():
        LLMConfigVersion.objects.create(config=config, number=1, fields={})


def test_versions_endpoint_lists_who_when_diff_and_never_the_key(staff_client, staff_user, make_llm_config):
    config = make_llm_config(api_key=OLD_KEY, temperature=0.5)
    staff_client.patch(f"{URL}{config.pk}/", {"temperature": 0.3, "api_key": NEW_KEY}, format="json")

    response = staff_client.get(f"{URL}{config.pk}/versions/")

    assert response.status_code == 200
    body = response.json()
    assert [v["number"] for v in body] == [2, 1]
    assert body[0]["actor"] == staff_user.pk and body[0]["actor_repr"] == "staff" and body[0]["source"] == "api"
    assert body[0]["api_key"] == "changed" and body[1]["api_key"] == "unchanged"
    assert body[0]["diff"] == {"temperature": {"old": 0.5, "new": 0.3}}
    assert body[1]["diff"] == {} and body[1]["fields"]["temperature"] == 0.5
    assert body[0]["created_at"]
    text = json.dumps(body)
    for secret in (OLD_KEY, NEW_KEY, OLD_KEY[-4:], NEW_KEY[-4:]):
        assert secret not in text


def test_versions_need_view_permission(user_client, make_llm_config):
    config = make_llm_config()
    assert user_client.get(f"{URL}{config.pk}/versions/").status_code == 403


def test_rollback_restores_fields_and_the_old_key_and_is_audited(staff_client, staff_user, make_llm_config):
    config = make_llm_config(api_key=OLD_KEY, temperature=0.5, description="first")
    staff_client.patch(f"{URL}{config.pk}/", {"temperature": 0.3, "description": "second", "api_key": NEW_KEY},
                       format="json")
    assert LLMConfig.objects.get(pk=config.pk).api_key == NEW_KEY

    response = staff_client.post(f"{URL}{config.pk}/rollback/", {"version": 1}, format="json",
                                 REMOTE_ADDR="10.1.2.3", HTTP_USER_AGENT="rollback-test/1")

    assert response.status_code == 200, response.content
    assert response.json()["temperature"] == 0.5 and response.json()["description"] == "first"
    fresh = LLMConfig.objects.get(pk=config.pk)
    assert fresh.api_key == OLD_KEY and fresh.api_key_mask == "sk-…6789"
    assert_stored_encrypted(fresh, "api_key", OLD_KEY, secrets=(OLD_KEY,))
    row = AuditLog.objects.get(action="rollback")
    assert (row.actor, row.source, row.ip_address, row.user_agent) == (staff_user, "api", "10.1.2.3",
                                                                       "rollback-test/1")
    assert row.target_id == str(config.pk) and row.changes["version"] == 1
    assert row.changes["temperature"] == {"old": 0.3, "new": 0.5}
    assert "api_key" in row.changes
    assert OLD_KEY not in json.dumps(row.changes) and NEW_KEY not in json.dumps(row.changes)
    latest = LLMConfigVersion.objects.filter(config=config).order_by("-number").first()
    assert (latest.number, latest.action, latest.rolled_back_from, latest.key_changed) == (3, "rollback", 1, True)
    assert OLD_KEY not in response.content.decode() and NEW_KEY not in response.content.decode()


def test_rollback_needs_change_permission(user_client, make_llm_config):
    config = make_llm_config()
    llm_config_update(config=config, temperature=0.1)
    assert user_client.post(f"{URL}{config.pk}/rollback/", {"version": 1}, format="json").status_code == 403
    assert LLMConfig.objects.get(pk=config.pk).temperature == 0.1


def test_rollback_to_a_missing_version_is_a_400_on_version(staff_client, make_llm_config):
    config = make_llm_config()
    response = staff_client.post(f"{URL}{config.pk}/rollback/", {"version": 7}, format="json")
    assert response.status_code == 400
    assert "version" in json.dumps(response.json())
    bad = staff_client.post(f"{URL}{config.pk}/rollback/", {"version": "x"}, format="json")
    assert bad.status_code == 400 and "version" in bad.json()


def test_rollback_is_validated_like_an_update(make_llm_config):
    """A version whose name another config has taken since cannot be restored; nothing changes."""
    config = make_llm_config(name="alpha")
    llm_config_update(config=config, name="beta")
    make_llm_config(name="alpha")
    with pytest.raises(ValidationError, match="name"):
        llm_config_rollback(config=config, version=1)
    assert LLMConfig.objects.get(pk=config.pk).name == "beta"
    assert not AuditLog.objects.filter(action="rollback").exists()


def test_a_config_from_before_versions_gets_its_state_as_version_1_on_first_change(make_llm_config):
    config = make_llm_config(temperature=0.6)
    LLMConfigVersion.objects.filter(config=config).delete()
    llm_config_update(config=config, temperature=0.1)
    versions = list(LLMConfigVersion.objects.filter(config=config).order_by("number"))
    assert [(v.number, v.action, v.fields["temperature"]) for v in versions] == [(1, "initial", 0.6),
                                                                                   (2, "update", 0.1)]
    llm_config_rollback(config=config, version=1)
    assert LLMConfig.objects.get(pk=config.pk).temperature == 0.6


def test_rollback_from_another_user_client(make_llm_config, grant, plain_user):
    config = make_llm_config(temperature=0.4)
    llm_config_update(config=config, temperature=0.9)
    user = grant(plain_user, "llmconfigs.change_llmconfig")
    assert client_for(user).post(f"{URL}{config.pk}/rollback/", {"version": 1}, format="json").status_code == 200
    assert LLMConfig.objects.get(pk=config.pk).temperature == 0.4


def test_a_rollback_the_validation_refuses_is_a_400_naming_the_field(staff_client, make_llm_config):
    config = make_llm_config(name="alpha")
    llm_config_update(config=config, name="beta")
    make_llm_config(name="alpha")
    response = staff_client.post(f"{URL}{config.pk}/rollback/", {"version": 1}, format="json")
    assert response.status_code == 400, response.content
    assert "name" in response.json()
    assert LLMConfig.objects.get(pk=config.pk).name == "beta"


def test_rolling_back_the_default_to_an_inactive_version_is_refused(staff_client, make_llm_config):
    from llmconfigs.services import llm_config_activate, llm_config_deactivate, llm_config_set_default

    config = make_llm_config()
    llm_config_deactivate(config=config)
    llm_config_activate(config=config)
    llm_config_set_default(config=config)
    response = staff_client.post(f"{URL}{config.pk}/rollback/", {"version": 2}, format="json")
    assert response.status_code == 400 and "version" in json.dumps(response.json())
    assert LLMConfig.objects.get(pk=config.pk).is_active
