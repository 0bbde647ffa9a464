"""Field encryption keys: the cipher a given FIELD_ENCRYPTION_KEY yields, and every encrypted column in the project."""
from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from django.apps import apps
from django.conf import settings
from django.db import models
from django.utils.encoding import force_bytes
from django_cryptography.core.signing import FernetSigner
from django_cryptography.fields import EncryptedMixin, encrypt
from django_cryptography.utils.crypto import FernetBytes

# django_cryptography.conf.CryptographyConf.configure derives the AES key with these; it exposes no function for it.
_PBKDF2_ITERATIONS = 30000


@dataclass(frozen=True)
class EncryptedColumn:
    model: type[models.Model]
    field: EncryptedMixin

    @property
    def label(self) -> str:
        return f"{self.model._meta.label}.{self.field.name}"


def encrypted_columns() -> list[EncryptedColumn]:
    """Every encrypted field of every installed model, found by type so that no app needs to register here."""
    return [
        EncryptedColumn(model, field)
        for model in apps.get_models()
        if not model._meta.proxy and model._meta.managed
        for field in model._meta.concrete_fields
        if isinstance(field, EncryptedMixin)
    ]


def _derive(field_key: str, salt: bytes) -> bytes:
    digest = settings.CRYPTOGRAPHY_DIGEST
    kdf = PBKDF2HMAC(algorithm=digest, length=digest.digest_size, salt=salt, iterations=_PBKDF2_ITERATIONS)
    return kdf.derive(force_bytes(field_key))


def cipher_for(field_key: str) -> FernetBytes:
    """The cipher of encrypted fields under `field_key`: AES with the key django-cryptography derives from it (its
    digest, salt and iteration count), and an HMAC keyed by a second key derived from it too. django-cryptography
    would sign with SECRET_KEY, which would tie stored API keys to Django's secret; here FIELD_ENCRYPTION_KEY alone
    decides whether they can be read."""
    salt = force_bytes(settings.CRYPTOGRAPHY_SALT)
    return FernetBytes(_derive(field_key, salt), FernetSigner(_derive(field_key, salt + b".signing")))


def encrypted(base_field: models.Field) -> models.Field:
    """`django_cryptography.fields.encrypt(base_field)` using the cipher of the current FIELD_ENCRYPTION_KEY."""
    field = encrypt(base_field)
    field._fernet = cipher_for(settings.FIELD_ENCRYPTION_KEY)
    return field
