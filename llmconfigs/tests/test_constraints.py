"""The database itself refuses bad configs, even when Python validation is bypassed; keys are ciphertext on disk."""
import pytest
from django.db import connection

from llmconfigs.models import LLMConfig
from tests.fixtures import refused_by_database

pytestmark = pytest.mark.django_db


def test_a_second_default_of_the_same_kind_is_refused_by_the_database(make_llm_config):
    make_llm_config(default=True)
    other = make_llm_config()
    assert refused_by_database(lambda: LLMConfig.objects.filter(pk=other.pk).update(is_default=True))
    # A default of the other kind is fine.
    embedding = make_llm_config(is_embedding=True)
    assert not refused_by_database(lambda: LLMConfig.objects.filter(pk=embedding.pk).update(is_default=True))


def test_an_inactive_default_isrefused_by_database(make_llm_config):
    config = make_llm_config(default=True)
    assert refused_by_database(lambda: LLMConfig.objects.filter(pk=config.pk).update(is_active=False))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("provider", "skynet"),
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 1.5),
        ("frequency_penalty", 3.0),
        ("presence_penalty", -2.5),
        ("max_tokens", 0),
        ("base_url", "ftp://example.com"),
        ("name", ""),
        ("model_name", ""),
        ("input_price_per_million", -1),
    ],
)
def test_out_of_range_values_are_refused_by_the_database(make_llm_config, field, value):
    config = make_llm_config()
    assert refused_by_database(lambda: LLMConfig.objects.filter(pk=config.pk).update(**{field: value}))
    fields = {"name": f"raw-{field}", "provider": "openai", "model_name": "m", field: value}
    assert refused_by_database(lambda: LLMConfig.objects.create(**fields))


def test_duplicate_names_are_refused_by_the_database(make_llm_config):
    make_llm_config(name="same")
    assert refused_by_database(lambda: LLMConfig.objects.create(name="same", provider="openai", model_name="m"))


def test_the_key_is_absent_from_the_raw_database_bytes(make_llm_config):
    key = "sk-raw-bytes-check-5f2b9c1e7d"
    config = make_llm_config(api_key=key)
    table = LLMConfig._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)} WHERE id = %s",
                       [config.pk.hex if connection.vendor == "sqlite" else config.pk])
        row = cursor.fetchone()
    raw = b"".join(bytes(v) if isinstance(v, bytes | memoryview) else str(v).encode() for v in row)
    assert row is not None
    assert key.encode() not in raw
    assert key[4:20].encode() not in raw
    assert config.api_key_mask.encode() in raw  # only the mask is stored in clear
