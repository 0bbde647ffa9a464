"""`manage.py rotate_field_key`: every encrypted column re-encrypted from the old key, or nothing changed."""
import pickle

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from agentcore.models import MCPServer
from llmconfigs.encryption import cipher_for
from llmconfigs.models import AuditLog, LLMConfig

pytestmark = pytest.mark.django_db

OLD_KEY = "the-old-field-encryption-key"
NEW_KEY = "the-new-field-encryption-key"


@pytest.fixture
def encrypted_with_old_key(settings, make_llm_config):
    """Rows written while FIELD_ENCRYPTION_KEY was OLD_KEY; then the setting changes to NEW_KEY."""
    _use_key(settings, OLD_KEY)
    config = make_llm_config(api_key="sk-rotate-me-1234567890")
    server = MCPServer.objects.create(
        name="ops", transport="streamable_http", url="http://127.0.0.1:1/mcp",
        env={"TOKEN": "env-secret"}, headers={"Authorization": "Bearer header-secret"},
    )
    _use_key(settings, NEW_KEY)
    return config, server


def _use_key(settings, key: str) -> None:
    """Point the encrypted fields at `key` as a restart with FIELD_ENCRYPTION_KEY=key would."""
    settings.FIELD_ENCRYPTION_KEY = key
    cipher = cipher_for(key)
    for model, names in ((LLMConfig, ["api_key"]), (MCPServer, ["env", "headers"])):
        for name in names:
            model._meta.get_field(name)._fernet = cipher


@pytest.fixture(autouse=True)
def _restore_test_key(settings):
    original = settings.FIELD_ENCRYPTION_KEY
    yield
    _use_key(settings, original)


def test_rotation_re_encrypts_every_encrypted_field(encrypted_with_old_key, capsys):
    config, server = encrypted_with_old_key
    assert _readable_key(config) != "sk-rotate-me-1234567890"  # unreadable with the new key until rotated

    call_command("rotate_field_key", "--old-key", OLD_KEY)

    assert LLMConfig.objects.get(pk=config.pk).api_key == "sk-rotate-me-1234567890"
    fresh = MCPServer.objects.get(pk=server.pk)
    assert fresh.env == {"TOKEN": "env-secret"}
    assert fresh.headers == {"Authorization": "Bearer header-secret"}
    out = capsys.readouterr().out
    assert "llmconfigs.LLMConfig.api_key: 1 value(s)" in out
    assert "agentcore.MCPServer.headers: 1 value(s)" in out
    row = AuditLog.objects.get(action="rotate_key")
    assert row.source == "command"
    assert "OLD" not in str(row.changes) and OLD_KEY not in str(row.changes)


def test_a_wrong_old_key_is_refused_and_nothing_changes(encrypted_with_old_key):
    config, _ = encrypted_with_old_key
    table = LLMConfig._meta.db_table
    before = _raw_keys(table)

    with pytest.raises(CommandError, match="does not decrypt"):
        call_command("rotate_field_key", "--old-key", "not-the-old-key")

    assert _raw_keys(table) == before
    assert not AuditLog.objects.filter(action="rotate_key").exists()


def test_rerunning_after_a_rotation_says_it_was_already_done(encrypted_with_old_key):
    call_command("rotate_field_key", "--old-key", OLD_KEY)
    with pytest.raises(CommandError, match="already decrypt with the current"):
        call_command("rotate_field_key", "--old-key", OLD_KEY)


def _raw_keys(table: str) -> list[bytes]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT api_key FROM {connection.ops.quote_name(table)} ORDER BY name")
        return [bytes(row[0]) for row in cursor.fetchall()]


def _readable_key(config) -> str | None:
    try:
        return LLMConfig.objects.get(pk=config.pk).api_key
    except Exception:  # wrong AES key: bad padding or garbage that does not unpickle
        return None


def test_stored_keys_decrypt_with_the_field_key_alone_whatever_the_secret_key(settings, make_llm_config):
    config = make_llm_config(api_key="sk-independent-of-secret-key-42")
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM llmconfigs_llmconfig WHERE id = %s", [config.pk.hex if
                       connection.vendor == "sqlite" else config.pk])
        raw = bytes(cursor.fetchone()[0])
    settings.SECRET_KEY = "a-completely-different-django-secret"

    assert pickle.loads(cipher_for(settings.FIELD_ENCRYPTION_KEY).decrypt(raw)) == "sk-independent-of-secret-key-42"
