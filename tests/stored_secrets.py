"""What an encrypted column really holds, read with SQL past the ORM: proof that a secret is stored encrypted under
FIELD_ENCRYPTION_KEY, not in clear and not under django-cryptography's default (an HMAC keyed by SECRET_KEY)."""
from __future__ import annotations

import pickle

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from django.conf import settings
from django.db import connection, models
from django.utils.encoding import force_bytes
from django_cryptography.core.signing import BadSignature, FernetSigner
from django_cryptography.utils.crypto import FernetBytes


def stored_bytes(instance: models.Model, field_name: str) -> bytes:
    """The raw column of `instance.<field_name>`, as the database has it."""
    model = type(instance)
    column = model._meta.get_field(field_name).column
    pk = model._meta.pk
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {quote(column)} FROM {quote(model._meta.db_table)} WHERE {quote(pk.column)} = %s",
            [pk.get_db_prep_value(instance.pk, connection)],
        )
        (raw,) = cursor.fetchone()
    return bytes(raw)


def field_key_cipher(field_key: str) -> FernetBytes:
    """The cipher the project promises (docs/architecture.md), written out here rather than imported so that a change
    to the production derivation fails the tests: django-cryptography's AES key derivation (PBKDF2-SHA256, 30,000
    iterations, CRYPTOGRAPHY_SALT) of FIELD_ENCRYPTION_KEY, and an HMAC key derived the same way with the salt
    followed by ".signing"."""
    def derive(salt: bytes) -> bytes:
        return PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=30000).derive(field_key.encode())

    salt = force_bytes(settings.CRYPTOGRAPHY_SALT)
    return FernetBytes(derive(salt), FernetSigner(derive(salt + b".signing")))


def assert_stored_encrypted(instance: models.Model, field_name: str, value, *, secrets: tuple[str, ...]) -> None:
    """The column holds `value` encrypted with the current FIELD_ENCRYPTION_KEY: none of `secrets` appears in the
    raw bytes, the field key's cipher decrypts them, and django-cryptography's SECRET_KEY-signed default does not."""
    raw = stored_bytes(instance, field_name)
    for secret in secrets:
        assert secret.encode() not in raw, f"{field_name} is stored in clear"
    assert pickle.loads(field_key_cipher(settings.FIELD_ENCRYPTION_KEY).decrypt(raw)) == value
    with pytest.raises(BadSignature):
        FernetBytes().decrypt(raw)
