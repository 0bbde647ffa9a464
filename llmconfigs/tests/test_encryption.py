"""Encrypted fields: what `encrypted()` builds is bound to FIELD_ENCRYPTION_KEY, and every encrypted column is found.

The project's own fields are built when the models are imported; building one here checks the function itself (and
lets mutation testing, which switches functions at call time, reach it). Stored bytes are checked in
tests/stored_secrets.py's users (API, admin, seed, rotation)."""
import pickle

import pytest
from django.conf import settings
from django.db import connection, models
from django_cryptography.core.signing import BadSignature
from django_cryptography.utils.crypto import FernetBytes

from llmconfigs.encryption import cipher_for, encrypted, encrypted_columns
from tests.stored_secrets import field_key_cipher


def test_an_encrypted_field_writes_what_only_the_field_key_decrypts():
    field = encrypted(models.TextField(blank=True, default=""))

    prepared = field.get_db_prep_value("sk-field-test-0001", connection)
    raw = bytes(getattr(prepared, "obj", prepared))  # psycopg wraps bytes in a Binary

    assert b"sk-field-test-0001" not in raw
    assert pickle.loads(field_key_cipher(settings.FIELD_ENCRYPTION_KEY).decrypt(raw)) == "sk-field-test-0001"
    with pytest.raises(BadSignature):
        FernetBytes().decrypt(raw)  # django-cryptography's default, signed with SECRET_KEY
    assert field.from_db_value(raw, None, connection) == "sk-field-test-0001"
    assert isinstance(field, models.TextField)


def test_cipher_for_is_the_documented_derivation_and_depends_on_the_key():
    token = cipher_for("key-one").encrypt(b"payload")

    assert field_key_cipher("key-one").decrypt(token) == b"payload"
    with pytest.raises(BadSignature):
        cipher_for("key-two").decrypt(token)


def test_every_encrypted_column_of_the_project_is_found():
    assert sorted(column.label for column in encrypted_columns()) == [
        "agentcore.MCPServer.env", "agentcore.MCPServer.headers", "llmconfigs.LLMConfig.api_key",
        "llmconfigs.LLMConfigVersion.api_key",
    ]
