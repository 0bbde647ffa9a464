"""Services: create/update/delete/activate/deactivate/set-default/test-connection, each audited, keys only masked."""
import json
import socket

import pytest
from django.core.exceptions import ValidationError

from llmconfigs.errors import ConfigInactive, ConfigProtected
from llmconfigs.models import AuditLog, LLMConfig
from llmconfigs.selectors import llm_config_default, llm_config_resolve
from llmconfigs.services import (
    llm_config_activate,
    llm_config_create,
    llm_config_deactivate,
    llm_config_delete,
    llm_config_record_usage,
    llm_config_set_default,
    llm_config_test_connection,
    llm_config_update,
)
from tests.fakes.upstream import Reply

pytestmark = pytest.mark.django_db

KEY = "sk-proj-servicetest-0123456789abcdef"


def _audits(config, action):
    return list(AuditLog.objects.filter(target_id=str(config.pk), action=action))


def test_create_masks_key_and_audits_who_what_where(make_llm_config, staff_user):
    config = make_llm_config(api_key=KEY, actor=staff_user, source="api", ip_address="10.1.2.3")

    assert config.api_key_mask == "sk-…cdef"
    assert LLMConfig.objects.get(pk=config.pk).api_key == KEY
    (row,) = _audits(config, "create")
    assert (row.actor, row.source, row.ip_address) == (staff_user, "api", "10.1.2.3")
    assert row.changes["api_key"] == {"new": "sk-…cdef"}
    assert row.changes["model_name"] == {"new": config.model_name}
    assert KEY not in json.dumps(row.changes)


def test_update_with_blank_key_keeps_it_and_audits_only_changes(make_llm_config):
    config = make_llm_config(api_key=KEY, temperature=0.5)

    llm_config_update(config=config, api_key="", temperature=0.9, source="api")

    fresh = LLMConfig.objects.get(pk=config.pk)
    assert fresh.api_key == KEY
    assert fresh.temperature == 0.9
    (row,) = _audits(config, "update")
    assert row.changes == {"temperature": {"old": 0.5, "new": 0.9}}


def test_update_with_new_key_records_both_masks(make_llm_config):
    config = make_llm_config(api_key=KEY)
    llm_config_update(config=config, api_key="sk-other-key-99998888")
    (row,) = _audits(config, "update")
    assert row.changes["api_key"] == {"old": "sk-…cdef", "new": "sk-…8888"}
    assert LLMConfig.objects.get(pk=config.pk).api_key == "sk-other-key-99998888"


def test_update_refuses_out_of_range_for_provider_with_field_message(make_llm_config):
    config = make_llm_config(provider="moonshot")
    with pytest.raises(ValidationError) as excinfo:
        llm_config_update(config=config, temperature=1.5)
    assert "temperature" in excinfo.value.message_dict
    assert "[0, 1]" in excinfo.value.message_dict["temperature"][0]
    assert LLMConfig.objects.get(pk=config.pk).temperature == 0.7


def test_update_is_default_takes_the_default_from_the_old_one(make_llm_config):
    old = make_llm_config(default=True)
    new = make_llm_config()
    llm_config_update(config=new, is_default=True)
    assert list(LLMConfig.objects.filter(is_default=True)) == [LLMConfig.objects.get(pk=new.pk)]
    assert not LLMConfig.objects.get(pk=old.pk).is_default


def test_delete_refuses_the_default_and_says_why(make_llm_config):
    config = make_llm_config(default=True)
    with pytest.raises(ConfigProtected) as excinfo:
        llm_config_delete(config=config)
    assert "default" in excinfo.value.message
    assert LLMConfig.objects.filter(pk=config.pk).exists()


def test_delete_removes_and_audits_with_the_id(make_llm_config, staff_user):
    config = make_llm_config()
    config_id = config.pk
    llm_config_delete(config=config, actor=staff_user, source="admin")
    assert not LLMConfig.objects.filter(pk=config_id).exists()
    row = AuditLog.objects.get(action="delete")
    assert row.target_id == str(config_id)
    assert row.actor == staff_user


def test_deactivate_default_is_refused_and_others_toggle_with_audit(make_llm_config):
    default = make_llm_config(default=True)
    other = make_llm_config()

    with pytest.raises(ConfigProtected):
        llm_config_deactivate(config=default)
    llm_config_deactivate(config=other)
    assert not LLMConfig.objects.get(pk=other.pk).is_active
    llm_config_activate(config=other)
    assert LLMConfig.objects.get(pk=other.pk).is_active
    assert [a.action for a in AuditLog.objects.filter(target_id=str(other.pk)).order_by("id")] == [
        "create", "deactivate", "activate"
    ]


def test_activating_a_keyless_config_of_a_keyed_provider_is_refused(make_llm_config):
    config = make_llm_config(api_key="", is_active=False)
    with pytest.raises(ValidationError) as excinfo:
        llm_config_activate(config=config)
    assert "api_key" in excinfo.value.message_dict


def test_set_default_moves_the_flag_and_refreshes_the_cache(make_llm_config):
    first = make_llm_config(default=True)
    second = make_llm_config()
    assert llm_config_resolve().pk == first.pk  # now cached

    llm_config_set_default(config=second)

    assert llm_config_resolve().pk == second.pk
    assert LLMConfig.objects.filter(is_default=True).count() == 1
    row = AuditLog.objects.get(action="set_default", target_id=str(second.pk))
    assert row.changes["previous_default"] == [first.name]


def test_set_default_refuses_an_inactive_config(make_llm_config):
    config = make_llm_config(is_active=False)
    with pytest.raises(ConfigInactive):
        llm_config_set_default(config=config)


def test_embedding_and_chat_defaults_are_independent(make_llm_config):
    chat = make_llm_config(default=True)
    embedding = make_llm_config(is_embedding=True, default=True)
    assert llm_config_default().pk == chat.pk
    assert llm_config_default(is_embedding=True).pk == embedding.pk


def test_record_usage_adds_counts_tokens_and_cost(make_llm_config):
    from decimal import Decimal

    config = make_llm_config()
    llm_config_record_usage(config_id=config.pk, prompt_tokens=10, completion_tokens=5, cost=Decimal("0.001"))
    llm_config_record_usage(config_id=config.pk, prompt_tokens=1, completion_tokens=2)
    fresh = LLMConfig.objects.get(pk=config.pk)
    assert (fresh.usage_count, fresh.prompt_tokens_total, fresh.completion_tokens_total, fresh.total_tokens_total) == (
        2, 11, 7, 18
    )
    assert fresh.cost_total == Decimal("0.001")
    assert fresh.last_used_at is not None


def test_record_usage_sums_costs_ignores_negative_counts_and_touches_only_its_config(make_llm_config):
    from decimal import Decimal

    from django.utils import timezone

    config, other = make_llm_config(), make_llm_config()
    before = timezone.now()
    llm_config_record_usage(config_id=config.pk, prompt_tokens=4, completion_tokens=6, cost=Decimal("0.0000030"))
    llm_config_record_usage(config_id=str(config.pk), prompt_tokens=-5, completion_tokens=-7,
                            cost=Decimal("0.0000012"))
    fresh = LLMConfig.objects.get(pk=config.pk)
    assert (fresh.usage_count, fresh.prompt_tokens_total, fresh.completion_tokens_total, fresh.total_tokens_total) == (
        2, 4, 6, 10
    )
    assert fresh.cost_total == Decimal("0.0000042")
    assert before <= fresh.last_used_at <= timezone.now()
    untouched = LLMConfig.objects.get(pk=other.pk)
    assert (untouched.usage_count, untouched.total_tokens_total, untouched.last_used_at) == (0, 0, None)


def test_record_usage_without_token_counts_counts_the_call_and_adds_no_tokens(make_llm_config):
    config = make_llm_config()
    llm_config_record_usage(config_id=config.pk)
    llm_config_record_usage(config_id=config.pk, completion_tokens=3)
    fresh = LLMConfig.objects.get(pk=config.pk)
    assert (fresh.usage_count, fresh.prompt_tokens_total, fresh.completion_tokens_total, fresh.total_tokens_total,
            fresh.cost_total) == (2, 0, 3, 3, 0)


# ----- connection test against the real fake upstream -----


def test_connection_test_success_streams_a_minimal_call(make_llm_config, fake_upstream, staff_user):
    config = make_llm_config(api_key=KEY, model_name="probe-model")
    fake_upstream.script(Reply(text="pong"))

    result = llm_config_test_connection(config=config, actor=staff_user, source="api", ip_address="127.0.0.1")

    assert result.ok and result.latency_ms > 0
    sent = fake_upstream.chat_requests[-1]
    assert sent.body["model"] == "probe-model"
    assert sent.api_key == KEY
    assert sent.body["stream"] is True  # the same mode as production
    assert sent.body["max_completion_tokens"] == 8
    row = AuditLog.objects.get(action="test_connection")
    assert row.changes["ok"] is True and row.actor == staff_user


def test_connection_test_401_reports_auth_with_the_echoed_key_scrubbed(make_llm_config, fake_upstream):
    config = make_llm_config(api_key=KEY)
    fake_upstream.script(Reply(status=401, error_message="Incorrect API key provided: {api_key}"))

    result = llm_config_test_connection(config=config)

    assert fake_upstream.chat_requests[-1].api_key == KEY  # the fake really echoed it
    assert not result.ok
    assert (result.category, result.status_code) == ("auth", 401)
    assert "Incorrect API key provided" in result.message
    assert KEY not in result.message
    assert KEY not in json.dumps(AuditLog.objects.get(action="test_connection").changes)


def test_connection_test_500_is_an_upstream_error(make_llm_config, fake_upstream):
    config = make_llm_config()
    fake_upstream.script(Reply(status=500, error_message="boom"))
    result = llm_config_test_connection(config=config)
    assert (result.ok, result.category, result.status_code) == (False, "upstream_error", 500)


def test_connection_test_unreachable_on_a_closed_port(make_llm_config):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = make_llm_config(base_url=f"http://127.0.0.1:{port}/v1")
    result = llm_config_test_connection(config=config)
    assert (result.ok, result.category) == (False, "unreachable")


def test_connection_test_times_out_with_the_short_timeout(make_llm_config, fake_upstream, settings):
    settings.LLM_CONNECTION_TEST_TIMEOUT = 0.3
    config = make_llm_config()
    fake_upstream.script(Reply(text="late", first_delay=3.0))
    result = llm_config_test_connection(config=config)
    assert (result.ok, result.category) == (False, "timeout")
    assert result.latency_ms < 2500


def test_connection_test_of_an_embedding_config_embeds(make_llm_config, fake_upstream):
    config = make_llm_config(is_embedding=True, model_name="embed-small")
    result = llm_config_test_connection(config=config)
    assert result.ok
    sent = fake_upstream.requests[-1]
    assert sent.path.endswith("/embeddings")
    assert sent.body["model"] == "embed-small"
    assert sent.api_key == config.api_key


@pytest.mark.parametrize(
    ("provider", "path_prefix"),
    [("deepseek", "/deepseek/v1"), ("tongyi", "/compatible-mode/v1"), ("zhipu", "/api/paas/v4")],
)
def test_connection_test_reaches_each_providers_base_url(make_llm_config, fake_upstream, provider, path_prefix):
    host = fake_upstream.base_url.removesuffix("/v1")
    config = make_llm_config(provider=provider, base_url=host + path_prefix, temperature=0.5, top_p=0.5)
    assert llm_config_test_connection(config=config).ok
    assert fake_upstream.chat_requests[-1].path == f"{path_prefix}/chat/completions"


def test_create_refuses_a_duplicate_name_per_field(make_llm_config):
    make_llm_config(name="dup")
    with pytest.raises(ValidationError) as excinfo:
        llm_config_create(name="dup", provider="openai", model_name="m", api_key="sk-zzzzzzzzzzzzzzz")
    assert "name" in excinfo.value.message_dict


def test_extra_config_refuses_headers_and_unknown_keys(make_llm_config):
    # extra_config is readable by every API user, so it must not become a second place for credentials.
    with pytest.raises(ValidationError) as excinfo:
        make_llm_config(extra_config={"default_headers": {"X-Api-Key": "hdr-secret-0123456789"}})
    assert "extra_config" in excinfo.value.message_dict
    assert not LLMConfig.objects.filter(extra_config__has_key="default_headers").exists()


def test_a_change_made_by_another_process_is_seen_by_the_next_lookup(make_llm_config):
    from django.core.cache import cache

    from llmconfigs.selectors import llm_config_cache_invalidate, llm_config_get

    config = make_llm_config(model_name="model-a")
    assert llm_config_get(config_id=config.pk).model_name == "model-a"  # cached under the current generation
    assert llm_config_get(config_id=config.pk).model_name == "model-a"  # answered from that entry

    # Another worker changes the row and invalidates the shared cache; this process's services are not involved.
    LLMConfig.objects.filter(pk=config.pk).update(model_name="model-b")
    llm_config_cache_invalidate()
    assert llm_config_get(config_id=config.pk).model_name == "model-b"

    # The shared cache lost everything (a Redis restart): the lookup starts a generation again and reads the row.
    LLMConfig.objects.filter(pk=config.pk).update(model_name="model-c")
    cache.clear()
    assert llm_config_get(config_id=config.pk).model_name == "model-c"


def test_a_flushed_cache_is_read_again_even_at_the_first_generation(make_llm_config):
    """The process keeps the configs it built per generation: a flush that restarts the generation at the number this
    process holds must not bring back what it built before."""
    from django.core.cache import cache

    from llmconfigs.selectors import llm_config_get

    cache.clear()
    config = make_llm_config(model_name="model-a")
    assert llm_config_get(config_id=config.pk).model_name == "model-a"
    LLMConfig.objects.filter(pk=config.pk).update(model_name="model-b")
    cache.clear()
    assert llm_config_get(config_id=config.pk).model_name == "model-b"


def test_each_lookup_gets_its_own_instance(make_llm_config):
    from llmconfigs.selectors import llm_config_get, llm_pool_resolve

    config = make_llm_config(model_name="model-a", is_default=True)
    first = llm_config_get(config_id=config.pk)
    first.model_name = "changed by a caller"
    first.temperature = 1.9
    again = llm_config_get(config_id=config.pk)
    assert (again.model_name, again.temperature) == ("model-a", config.temperature)
    assert again.api_key == config.api_key and not again._state.adding
    pool = llm_pool_resolve()
    pool[0].model_name = "changed too"
    assert llm_pool_resolve()[0].model_name == "model-a"


def test_a_change_right_after_a_flush_is_seen(make_llm_config):
    """A flushed cache's next generation is never one this process built configs under before."""
    from django.core.cache import cache

    from llmconfigs.selectors import llm_config_cache_invalidate, llm_config_get

    config = make_llm_config(model_name="model-a")
    cache.clear()
    llm_config_cache_invalidate()  # a change made on an empty cache
    assert llm_config_get(config_id=config.pk).model_name == "model-a"
    LLMConfig.objects.filter(pk=config.pk).update(model_name="model-b")
    cache.clear()
    llm_config_cache_invalidate()  # the same again, after a flush
    assert llm_config_get(config_id=config.pk).model_name == "model-b"


def test_a_rotated_key_is_read_from_the_cache_as_the_new_key(make_llm_config):
    from llmconfigs.selectors import llm_config_get
    from llmconfigs.services import llm_config_update

    config = make_llm_config(api_key="sk-first-key-000000000000")
    assert llm_config_get(config_id=config.pk).api_key == "sk-first-key-000000000000"
    assert llm_config_get(config_id=config.pk).api_key == "sk-first-key-000000000000"  # from the cache entry

    llm_config_update(config=LLMConfig.objects.get(pk=config.pk), api_key="sk-second-key-11111111111")
    assert llm_config_get(config_id=config.pk).api_key == "sk-second-key-11111111111"
    assert llm_config_get(config_id=config.pk).api_key == "sk-second-key-11111111111"


def _generation_reads(monkeypatch) -> list[str]:
    """Every read of the config generation from the shared cache (a spy: the cache still answers)."""
    from django.core.cache import cache

    reads: list[str] = []
    get, get_many = cache.get, cache.get_many

    def spy_get(key, *args, **kwargs):
        reads.extend([key] if key == "llmconfig:generation" else [])
        return get(key, *args, **kwargs)

    def spy_get_many(keys, *args, **kwargs):
        reads.extend(key for key in keys if key == "llmconfig:generation")
        return get_many(keys, *args, **kwargs)

    monkeypatch.setattr(cache, "get", spy_get)
    monkeypatch.setattr(cache, "get_many", spy_get_many)
    return reads


def test_a_turn_preparation_reads_the_config_generation_once(make_llm_config, monkeypatch):
    from agentcore.models import AgentApp
    from agentcore.runs import TurnRequest, turn_prepare

    config = make_llm_config(model_name="model-a", is_default=True)
    app = AgentApp.objects.create(name="snapshot", mode="chat", llm_config=config)
    turn_prepare(TurnRequest(app=app, query="hello", end_user="u", source="api"))  # builds the entries
    reads = _generation_reads(monkeypatch)
    turn = turn_prepare(TurnRequest(app=app, query="again", end_user="u", source="api"))
    assert turn.config.model_name == "model-a"
    assert len(reads) == 1


def test_a_snapshot_sees_one_generation_and_the_next_lookup_sees_a_change(make_llm_config):
    from llmconfigs.selectors import llm_config_cache_invalidate, llm_config_get, llm_config_snapshot

    config = make_llm_config(model_name="model-a")
    with llm_config_snapshot():
        assert llm_config_get(config_id=config.pk).model_name == "model-a"
        # Another worker changes the row meanwhile: the snapshot's lookups stay consistent with each other.
        LLMConfig.objects.filter(pk=config.pk).update(model_name="model-b")
        llm_config_cache_invalidate()
        assert llm_config_get(config_id=config.pk).model_name == "model-a"
    assert llm_config_get(config_id=config.pk).model_name == "model-b"
    with llm_config_snapshot():  # and a new snapshot starts from the current generation
        assert llm_config_get(config_id=config.pk).model_name == "model-b"
