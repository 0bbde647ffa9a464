"""Pools: which members are tried in which order (priority, weight, health), and how health changes."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from django.test import override_settings

from llmconfigs.errors import ConfigInactive, ConfigNotFound, ProviderCallError
from llmconfigs.models import AuditLog, LLMConfig
from llmconfigs.routing import cooling_until, health_of, pool_order, provider_failure_record
from llmconfigs.selectors import llm_config_get, llm_pool_resolve
from llmconfigs.services import llm_config_test_connection, llm_config_update
from tests.fakes.upstream import Reply

pytestmark = pytest.mark.django_db


def _names(configs) -> list[str]:
    return [c.name for c in configs]


def test_same_route_is_one_pool_not_an_ambiguity(make_llm_config):
    make_llm_config(name="a", model_name="gpt-x")
    make_llm_config(name="b", model_name="gpt-x-2024", route="gpt-x")
    make_llm_config(name="c", model_name="gpt-x", is_active=False)
    make_llm_config(name="d", model_name="other")
    assert sorted(_names(llm_pool_resolve(model="gpt-x"))) == ["a", "b"]


def test_weights_three_to_one_give_75_25_within_5_percent(make_llm_config):
    make_llm_config(name="heavy", model_name="m", weight=3)
    make_llm_config(name="light", model_name="m", weight=1)
    random.seed(9)
    firsts = Counter(llm_pool_resolve(model="m")[0].name for _ in range(400))
    assert abs(firsts["heavy"] / 400 - 0.75) <= 0.05, firsts
    assert firsts["heavy"] + firsts["light"] == 400


def test_higher_priority_first_lower_only_after(make_llm_config):
    make_llm_config(name="backup", model_name="m", priority=0, weight=100)
    make_llm_config(name="main-1", model_name="m", priority=5)
    make_llm_config(name="main-2", model_name="m", priority=5)
    for _ in range(20):
        order = _names(llm_pool_resolve(model="m"))
        assert sorted(order[:2]) == ["main-1", "main-2"] and order[2] == "backup"


def test_a_config_named_by_id_goes_first_then_its_pool(make_llm_config):
    make_llm_config(name="high", model_name="m", priority=9)
    low = make_llm_config(name="low", model_name="m", priority=0)
    assert _names(llm_pool_resolve(config_id=low.pk)) == ["low", "high"]
    assert _names(llm_pool_resolve(model="low")) == ["low", "high"]


def test_the_default_resolves_to_the_default_configs_pool(make_llm_config):
    make_llm_config(name="main", model_name="m", default=True)
    make_llm_config(name="twin", model_name="other-model", route="m")
    random.seed(1)
    firsts = Counter(llm_pool_resolve()[0].name for _ in range(100))
    assert set(firsts) == {"main", "twin"}


def test_unknown_and_inactive_routes_are_refused(make_llm_config):
    make_llm_config(name="off", model_name="dead", is_active=False)
    with pytest.raises(ConfigInactive):
        llm_pool_resolve(model="dead")
    with pytest.raises(ConfigNotFound):
        llm_pool_resolve(model="nothing-serves-this")


@override_settings(LLM_COOLDOWN_FAILURES=3, LLM_COOLDOWN_SECONDS=60)
def test_three_failures_cool_a_member_down_and_it_goes_last(make_llm_config):
    flaky = make_llm_config(name="flaky", model_name="m", priority=1)
    make_llm_config(name="steady", model_name="m", priority=0)
    error = ProviderCallError("upstream_error", "boom", status_code=500)
    for _ in range(2):
        provider_failure_record(config=flaky, error=error)
    assert _names(llm_pool_resolve(model="m"))[0] == "flaky"
    provider_failure_record(config=flaky, error=error)
    assert _names(llm_pool_resolve(model="m")) == ["steady"]
    health = health_of(llm_config_get(config_id=flaky.pk))
    assert health["state"] == "cooling_down" and health["until"] and health["last_error"] == "upstream_error: boom"
    assert AuditLog.objects.filter(action="health", target_id=str(flaky.pk)).count() == 1
    fresh = LLMConfig.objects.get(pk=flaky.pk)
    assert (fresh.usage_count, fresh.error_count) == (3, 3)

    # A successful connection test ends the cooldown at once, and says so in the audit log.
    assert llm_config_test_connection(config=flaky).ok
    assert _names(llm_pool_resolve(model="m"))[0] == "flaky"
    changes = list(AuditLog.objects.filter(action="health", target_id=str(flaky.pk)).order_by("id")
                   .values_list("changes__health__new", flat=True))
    assert changes == ["cooling_down", "ok"]


def test_a_429_cools_down_at_once(make_llm_config):
    limited = make_llm_config(name="limited", model_name="m")
    provider_failure_record(config=limited, error=ProviderCallError("rate_limit", "slow down", status_code=429))
    assert str(limited.pk) in cooling_until([limited.pk])


def test_auth_failure_excludes_until_a_successful_test(make_llm_config, fake_upstream):
    refused = make_llm_config(name="refused", model_name="m", priority=1)
    make_llm_config(name="fine", model_name="m")
    provider_failure_record(config=refused, error=ProviderCallError("auth", "bad key", status_code=401))
    assert _names(llm_pool_resolve(model="m")) == ["fine"]
    assert health_of(llm_config_get(config_id=refused.pk))["state"] == "auth_failed"
    # It survives a restart: the state is in the database, not only in the cache.
    assert LLMConfig.objects.get(pk=refused.pk).auth_failed_at is not None

    fake_upstream.script(Reply(status=401, error_message="still bad"))
    assert not llm_config_test_connection(config=refused).ok
    assert _names(llm_pool_resolve(model="m")) == ["fine"]

    fake_upstream.script(Reply(text="pong"))
    assert llm_config_test_connection(config=refused).ok
    assert _names(llm_pool_resolve(model="m")) == ["refused", "fine"]
    assert health_of(llm_config_get(config_id=refused.pk))["state"] == "ok"
    changes = list(AuditLog.objects.filter(action="health", target_id=str(refused.pk)).order_by("id")
                   .values_list("changes__health__new", flat=True))
    assert changes == ["auth_failed", "ok"]


def test_a_new_key_clears_auth_failed(make_llm_config):
    refused = make_llm_config(name="refused", model_name="m")
    provider_failure_record(config=refused, error=ProviderCallError("auth", "bad key", status_code=401))
    llm_config_update(config=refused, api_key="sk-brand-new-key-0123456789")
    assert LLMConfig.objects.get(pk=refused.pk).auth_failed_at is None


def test_with_no_member_available_the_unavailable_ones_are_the_last_resort(make_llm_config):
    refused = make_llm_config(name="refused", model_name="m")
    cooled = make_llm_config(name="cooled", model_name="m")
    provider_failure_record(config=refused, error=ProviderCallError("auth", "bad key", status_code=401))
    provider_failure_record(config=cooled, error=ProviderCallError("rate_limit", "slow down", status_code=429))
    assert _names(llm_pool_resolve(model="m")) == ["cooled", "refused"]


def test_a_pool_of_one_is_its_member_whatever_its_health(make_llm_config):
    alone = make_llm_config(name="alone", model_name="solo")
    assert _names(llm_pool_resolve(model="solo")) == ["alone"]
    provider_failure_record(config=alone, error=ProviderCallError("rate_limit", "slow down", status_code=429))
    assert _names(llm_pool_resolve(model="solo")) == ["alone"]
    provider_failure_record(config=alone, error=ProviderCallError("auth", "bad key", status_code=401))
    assert _names(llm_pool_resolve(model="solo")) == ["alone"]
    assert _names(pool_order([], first=LLMConfig.objects.get(pk=alone.pk))) == ["alone"]


def test_weight_below_one_is_refused_by_the_service_and_the_database(make_llm_config):
    from django.core.exceptions import ValidationError
    from django.db import IntegrityError, transaction

    config = make_llm_config(name="w")
    with pytest.raises(ValidationError):
        llm_config_update(config=config, weight=0)
    with pytest.raises(IntegrityError), transaction.atomic():
        LLMConfig.objects.filter(pk=config.pk).update(weight=0)


@pytest.mark.django_db(transaction=True)  # the tests run in threads, on their own connections
def test_llm_health_tests_every_active_config_and_updates_health(make_llm_config, fake_upstream):
    import io

    from django.core.management import CommandError, call_command

    refused = make_llm_config(name="refused-one", model_name="m")
    make_llm_config(name="fine-one", model_name="m")
    make_llm_config(name="off-one", model_name="m", is_active=False)
    provider_failure_record(config=refused, error=ProviderCallError("auth", "bad key", status_code=401))
    out = io.StringIO()
    call_command("llm_health", stdout=out)
    table = out.getvalue()
    assert "refused-one" in table and "fine-one" in table and "off-one" not in table
    assert "All 2 connection test(s) passed." in table
    assert LLMConfig.objects.get(pk=refused.pk).auth_failed_at is None
    assert len(fake_upstream.chat_requests) == 2

    fake_upstream.default = Reply(status=500, error_message="down")
    out = io.StringIO()
    with pytest.raises(CommandError, match="3 of 3"):
        call_command("llm_health", "--all", stdout=out)
    assert "off-one" in out.getvalue() and "upstream_error: down" in out.getvalue()


def test_rest_api_edits_routing_fields_and_shows_health(staff_client, fake_upstream):
    payload = {"name": "api-pooled", "provider": "openai", "model_name": "m-1", "base_url": fake_upstream.base_url,
               "api_key": "sk-api-pooled-0123456789abcdef", "route": "big", "priority": 2, "weight": 3}
    created = staff_client.post("/api/llm-configs/", payload, format="json")
    assert created.status_code == 201, created.json()
    data = created.json()
    assert (data["route"], data["priority"], data["weight"]) == ("big", 2, 3)
    assert data["health"] == {"state": "ok", "until": None, "last_error": ""}
    refused = staff_client.patch(f"/api/llm-configs/{data['id']}/", {"weight": 0}, format="json")
    assert refused.status_code == 400 and "weight" in refused.json()

    config = LLMConfig.objects.get(pk=data["id"])
    provider_failure_record(config=config, error=ProviderCallError("rate_limit", "slow down", status_code=429))
    listed = {row["name"]: row for row in staff_client.get("/api/llm-configs/").json()["results"]}
    health = listed["api-pooled"]["health"]
    assert health["state"] == "cooling_down" and health["until"] and health["last_error"] == "rate_limit: slow down"
    assert listed["api-pooled"]["route"] == "big"
    detail = staff_client.get(f"/api/llm-configs/{data['id']}/").json()
    assert detail["health"]["state"] == "cooling_down" and detail["error_count"] == 1
