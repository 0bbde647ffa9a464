"""The LLM config admin: pages never show the key, forms validate per provider, actions go through the services."""
import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.messages import get_messages
from django.urls import reverse

from llmconfigs.models import AuditLog, LLMConfig
from tests.fakes.upstream import Reply
from tests.stored_secrets import assert_stored_encrypted

pytestmark = pytest.mark.django_db

KEY = "sk-admin-secret-key-77aa88bb99cc"
CHANGELIST = reverse("admin:llmconfigs_llmconfig_changelist")
ADD = reverse("admin:llmconfigs_llmconfig_add")


def _change_url(config):
    return reverse("admin:llmconfigs_llmconfig_change", args=[config.pk])


def _form(config, **overrides):
    """The change form as a browser would post it."""
    data = {
        "name": config.name, "provider": config.provider, "model_name": config.model_name, "base_url": config.base_url,
        "description": config.description, "temperature": config.temperature, "top_p": config.top_p,
        "max_tokens": config.max_tokens or "", "frequency_penalty": config.frequency_penalty,
        "presence_penalty": config.presence_penalty, "is_active": "on" if config.is_active else "",
        "is_embedding": "on" if config.is_embedding else "", "input_price_per_million": "",
        "output_price_per_million": "", "currency": config.currency, "extra_config": "{}", "new_api_key": "",
        "route": config.route, "priority": config.priority, "weight": config.weight,
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v != ""} | {"new_api_key": data["new_api_key"]}


def _messages(response):
    return [str(m) for m in get_messages(response.wsgi_request)]


def _action(admin_client, action, configs):
    return admin_client.post(
        CHANGELIST, {"action": action, "_selected_action": [str(c.pk) for c in configs]}, follow=True
    )


def test_changelist_shows_columns_and_mask_never_the_key(admin_client, make_llm_config):
    make_llm_config(api_key=KEY, name="visible-one", default=True)
    html = admin_client.get(CHANGELIST).content.decode()
    assert "visible-one" in html and "sk-…99cc" in html
    columns = ("Model", "Pool · priority · weight", "Health", "State", "Usage", "Key")
    for column in columns:
        assert column in html
    # Related facts share a column, so that the list fits a 1400 px screen.
    assert "active, default, chat" in html and "0 calls, 0 errors · tokens 0 in / 0 out / 0 total" in html
    assert "last used never" in html and '<span class="quiet">OpenAI</span>' in html
    assert KEY not in html


def test_search_by_name_and_model(admin_client, make_llm_config):
    make_llm_config(name="findme", model_name="m-one")
    make_llm_config(name="other", model_name="special-model")
    assert "findme" in admin_client.get(CHANGELIST + "?q=findme").content.decode()
    html = admin_client.get(CHANGELIST + "?q=special").content.decode()
    assert "other" in html and "findme" not in html


def test_filtering_on_the_key_is_refused(admin_client, make_llm_config):
    make_llm_config(api_key=KEY)
    for query in (f"?api_key={KEY}", "?api_key__isnull=False", "?api_key__startswith=sk"):
        response = admin_client.get(CHANGELIST + query)
        assert response.status_code == 400, query


def test_change_form_masks_the_key_and_shows_provider_help(admin_client, make_llm_config):
    config = make_llm_config(api_key=KEY)
    html = admin_client.get(_change_url(config)).content.decode()
    assert KEY not in html
    assert "sk-…99cc" in html
    assert 'name="new_api_key"' in html and 'type="password"' in html
    assert "https://open.bigmodel.cn/api/paas/v4" in html  # provider table: default base URL
    assert "(0, 1)" in html  # zhipu's top_p range
    assert "Test connection" in html


def test_blank_new_key_keeps_the_key_and_saves_through_the_service(admin_client, make_llm_config):
    config = make_llm_config(api_key=KEY, temperature=0.5)
    response = admin_client.post(_change_url(config), _form(config, temperature="0.9"))
    assert response.status_code == 302, response.content.decode()[:2000]
    fresh = LLMConfig.objects.get(pk=config.pk)
    assert (fresh.api_key, fresh.temperature) == (KEY, 0.9)
    audit = AuditLog.objects.get(action="update", target_id=str(config.pk))
    assert audit.source == "admin" and audit.changes == {"temperature": {"old": 0.5, "new": 0.9}}


def test_a_new_key_replaces_it_and_history_does_not_contain_it(admin_client, make_llm_config):
    config = make_llm_config(api_key=KEY)
    new_key = "sk-brand-new-admin-key-1234abcd"
    admin_client.post(_change_url(config), _form(config, new_api_key=new_key))
    assert LLMConfig.objects.get(pk=config.pk).api_key == new_key
    assert_stored_encrypted(config, "api_key", new_key, secrets=(new_key,))

    entry = LogEntry.objects.get(object_id=str(config.pk))
    assert new_key not in entry.change_message and KEY not in entry.change_message
    history = admin_client.get(reverse("admin:llmconfigs_llmconfig_history", args=[config.pk])).content.decode()
    assert "New API key" in history
    assert new_key not in history and KEY not in history
    assert new_key not in admin_client.get(_change_url(config)).content.decode()


def test_per_provider_validation_shows_field_messages(admin_client, make_llm_config):
    config = make_llm_config(temperature=0.5, top_p=0.5)
    response = admin_client.post(_change_url(config), _form(config, provider="zhipu", top_p="1.0"))
    assert response.status_code == 200
    assert "Zhipu GLM accepts top_p in (0, 1), got 1." in response.content.decode()
    assert LLMConfig.objects.get(pk=config.pk).provider == "openai"


def test_active_config_without_key_errors_on_the_new_key_field(admin_client, make_llm_config):
    config = make_llm_config(api_key="", is_active=False)
    response = admin_client.post(_change_url(config), _form(config, is_active="on"))
    assert response.status_code == 200
    assert "needs an API key" in response.content.decode()
    assert response.context["adminform"].form.errors["new_api_key"]


def test_add_through_the_admin(admin_client, fake_upstream):
    data = {
        "name": "added", "provider": "deepseek", "model_name": "deepseek-chat", "base_url": fake_upstream.base_url,
        "temperature": "0.7", "top_p": "1", "frequency_penalty": "0", "presence_penalty": "0", "is_active": "on",
        "currency": "USD", "extra_config": "{}", "new_api_key": KEY, "priority": "0", "weight": "1",
    }
    response = admin_client.post(ADD, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    config = LLMConfig.objects.get(name="added")
    assert config.api_key == KEY and config.api_key_mask == "sk-…99cc"
    assert AuditLog.objects.filter(action="create", target_id=str(config.pk), source="admin").exists()
    assert KEY not in LogEntry.objects.get(object_id=str(config.pk)).change_message


def test_set_as_default_action_needs_exactly_one(admin_client, make_llm_config):
    first, second = make_llm_config(), make_llm_config()
    response = _action(admin_client, "set_as_default", [first, second])
    assert "Select exactly one configuration" in " ".join(_messages(response))
    assert not LLMConfig.objects.filter(is_default=True).exists()

    response = _action(admin_client, "set_as_default", [second])
    assert f"{second.name} is now the default." in _messages(response)
    assert LLMConfig.objects.get(is_default=True).pk == second.pk


def test_activate_and_deactivate_actions_report_per_config(admin_client, make_llm_config):
    default = make_llm_config(default=True)
    other = make_llm_config()
    response = _action(admin_client, "deactivate", [default, other])
    texts = _messages(response)
    assert any(default.name in t and "cannot be deactivated" in t for t in texts)
    assert f"{other.name} is inactive." in texts
    assert LLMConfig.objects.get(pk=default.pk).is_active
    assert not LLMConfig.objects.get(pk=other.pk).is_active

    response = _action(admin_client, "activate", [other])
    assert f"{other.name} is active." in _messages(response)
    assert LLMConfig.objects.get(pk=other.pk).is_active


def test_test_connection_action_one_message_per_config(admin_client, make_llm_config, fake_upstream):
    good = make_llm_config(name="good-one")
    bad = make_llm_config(name="bad-one", api_key=KEY)
    fake_upstream.script(Reply(status=401, error_message="Incorrect API key provided: {api_key}"),
                         Reply(text="pong"))
    # The changelist orders by name: bad-one is called first and gets the 401.
    response = _action(admin_client, "test_connection", [good, bad])
    texts = _messages(response)
    assert len(texts) == 2
    assert any(t.startswith("good-one: connection OK") for t in texts)
    assert any(t.startswith("bad-one: connection failed (auth)") for t in texts)
    assert KEY not in response.content.decode()


def test_test_connection_button_posts_and_reports(admin_client, make_llm_config, fake_upstream):
    config = make_llm_config()
    url = reverse("admin:llmconfigs_llmconfig_test_connection", args=[config.pk])
    assert admin_client.get(url).status_code == 403
    response = admin_client.post(url, follow=True)
    assert any("connection OK" in t for t in _messages(response))


def test_the_default_cannot_be_deleted_from_the_admin(admin_client, make_llm_config):
    default = make_llm_config(default=True)
    other = make_llm_config()
    response = admin_client.post(reverse("admin:llmconfigs_llmconfig_delete", args=[default.pk]), {"post": "yes"},
                                 follow=True)
    assert any("cannot be deleted" in t for t in _messages(response))
    assert LLMConfig.objects.filter(pk=default.pk).exists()
    admin_client.post(reverse("admin:llmconfigs_llmconfig_delete", args=[other.pk]), {"post": "yes"})
    assert not LLMConfig.objects.filter(pk=other.pk).exists()
    assert AuditLog.objects.filter(action="delete", target_id=str(other.pk), source="admin").exists()


def test_audit_log_admin_is_read_only_and_shows_only_masks(admin_client, make_llm_config):
    config = make_llm_config(api_key=KEY)
    row = AuditLog.objects.get(action="create", target_id=str(config.pk))
    changelist = admin_client.get(reverse("admin:llmconfigs_auditlog_changelist"))
    detail = admin_client.get(reverse("admin:llmconfigs_auditlog_change", args=[row.pk]))
    assert changelist.status_code == detail.status_code == 200
    assert "sk-…99cc" in detail.content.decode()
    for page in (changelist, detail):
        assert KEY not in page.content.decode()
    assert admin_client.get(reverse("admin:llmconfigs_auditlog_add")).status_code == 403
    assert 'name="_save"' not in detail.content.decode()


def test_deactivating_the_default_in_the_change_form_is_an_error_not_a_crash(admin_client, make_llm_config):
    default = make_llm_config(default=True)
    response = admin_client.post(_change_url(default), _form(default, is_active=""))
    assert response.status_code == 200
    assert "The default config must be active." in response.content.decode()
    assert LLMConfig.objects.get(pk=default.pk).is_active


def test_routing_columns_and_a_test_connection_that_brings_a_refused_key_back(admin_client, make_llm_config,
                                                                             fake_upstream):
    from llmconfigs.errors import ProviderCallError
    from llmconfigs.routing import provider_failure_record

    config = make_llm_config(name="pooled", model_name="m-1", route="big-model", priority=3, weight=2, api_key=KEY)
    provider_failure_record(config=config, error=ProviderCallError("auth", f"bad key {KEY}", status_code=401))
    html = admin_client.get(CHANGELIST).content.decode()
    assert "big-model" in html and "auth_failed" in html and KEY not in html
    html = admin_client.get(_change_url(config)).content.decode()
    assert 'name="route"' in html and 'name="weight"' in html and "auth_failed" in html

    fake_upstream.script(Reply(text="pong"))
    _action(admin_client, "test_connection", [config])
    assert LLMConfig.objects.get(pk=config.pk).auth_failed_at is None
    assert "auth_failed" not in admin_client.get(CHANGELIST).content.decode()


def test_the_list_shows_each_rows_cooldown_from_one_cache_read(admin_client, make_llm_config):
    from django.core.cache import cache

    from llmconfigs.errors import ProviderCallError
    from llmconfigs.routing import provider_failure_record

    members = [make_llm_config(name=f"member-{n}", route="pool") for n in range(4)]
    provider_failure_record(config=members[2], error=ProviderCallError("rate_limit", "slow down", status_code=429))
    # Round trips to the cache: get_many counts once (the local-memory cache implements it with get).
    reads, inside = [], []
    real_get, real_get_many = cache.get, cache.get_many

    def get(key, *args, **kwargs):
        if not inside:
            reads.append([key])
        return real_get(key, *args, **kwargs)

    def get_many(keys, *args, **kwargs):
        reads.append(list(keys))
        inside.append(True)
        try:
            return real_get_many(keys, *args, **kwargs)
        finally:
            inside.pop()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache, "get", get)
        patch.setattr(cache, "get_many", get_many)
        html = admin_client.get(CHANGELIST + "?q=member").content.decode()
    rows = {name: html.split(f">{name}<", 1)[1].split("</tr>", 1)[0] for name in ("member-1", "member-2")}
    assert "cooling_down until" in rows["member-2"] and "rate_limit: slow down" in rows["member-2"]
    assert "cooling_down" not in rows["member-1"]
    assert len([keys for keys in reads if any("llmhealth:cool" in str(key) for key in keys)]) == 1


# ----- config history -----


def test_versions_page_shows_a_readable_diff_and_rolls_back_with_csrf(make_llm_config, django_user_model):
    from django.test import Client

    old_key, new_key = "sk-admin-version-old-1111aaaa", "sk-admin-version-new-2222bbbb"
    config = make_llm_config(api_key=old_key, temperature=0.5)
    user = django_user_model.objects.create_superuser(username="root", password="pw-root-123", email="r@x.io")
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    page = browser.get(_change_url(config))
    browser.post(_change_url(config), _form(config, temperature="0.9", new_api_key=new_key,
                                            csrfmiddlewaretoken=page.cookies["csrftoken"].value))
    versions_url = reverse("admin:llmconfigs_llmconfig_versions", args=[config.pk])
    assert f'href="{versions_url}"' in browser.get(_change_url(config)).content.decode()

    html = browser.get(versions_url).content.decode()

    assert "<code>temperature</code>: 0.5 &rarr; 0.9" in html
    assert "changed" in html and "unchanged" in html
    for secret in (old_key, new_key, old_key[-4:], new_key[-4:]):
        assert secret not in html
    rollback_url = reverse("admin:llmconfigs_llmconfig_rollback", args=[config.pk, 1])
    assert f'action="{rollback_url}"' in html and "Roll back to this version" in html
    assert browser.post(rollback_url).status_code == 403  # no CSRF token
    assert browser.get(rollback_url).status_code == 403  # a GET changes nothing
    assert LLMConfig.objects.get(pk=config.pk).api_key == new_key

    response = browser.post(rollback_url, {"csrfmiddlewaretoken": browser.cookies["csrftoken"].value}, follow=True)

    assert "is back to version 1." in " ".join(_messages(response))
    fresh = LLMConfig.objects.get(pk=config.pk)
    assert (fresh.temperature, fresh.api_key) == (0.5, old_key)
    row = AuditLog.objects.get(action="rollback")
    assert row.source == "admin" and row.actor == user and row.changes["version"] == 1


def test_rollback_button_needs_change_permission(client, django_user_model, grant, make_llm_config):
    config = make_llm_config(temperature=0.5)
    from llmconfigs.services import llm_config_update

    llm_config_update(config=config, temperature=0.9)
    viewer = django_user_model.objects.create_user(username="viewer", password="pw-view-123", is_staff=True)
    viewer = grant(viewer, "llmconfigs.view_llmconfig")
    client.force_login(viewer)
    html = client.get(reverse("admin:llmconfigs_llmconfig_versions", args=[config.pk])).content.decode()
    assert "Roll back to this version" not in html and "0.5 &rarr; 0.9" in html
    assert client.post(reverse("admin:llmconfigs_llmconfig_rollback", args=[config.pk, 1])).status_code == 403
    assert LLMConfig.objects.get(pk=config.pk).temperature == 0.9
