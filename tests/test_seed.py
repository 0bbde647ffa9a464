"""`manage.py seed`: the LLM_* mapping, idempotency, --templates and the superuser from DJANGO_SUPERUSER_*."""
import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from llmconfigs.models import LLMConfig
from llmconfigs.providers import PROVIDERS
from tests.stored_secrets import assert_stored_encrypted

pytestmark = pytest.mark.django_db

KEY = "sk-seed-key-abcdef0123456789"


@pytest.fixture
def env(monkeypatch):
    for name in ("LLM_TYPE", "LLM_API_KEY", "LLM_MODEL", "LLM_BASE_URL", "DJANGO_SUPERUSER_USERNAME",
                 "DJANGO_SUPERUSER_PASSWORD", "DJANGO_SUPERUSER_EMAIL"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _seed(*args) -> str:
    out = io.StringIO()
    call_command("seed", *args, stdout=out)
    return out.getvalue()


def test_without_llm_type_nothing_is_seeded(env):
    out = _seed()
    assert "LLM_TYPE is not set: no LLM config was seeded" in out
    assert not LLMConfig.objects.exists()


def test_llm_variables_map_to_the_default_config(env):
    env.setenv("LLM_TYPE", "DeepSeek")
    env.setenv("LLM_API_KEY", KEY)
    env.setenv("LLM_MODEL", "deepseek-reasoner")
    env.setenv("LLM_BASE_URL", "https://proxy.example.com/v1")

    out = _seed()

    config = LLMConfig.objects.get()
    assert (config.name, config.provider, config.model_name, config.base_url) == (
        "default-deepseek", "deepseek", "deepseek-reasoner", "https://proxy.example.com/v1"
    )
    assert config.api_key == KEY and config.is_default and config.is_active
    assert_stored_encrypted(config, "api_key", KEY, secrets=(KEY,))
    assert "Created default LLM config 'default-deepseek'" in out
    assert KEY not in out


def test_seed_is_idempotent_and_updates_in_place(env):
    env.setenv("LLM_TYPE", "openai")
    env.setenv("LLM_API_KEY", KEY)
    _seed()
    first = LLMConfig.objects.get()
    assert first.model_name == PROVIDERS["openai"].default_model

    env.setenv("LLM_MODEL", "gpt-4.1")
    out = _seed()
    _seed()

    config = LLMConfig.objects.get()
    assert config.pk == first.pk and config.model_name == "gpt-4.1" and config.is_default
    assert "Updated default LLM config" in out


def test_unknown_llm_type_is_a_clear_error(env):
    env.setenv("LLM_TYPE", "skynet")
    with pytest.raises(CommandError, match="not a known provider"):
        _seed()


def test_templates_are_inactive_keyless_and_created_once(env):
    out = _seed("--templates")
    templates = LLMConfig.objects.filter(name__startswith="template-")
    expected = {key for key, spec in PROVIDERS.items() if spec.default_model}
    assert {t.provider for t in templates} == expected
    assert all(not t.is_active and t.api_key == "" and not t.is_default for t in templates)
    zhipu = templates.get(provider="zhipu")
    assert (zhipu.base_url, zhipu.model_name) == ("https://open.bigmodel.cn/api/paas/v4", "glm-4-flash")
    assert f"Provider templates: {len(expected)} created." in out
    assert "Provider templates: 0 created." in _seed("--templates")
    assert templates.count() == len(expected)


def test_superuser_from_django_superuser_variables(env):
    env.setenv("DJANGO_SUPERUSER_USERNAME", "boss")
    env.setenv("DJANGO_SUPERUSER_PASSWORD", "pw-boss-123")
    env.setenv("DJANGO_SUPERUSER_EMAIL", "boss@example.com")
    # The first run shows the password it was given (make run generated it into .env); later runs do not.
    assert "Created superuser 'boss' with password 'pw-boss-123'" in _seed()
    user = get_user_model().objects.get(username="boss")
    assert user.is_superuser and user.is_staff and user.check_password("pw-boss-123")
    assert user.email == "boss@example.com"
    again = _seed()
    assert "Superuser 'boss' exists" in again and "pw-boss-123" not in again
    assert get_user_model().objects.filter(username="boss").count() == 1


def test_no_superuser_without_the_variables(env):
    _seed()
    assert not get_user_model().objects.exists()


def test_seed_creates_the_demo_app_with_a_working_key_once(env):
    from agentcore.models import AgentApp
    from difyapi.auth import authenticate

    first = _seed()
    key = next(line.strip() for line in first.splitlines() if line.strip().startswith("app-"))
    assert AgentApp.objects.get().mode == "agent-chat"
    assert authenticate(f"Bearer {key}", client_ip="127.0.0.1").app == AgentApp.objects.get()

    second = _seed()
    assert key not in second
    assert AgentApp.objects.count() == 1


def test_tool_policies_exist_from_the_first_seed(env):
    from agentcore.models import ToolPolicy
    from agentcore.tools.policies import BUILTIN_DEFAULTS

    _seed()
    assert set(ToolPolicy.objects.values_list("name", flat=True)) == set(BUILTIN_DEFAULTS)
    assert ToolPolicy.objects.get(name="run_shell").enabled is False


def test_next_steps_say_where_to_chat_and_what_to_do_without_a_model(env):
    out = _seed("--url", "http://127.0.0.1:8001/")
    assert "Chat in the browser: http://127.0.0.1:8001/ " in out
    assert "curl -N -X POST http://127.0.0.1:8001/v1/chat-messages -H 'Authorization: Bearer app-" in out
    assert "No model is configured yet" in out and "make demo" in out
    env.setenv("LLM_TYPE", "deepseek")
    env.setenv("LLM_API_KEY", KEY)
    out = _seed("--url", "http://127.0.0.1:8001")
    assert "No model is configured yet" not in out and "Bearer app-" not in out  # the key is shown once
    assert KEY not in out


def test_demo_config_answers_without_a_key_and_never_takes_a_real_default(env, fake_upstream):
    out = _seed("--demo-upstream", fake_upstream.base_url)
    demo = LLMConfig.objects.get(name="demo-fake-upstream")
    assert demo.is_default and demo.is_active and demo.api_key == "" and demo.base_url == fake_upstream.base_url
    assert "(the default model)" in out
    _seed("--demo-upstream", fake_upstream.base_url)
    assert LLMConfig.objects.filter(name="demo-fake-upstream").count() == 1

    LLMConfig.objects.all().delete()
    env.setenv("LLM_TYPE", "deepseek")
    env.setenv("LLM_API_KEY", KEY)
    out = _seed("--demo-upstream", fake_upstream.base_url)
    assert LLMConfig.objects.get(is_default=True).name == "default-deepseek"
    assert "(pick it in the chat page)" in out
