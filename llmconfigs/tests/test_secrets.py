"""The key never reaches a log line or an error text, through a whole create / test / fail / update / delete cycle."""
import logging

import openai
import pytest

from llmconfigs.factory import provider_error
from llmconfigs.models import LLMConfig
from tests.fakes.upstream import Reply

pytestmark = pytest.mark.django_db

KEY = "sk-log-leak-probe-0a1b2c3d4e5f6789"
NEW_KEY = "sk-log-leak-probe-second-9f8e7d6c"
# Every logger that sees a provider call or a request, at its most talkative.
LOGGERS = ["", "openai", "httpx", "httpcore", "langchain", "langchain_openai", "llmconfigs", "opsagent", "django"]


def test_no_log_record_contains_the_key(staff_client, fake_upstream, caplog):
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    base = {"name": "leaky", "provider": "openai", "model_name": "gpt-x", "base_url": fake_upstream.base_url}

    created = staff_client.post("/api/llm-configs/", {**base, "api_key": KEY}, format="json")
    url = f"/api/llm-configs/{created.json()['id']}/"
    fake_upstream.script(Reply(text="pong"), Reply(status=401, error_message="Incorrect API key provided: {api_key}"),
                         Reply(status=500, error_message="internal error for {api_key}"))
    results = [staff_client.post(url + "test/").json() for _ in range(3)]
    staff_client.patch(url, {"api_key": NEW_KEY, "temperature": 7}, format="json")  # refused: bad temperature
    staff_client.patch(url, {"api_key": NEW_KEY}, format="json")
    staff_client.post(url + "test/")
    staff_client.delete(url)

    assert [r["ok"] for r in results] == [True, False, False]
    assert not LLMConfig.objects.exists()
    assert len(caplog.records) > 5  # the loggers really were listening
    assert any(r.name.startswith("openai") or r.name.startswith("httpx") for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage() + repr(record.__dict__)
        assert KEY not in text, record.name
        assert NEW_KEY not in text, record.name
    assert KEY not in caplog.text and NEW_KEY not in caplog.text


def test_provider_error_texts_are_scrubbed(make_llm_config, fake_upstream):
    from llmconfigs.factory import chat_model

    config = make_llm_config(api_key=KEY)
    fake_upstream.script(Reply(status=403, error_message="key {api_key} is not allowed"))
    with pytest.raises(openai.PermissionDeniedError) as excinfo:
        chat_model(config, streaming=False).invoke("hi")
    error = provider_error(excinfo.value, api_key=KEY)
    assert (error.category, error.status_code) == ("auth", 403)
    assert KEY in str(excinfo.value)  # the raw exception does echo it: that is why we scrub
    assert KEY not in str(error) and KEY not in error.message
    assert "not allowed" in error.message


def test_repr_and_str_of_a_config_do_not_contain_the_key(make_llm_config):
    config = make_llm_config(api_key=KEY)
    assert KEY not in repr(config) and KEY not in str(config)


def test_the_mask_shows_three_and_four_characters_only_of_keys_long_enough():
    from llmconfigs.secrets import mask_secret

    assert mask_secret("") == ""
    assert mask_secret("sk-abcdefgh") == "…****"  # 11 characters: showing 7 would give most of it away
    assert mask_secret("sk-abcdefghi") == "sk-…fghi"
    assert mask_secret(KEY) == "sk-…6789"


def test_scrub_masks_every_given_secret_of_four_characters_or_more_and_bearer_tokens():
    from llmconfigs.secrets import scrub

    assert scrub("pin 1234 and 1234 again", "1234") == "pin …**** and …**** again"
    assert scrub("abc stays", "abc") == "abc stays"  # too short to scrub without mangling ordinary text
    assert scrub(f"bad key {KEY}", "", KEY) == "bad key sk-…6789"
    assert scrub("Authorization: BEARER abcdefgh12 rest") == "Authorization: BEARER [redacted] rest"
    assert scrub("bearer short7 rest") == "bearer short7 rest"  # under 8 characters: not a key
