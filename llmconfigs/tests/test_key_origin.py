"""A stored key is sent only to the origin (scheme, host, port) it was entered for: moving a config elsewhere needs
the key again, in the services, the REST API and the admin form, and no client is ever built with a key away from
its origin."""
import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from llmconfigs.models import AuditLog, LLMConfig
from llmconfigs.secrets import url_origin
from llmconfigs.services import llm_config_test_connection, llm_config_update
from llmconfigs.tests.test_admin import _form
from tests.fakes.upstream import Reply

pytestmark = pytest.mark.django_db

KEY = "sk-origin-test-key-0123456789abcdef"
NEW_KEY = "sk-origin-test-key-new-9876543210"


@pytest.mark.parametrize("url, origin", [
    ("https://api.openai.com/v1", "https://api.openai.com:443"),
    ("HTTPS://API.OpenAI.com:443/other/path", "https://api.openai.com:443"),
    ("http://127.0.0.1:9100/v1", "http://127.0.0.1:9100"),
    ("http://[::1]/v1", "http://[::1]:80"),
    ("", ""),
    ("http:///v1", "http://:80"),  # no host: an empty one, never a made-up name
    ("ftp://Host.example/x", "ftp://host.example:"),  # no default port known: none invented
    # A port that is not a number: the text after the last "@" (no user info), lower case, kept as it is.
    ("http://Host.Example:8x/v1", "http://host.example:8x"),
    ("http://u:p@a@Host.Example:8x/v1", "http://host.example:8x"),
])
def test_url_origin(url, origin):
    assert url_origin(url) == origin


@pytest.mark.parametrize("change", [
    {"base_url": "http://127.0.0.1:1/v1"},  # another port
    {"base_url": "http://evil.example/v1"},  # another host
    {"base_url": "https://127.0.0.1/v1"},  # another scheme
    {"base_url": "", "provider": "deepseek"},  # the provider's default endpoint
])
def test_moving_the_endpoint_without_the_key_is_refused_and_changes_nothing(make_llm_config, change):
    config = make_llm_config(api_key=KEY)
    with pytest.raises(ValidationError) as refused:
        llm_config_update(config=config, **change)
    assert "api_key" in refused.value.message_dict
    assert KEY not in str(refused.value)
    stored = LLMConfig.objects.get(pk=config.pk)
    assert (stored.base_url, stored.provider) == (config.base_url, config.provider)


def test_a_path_change_on_the_same_origin_keeps_the_key(make_llm_config, fake_upstream):
    config = make_llm_config(api_key=KEY)
    updated = llm_config_update(config=config, base_url=fake_upstream.base_url.rstrip("/") + "/")
    assert updated.api_key == KEY


def test_the_key_entered_again_moves_with_the_config_and_is_audited(make_llm_config, staff_user):
    config = make_llm_config(api_key=KEY)
    old_origin = config.api_key_origin
    updated = llm_config_update(config=config, base_url="http://127.0.0.1:1/v1", api_key=NEW_KEY, actor=staff_user,
                                source="api", ip_address="10.1.2.3", user_agent="pytest-agent/1")
    assert updated.api_key_origin == "http://127.0.0.1:1"
    audit = AuditLog.objects.filter(action="update", target_id=str(config.pk)).get()
    assert (audit.actor, audit.ip_address, audit.user_agent) == (staff_user, "10.1.2.3", "pytest-agent/1")
    assert audit.changes["api_key_origin"] == {"old": old_origin, "new": "http://127.0.0.1:1"}
    assert audit.changes["base_url"]["new"] == "http://127.0.0.1:1/v1"
    assert NEW_KEY not in str(audit.changes) and KEY not in str(audit.changes)


def test_a_keyless_config_moves_freely(make_llm_config):
    config = make_llm_config(provider="ollama", api_key="")
    assert llm_config_update(config=config, base_url="http://10.0.0.5:11434/v1").base_url.startswith("http://10.")


def test_the_api_refuses_with_a_400_naming_api_key(staff_client, make_llm_config):
    config = make_llm_config(api_key=KEY)
    response = staff_client.patch(f"/api/llm-configs/{config.pk}/", {"base_url": "http://127.0.0.1:1/v1"},
                                  format="json")
    assert response.status_code == 400
    assert list(response.json()) == ["api_key"]
    moved = staff_client.patch(f"/api/llm-configs/{config.pk}/", {"base_url": "http://127.0.0.1:1/v1",
                                                                   "api_key": NEW_KEY}, format="json")
    assert moved.status_code == 200


def test_the_admin_form_shows_the_error_on_the_key_field(admin_client, make_llm_config):  # noqa: F811
    config = make_llm_config(api_key=KEY)
    url = reverse("admin:llmconfigs_llmconfig_change", args=[config.pk])
    response = admin_client.post(url, _form(config, base_url="http://127.0.0.1:1/v1"))
    assert response.status_code == 200  # the form again, with its errors
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["new_api_key"] and "Enter the API key again" in errors["new_api_key"][0]
    assert LLMConfig.objects.get(pk=config.pk).base_url == config.base_url

    response = admin_client.post(url, _form(config, base_url="http://127.0.0.1:1/v1", new_api_key=NEW_KEY))
    assert response.status_code == 302
    assert LLMConfig.objects.get(pk=config.pk).api_key_origin == "http://127.0.0.1:1"


def test_no_client_is_built_for_a_key_away_from_its_origin(make_llm_config, fake_upstream):
    """Whatever moved the row behind the services' back, the connection test sends nothing."""
    config = make_llm_config(api_key=KEY, base_url="http://127.0.0.1:1/v1")
    LLMConfig.objects.filter(pk=config.pk).update(base_url=fake_upstream.base_url)
    fake_upstream.script(Reply(text="pong"))
    result = llm_config_test_connection(config=config)
    assert not result.ok and result.category == "auth" and "Enter the API key again" in result.message
    assert fake_upstream.chat_requests == []
