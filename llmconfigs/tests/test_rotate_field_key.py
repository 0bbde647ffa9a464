"""`manage.py rotate_field_key`: every encrypted column re-encrypted from the old key, or nothing changed."""
import pickle

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from agentcore.models import MCPServer
from llmconfigs.models import AuditLog, LLMConfig, LLMConfigVersion
from tests.stored_secrets import assert_stored_encrypted, field_key_cipher, stored_bytes

pytestmark = pytest.mark.django_db

OLD_KEY = "the-old-field-encryption-key"
API_KEY = "sk-rotate-me-1234567890"
ENV = {"TOKEN": "env-secret"}
HEADERS = {"Authorization": "Bearer header-secret"}


@pytest.fixture
def encrypted_with_old_key(make_llm_config):
    """Rows as a server running with FIELD_ENCRYPTION_KEY=OLD_KEY left them, read by this one (the current key):
    written through the ORM, then their columns overwritten with the values encrypted under OLD_KEY. Only rows
    change, never the fields' wiring, so the encryption the project really configures is what the tests see."""
    config = make_llm_config(api_key=API_KEY)
    server = MCPServer.objects.create(
        name="ops", transport="streamable_http", url="http://127.0.0.1:1/mcp", env=ENV, headers=HEADERS,
    )
    old = field_key_cipher(OLD_KEY)
    _overwrite_key(config, old.encrypt(pickle.dumps(API_KEY)))
    _overwrite(server, "env", old.encrypt(pickle.dumps(ENV)))
    _overwrite(server, "headers", old.encrypt(pickle.dumps(HEADERS)))
    return config, server


def test_rotation_re_encrypts_every_encrypted_field(encrypted_with_old_key, capsys):
    config, server = encrypted_with_old_key
    assert _readable_key(config) is None  # unreadable with the current key until rotated

    call_command("rotate_field_key", "--old-key", OLD_KEY)

    assert LLMConfig.objects.get(pk=config.pk).api_key == API_KEY
    fresh = MCPServer.objects.get(pk=server.pk)
    assert (fresh.env, fresh.headers) == (ENV, HEADERS)
    assert_stored_encrypted(config, "api_key", API_KEY, secrets=(API_KEY,))
    version = LLMConfigVersion.objects.get(config=config)
    assert version.api_key == API_KEY
    assert_stored_encrypted(version, "api_key", API_KEY, secrets=(API_KEY,))
    assert_stored_encrypted(server, "env", ENV, secrets=("env-secret",))
    assert_stored_encrypted(server, "headers", HEADERS, secrets=("header-secret",))
    out = capsys.readouterr().out
    assert "llmconfigs.LLMConfig.api_key: 1 value(s) re-encrypted." in out
    assert "llmconfigs.LLMConfigVersion.api_key: 1 value(s) re-encrypted." in out
    assert "agentcore.MCPServer.env: 1 value(s) re-encrypted." in out
    assert "agentcore.MCPServer.headers: 1 value(s) re-encrypted." in out
    assert out.endswith("\nEvery encrypted field now uses the current FIELD_ENCRYPTION_KEY.\n")
    row = AuditLog.objects.get(action="rotate_key")
    assert row.source == "command" and row.target_repr == "settings.FIELD_ENCRYPTION_KEY"
    assert row.changes == {"rows": {"llmconfigs.LLMConfig.api_key": 1, "llmconfigs.LLMConfigVersion.api_key": 1,
                                    "agentcore.MCPServer.env": 1,
                                    "agentcore.MCPServer.headers": 1}}


def test_a_wrong_old_key_is_refused_and_nothing_changes(encrypted_with_old_key):
    config, server = encrypted_with_old_key
    before = [stored_bytes(config, "api_key"), stored_bytes(server, "env"), stored_bytes(server, "headers")]

    with pytest.raises(CommandError, match=r"The old key does not decrypt 1 of 1 value\(s\) of [\w.]+; nothing was"):
        call_command("rotate_field_key", "--old-key", "not-the-old-key")

    assert [stored_bytes(config, "api_key"), stored_bytes(server, "env"), stored_bytes(server, "headers")] == before
    assert not AuditLog.objects.filter(action="rotate_key").exists()


def test_values_the_old_key_does_not_decrypt_refuse_the_whole_rotation(encrypted_with_old_key, make_llm_config):
    config, server = encrypted_with_old_key
    strays = [make_llm_config(api_key=f"sk-under-a-third-key-00{n}") for n in (1, 2)]
    third = field_key_cipher("a-third-key")
    for n, stray in enumerate(strays, 1):
        _overwrite_key(stray, third.encrypt(pickle.dumps(f"sk-under-a-third-key-00{n}")))
    rows = [config, *strays]
    before = [stored_bytes(row, "api_key") for row in rows] + [stored_bytes(server, "env")]

    refusal = r"does not decrypt 2 of 3 value\(s\) of llmconfigs.LLMConfig.api_key; nothing was changed\.$"
    with pytest.raises(CommandError, match=refusal):  # the current key does not read them either: no "done before"
        call_command("rotate_field_key", "--old-key", OLD_KEY)

    assert [stored_bytes(row, "api_key") for row in rows] + [stored_bytes(server, "env")] == before
    assert not AuditLog.objects.filter(action="rotate_key").exists()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite has no row locks")
def test_rotation_locks_the_rows_it_re_encrypts(encrypted_with_old_key):
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        call_command("rotate_field_key", "--old-key", OLD_KEY)

    reads = [q["sql"] for q in queries.captured_queries if "IS NOT NULL" in q["sql"]]  # the ciphertext reads
    assert len(reads) == 4 and all(sql.endswith(" FOR UPDATE") for sql in reads), reads


def test_rerunning_after_a_rotation_says_it_was_already_done(encrypted_with_old_key, make_llm_config):
    second = make_llm_config(api_key="sk-a-second-key-to-rotate")
    _overwrite_key(second, field_key_cipher(OLD_KEY).encrypt(pickle.dumps("sk-a-second-key-to-rotate")))
    call_command("rotate_field_key", "--old-key", OLD_KEY)
    with pytest.raises(CommandError) as refused:
        call_command("rotate_field_key", "--old-key", OLD_KEY)
    assert str(refused.value) == (
        "The old key does not decrypt 2 of 2 value(s) of llmconfigs.LLMConfig.api_key; nothing was changed. They "
        "already decrypt with the current FIELD_ENCRYPTION_KEY: was the rotation done before?"
    )


def test_an_empty_or_missing_old_key_is_refused():
    with pytest.raises(CommandError, match=r"^--old-key must not be empty\.$"):
        call_command("rotate_field_key", "--old-key", "")
    with pytest.raises(CommandError, match=r"^Error: the following arguments are required: --old-key$"):
        call_command("rotate_field_key")


def _overwrite_key(config, raw: bytes) -> None:
    """The config's key column and those of its versions (the same key, encrypted the same way)."""
    _overwrite(config, "api_key", raw)
    for version in LLMConfigVersion.objects.filter(config=config).only("pk"):
        _overwrite(version, "api_key", raw)


def _overwrite(instance, field_name: str, raw: bytes) -> None:
    model, quote = type(instance), connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {quote(model._meta.db_table)} SET {quote(model._meta.get_field(field_name).column)} = %s "
            f"WHERE {quote(model._meta.pk.column)} = %s",
            [connection.Database.Binary(raw), model._meta.pk.get_db_prep_value(instance.pk, connection)],
        )


def _readable_key(config) -> str | None:
    try:
        return LLMConfig.objects.get(pk=config.pk).api_key
    except Exception:  # wrong key: the signature check fails
        return None


def test_stored_keys_decrypt_with_the_field_key_alone_whatever_the_secret_key(settings, make_llm_config):
    config = make_llm_config(api_key="sk-independent-of-secret-key-42")
    settings.SECRET_KEY = "a-completely-different-django-secret"

    assert_stored_encrypted(config, "api_key", "sk-independent-of-secret-key-42",
                            secrets=("sk-independent-of-secret-key-42",))
    assert LLMConfig.objects.get(pk=config.pk).api_key == "sk-independent-of-secret-key-42"


def test_a_rotation_by_a_user_is_audited_under_their_name(encrypted_with_old_key, staff_user):
    from llmconfigs.rotation import encrypted_fields_rotate_key

    encrypted_fields_rotate_key(old_key=OLD_KEY, actor=staff_user, source="admin")

    row = AuditLog.objects.get(action="rotate_key")
    assert (row.actor, row.actor_repr, row.source) == (staff_user, "staff", "admin")


def test_a_rollback_after_the_rotation_restores_the_key_of_the_old_version(encrypted_with_old_key):
    from llmconfigs.services import llm_config_rollback, llm_config_update

    config, _server = encrypted_with_old_key
    call_command("rotate_field_key", "--old-key", OLD_KEY)
    llm_config_update(config=config, api_key="sk-after-the-rotation-5555")

    llm_config_rollback(config=config, version=1)

    assert LLMConfig.objects.get(pk=config.pk).api_key == API_KEY
    assert_stored_encrypted(config, "api_key", API_KEY, secrets=(API_KEY,))
