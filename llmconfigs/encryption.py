"""Field encryption keys: the cipher a given FIELD_ENCRYPTION_KEY yields, and every encrypted column in the project."""
from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from django.apps import apps
from django.conf import settings
from django.db import models
from django.utils.encoding import force_bytes
from django_cryptography.core.signing import FernetSigner
from django_cryptography.fields import EncryptedMixin
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


def cipher_for(field_key: str, *, secret_key: str | None = None) -> FernetBytes:
    """The cipher django-cryptography builds from `field_key`: AES with a key derived by PBKDF2 (its digest, salt and
    iteration count), signed with an HMAC that django-cryptography keys with Django's SECRET_KEY."""
    digest = settings.CRYPTOGRAPHY_DIGEST
    kdf = PBKDF2HMAC(
        algorithm=digest,
        length=digest.digest_size,
        salt=force_bytes(settings.CRYPTOGRAPHY_SALT),
        iterations=_PBKDF2_ITERATIONS,
    )
    return FernetBytes(kdf.derive(force_bytes(field_key)), FernetSigner(secret_key or settings.SECRET_KEY))
