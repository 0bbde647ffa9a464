"""Key rotation: every encrypted column re-encrypted from an old FIELD_ENCRYPTION_KEY to the current one, with raw
SQL (the ORM would decrypt with the current key), next to the encryption it reverses (llmconfigs.encryption)."""
from __future__ import annotations

import pickle

from django.conf import settings
from django.db import connection, transaction

from llmconfigs.encryption import cipher_for, encrypted_columns
from llmconfigs.errors import KeyRotationRefused
from llmconfigs.models import AuditLog
from llmconfigs.services import audit_record, llm_config_cache_drop


def encrypted_fields_rotate_key(*, old_key: str, actor=None, source: str = "command") -> dict[str, int]:
    """Re-encrypt every encrypted column from `old_key` to the current FIELD_ENCRYPTION_KEY, in one transaction.

    Reads the raw ciphertext (the ORM would decrypt with the current key). Refuses, changing nothing, when any
    value does not decrypt with `old_key`. Returns column label -> rows re-encrypted."""
    old_cipher = cipher_for(old_key)
    current_cipher = cipher_for(settings.FIELD_ENCRYPTION_KEY)
    quote = connection.ops.quote_name
    lock = " " + connection.ops.for_update_sql() if connection.features.has_select_for_update else ""
    counts: dict[str, int] = {}
    with transaction.atomic():
        for column in encrypted_columns():
            table, pk_col = column.model._meta.db_table, column.model._meta.pk.column
            with connection.cursor() as cursor:
                cursor.execute(
                    f"SELECT {quote(pk_col)}, {quote(column.field.column)} FROM {quote(table)} "
                    f"WHERE {quote(column.field.column)} IS NOT NULL{lock}"
                )
                rows = cursor.fetchall()
            updates, undecryptable, already_current = [], 0, 0
            for pk, raw in rows:
                try:
                    value = pickle.loads(old_cipher.decrypt(bytes(raw)))
                except Exception:
                    undecryptable += 1
                    already_current += _decrypts(current_cipher, bytes(raw))
                    continue
                updates.append((connection.Database.Binary(column.field._dump(value)), pk))
            if undecryptable:
                hint = (" They already decrypt with the current FIELD_ENCRYPTION_KEY: was the rotation done before?"
                        if already_current == undecryptable else "")
                raise KeyRotationRefused(
                    f"The old key does not decrypt {undecryptable} of {len(rows)} value(s) of {column.label}; "
                    f"nothing was changed.{hint}"
                )
            with connection.cursor() as cursor:
                cursor.executemany(
                    f"UPDATE {quote(table)} SET {quote(column.field.column)} = %s WHERE {quote(pk_col)} = %s", updates
                )
            counts[column.label] = len(updates)
        audit_record(actor=actor, action=AuditLog.Action.ROTATE_KEY, target="settings.FIELD_ENCRYPTION_KEY",
                     changes={"rows": counts}, source=source)
        llm_config_cache_drop()
    return counts


def _decrypts(cipher, raw: bytes) -> bool:
    try:
        cipher.decrypt(raw)
    except Exception:
        return False
    return True
