"""Writes to LLM configurations: create/update/default/usage, each in one transaction with its audit record."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from llmconfigs import factory
from llmconfigs.errors import (
    ConfigConflict,
    ConfigInactive,
    ConfigNotFound,
    ConfigProtected,
)
from llmconfigs.models import AuditLog, CallKind, LLMConfig, LLMConfigVersion
from llmconfigs.secrets import mask_secret, scrub
from llmconfigs.selectors import llm_config_cache_invalidate
from llmconfigs.usage import CallOrigin, CallRecord, provider_calls_record
from opsagent.common.db.statements import row_update

logger = logging.getLogger(__name__)


def audit_record(
    *,
    actor=None,
    action: str,
    target: Any,
    changes: dict[str, Any] | None = None,
    source: str = "",
    ip_address: str | None = None,
    user_agent: str = "",
) -> AuditLog:
    """Append one audit row. `changes` must already be free of secrets (use masks). `target` is a model instance, or
    a string naming what was acted on when it is not a row (e.g. "settings.FIELD_ENCRYPTION_KEY")."""
    user = actor if getattr(actor, "is_authenticated", False) else None
    if isinstance(target, str):
        return AuditLog.objects.create(
            actor=user, actor_repr=user.get_username() if user else "", action=action, target_type=target,
            target_repr=target, source=source, ip_address=ip_address, user_agent=user_agent, changes=changes or {},
        )
    return AuditLog.objects.create(
        actor=user,
        actor_repr=user.get_username() if user else "",
        action=action,
        target_type=target._meta.label if hasattr(target, "_meta") else str(type(target).__name__),
        target_id=str(getattr(target, "pk", "") or ""),
        target_repr=str(target)[:300],
        source=source,
        ip_address=ip_address,
        user_agent=user_agent,
        changes=changes or {},
    )


def audit_changes(before: Mapping[str, Any], after: Mapping[str, Any], *, secret: Collection[str] = (),
                  plain: Callable[[Any], Any] = lambda value: value) -> dict[str, Any]:
    """The `changes` of an audit row: for each name of `after` whose value differs from `before`, {"old", "new"} as
    `plain` records them (e.g. Decimals as strings; compared before, so 0.10 and 0.1 are no change); a `secret` field
    is recorded only as {"changed": True}."""
    changes: dict[str, Any] = {}
    for name, value in after.items():
        old = before.get(name)
        if old != value:
            changes[name] = {"changed": True} if name in secret else {"old": plain(old), "new": plain(value)}
    return changes


def llm_config_cache_drop() -> None:
    # Now, so reads later in this transaction see the change; and again after commit, so a concurrent reader that
    # cached the old row in between is corrected.
    llm_config_cache_invalidate()
    transaction.on_commit(llm_config_cache_invalidate)


def _set_api_key(config: LLMConfig, api_key: str | None) -> bool:
    """Store a new key unless `api_key` is None or blank (blank on edit keeps the stored key), bound to the endpoint
    the config calls now (set its provider and base URL first)."""
    if api_key is None or not api_key.strip():
        return False
    config.api_key = api_key.strip()
    config.api_key_mask = mask_secret(config.api_key)
    config.api_key_origin = config.endpoint_origin()
    return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    return value


@contextmanager
def _conflicts_refused():
    """Turn the database refusing a write (unique name, one default per kind) into a ConfigConflict, never a 500."""
    try:
        yield
    except IntegrityError:
        raise ConfigConflict(
            "The database refused the change: the name is already taken or another default was set at the same "
            "time. Nothing was saved; reload and try again."
        ) from None


def llm_config_create(*, actor=None, api_key: str = "", source: str = "", ip_address: str | None = None,
                      user_agent: str = "", **fields: Any) -> LLMConfig:
    config = LLMConfig(**fields)
    _set_api_key(config, api_key)
    config.created_by = config.updated_by = actor if getattr(actor, "is_authenticated", False) else None
    config.full_clean()
    with _conflicts_refused(), transaction.atomic():
        if config.is_default:
            # Creating a new default takes the flag from the old one in the same transaction.
            LLMConfig.objects.select_for_update().filter(is_default=True, is_embedding=config.is_embedding).update(
                is_default=False
            )
        config.save()
        changes = {name: {"new": _jsonable(getattr(config, name))} for name in _AUDITED_FIELDS}
        if config.api_key:
            changes["api_key"] = {"new": config.api_key_mask}
        audit_record(actor=actor, action=AuditLog.Action.CREATE, target=config, changes=changes, source=source,
                     ip_address=ip_address, user_agent=user_agent)
        llm_config_version_record(config=config, action=AuditLog.Action.CREATE, actor=actor, source=source)
        llm_config_cache_drop()
    return config


_AUDITED_FIELDS = [
    "name", "provider", "model_name", "base_url", "api_key_origin", "max_tokens", "temperature", "top_p",
    "frequency_penalty", "presence_penalty", "description", "is_active", "is_default", "is_embedding", "extra_config",
    "input_price_per_million", "output_price_per_million", "currency", "route", "priority", "weight",
]
# What a version keeps and a rollback restores: everything an admin edits except the default flag (the default moves
# only through set-default, which locks the whole kind) and the key (kept encrypted beside the fields).
VERSIONED_FIELDS = [name for name in _AUDITED_FIELDS if name != "is_default"]


def llm_config_version_record(*, config: LLMConfig, action: str, actor=None, source: str = "",
                              rolled_back_from: int | None = None) -> LLMConfigVersion:
    """Append the config's current state as its next version. Call inside the transaction that changed the config,
    with its row locked (select_for_update), so that two changes cannot take the same number."""
    last = LLMConfigVersion.objects.filter(config=config).order_by("-number").only("number", "api_key").first()
    user = actor if getattr(actor, "is_authenticated", False) else None
    return LLMConfigVersion.objects.create(
        config=config,
        number=(last.number + 1) if last else 1,
        fields={name: _jsonable(getattr(config, name)) for name in VERSIONED_FIELDS},
        api_key=config.api_key,
        api_key_mask=config.api_key_mask,
        key_changed=last is not None and last.api_key != config.api_key,
        action=action,
        rolled_back_from=rolled_back_from,
        actor=user,
        actor_repr=user.get_username() if user else "",
        source=source,
    )


def _version_baseline(config: LLMConfig) -> None:
    """A config from before versions existed gets its current state as version 1 before its first change."""
    if not LLMConfigVersion.objects.filter(config=config).exists():
        llm_config_version_record(config=config, action="initial", source="system")


def llm_config_update(*, config: LLMConfig, actor=None, api_key: str | None = None, source: str = "",
                      ip_address: str | None = None, user_agent: str = "", **fields: Any) -> LLMConfig:
    """Update fields; `api_key` None or blank keeps the stored key. `is_default=True` takes the default through
    llm_config_set_default in the same transaction (rows locked)."""
    wants_default = fields.pop("is_default", None)
    with _conflicts_refused(), transaction.atomic():
        if wants_default:
            # Take the locks in set-default's order (all configs of the kind, by pk) before locking this row alone.
            _lock_kind(is_embedding=fields.get("is_embedding", config.is_embedding))
        locked = LLMConfig.objects.select_for_update().get(pk=config.pk)
        _version_baseline(locked)
        before = {name: getattr(locked, name) for name in _AUDITED_FIELDS}
        before_mask = locked.api_key_mask
        for name, value in fields.items():
            setattr(locked, name, value)
        key_changed = _set_api_key(locked, api_key)
        if wants_default is False:
            locked.is_default = False
        if locked.is_default and not locked.is_active:
            raise ConfigInactive("The default config cannot be deactivated; make another config the default first.",
                                 field="is_active")
        locked.updated_by = actor if getattr(actor, "is_authenticated", False) else locked.updated_by
        locked.full_clean()
        locked.save()
        changes = audit_changes(before, {name: getattr(locked, name) for name in _AUDITED_FIELDS}, plain=_jsonable)
        if key_changed:
            changes["api_key"] = {"old": before_mask, "new": locked.api_key_mask}
            llm_config_health_clear(config=locked, actor=actor, source=source, ip_address=ip_address,
                                    user_agent=user_agent)
        if changes:
            audit_record(actor=actor, action=AuditLog.Action.UPDATE, target=locked, changes=changes, source=source,
                         ip_address=ip_address, user_agent=user_agent)
            llm_config_version_record(config=locked, action=AuditLog.Action.UPDATE, actor=actor, source=source)
        llm_config_cache_drop()
        if wants_default and not locked.is_default:
            locked = llm_config_set_default(config=locked, actor=actor, source=source, ip_address=ip_address,
                                            user_agent=user_agent)
    return locked


def llm_config_rollback(*, config: LLMConfig, version: int, actor=None, source: str = "",
                        ip_address: str | None = None, user_agent: str = "") -> LLMConfig:
    """Put the config back as it was in `version`: its fields and its key (the old ciphertext's key, bound to the
    endpoint it was bound to then). Validated like an update; audited as `rollback`; itself a new version."""
    with _conflicts_refused(), transaction.atomic():
        locked = LLMConfig.objects.select_for_update().filter(pk=config.pk).first()
        if locked is None:
            raise ConfigNotFound(f"LLM config {config.pk} does not exist.", status=404)
        target = LLMConfigVersion.objects.filter(config=locked, number=version).first()
        if target is None:
            raise ConfigNotFound(f"LLM config {locked.name!r} has no version {version}.", field="version")
        _version_baseline(locked)
        before = {name: getattr(locked, name) for name in _AUDITED_FIELDS}
        before_key, before_mask = locked.api_key, locked.api_key_mask
        for name in VERSIONED_FIELDS:
            if name in target.fields:
                setattr(locked, name, target.fields[name])
        locked.api_key, locked.api_key_mask = target.api_key, target.api_key_mask
        if locked.is_default and not locked.is_active:
            raise ConfigInactive(f"Version {version} is inactive and {locked.name!r} is the default config; make "
                                 "another config the default first.", field="version")
        locked.updated_by = actor if getattr(actor, "is_authenticated", False) else locked.updated_by
        # clean_fields() turns the JSON values back into the fields' types (decimals from strings).
        locked.full_clean()
        locked.save()
        changes = audit_changes(before, {name: getattr(locked, name) for name in _AUDITED_FIELDS}, plain=_jsonable)
        key_changed = locked.api_key != before_key
        if key_changed:
            changes["api_key"] = {"old": before_mask, "new": locked.api_key_mask}
        changes["version"] = version
        audit_record(actor=actor, action=AuditLog.Action.ROLLBACK, target=locked, changes=changes, source=source,
                     ip_address=ip_address, user_agent=user_agent)
        llm_config_version_record(config=locked, action=AuditLog.Action.ROLLBACK, actor=actor, source=source,
                                  rolled_back_from=version)
        if key_changed:
            llm_config_health_clear(config=locked, actor=actor, source=source, ip_address=ip_address,
                                    user_agent=user_agent)
        llm_config_cache_drop()
    return locked


def llm_config_set_default(*, config: LLMConfig, actor=None, source: str = "", ip_address: str | None = None,
                           user_agent: str = "") -> LLMConfig:
    """Make `config` the one default of its kind (chat or embedding): one transaction, rows locked.

    Every config of the kind is locked, in primary-key order. Locking only the current default would let concurrent
    callers through when there is none yet; locking the target and then the default in two steps can deadlock."""
    for attempt in range(3):
        try:
            with transaction.atomic():
                kind = LLMConfig.objects.filter(pk=config.pk).values_list("is_embedding", flat=True).first()
                if kind is None:
                    raise ConfigNotFound(f"LLM config {config.pk} does not exist.", status=404)
                rows = _lock_kind(is_embedding=kind)
                target = rows.get(config.pk)
                if target is None:  # its kind changed since we read it; start over
                    continue
                if not target.is_active:
                    raise ConfigInactive(f"{target.name!r} is inactive; activate it before making it the default.")
                previous = [row.name for row in rows.values() if row.is_default and row.pk != target.pk]
                if target.is_default and not previous:
                    return LLMConfig.objects.get(pk=target.pk)
                LLMConfig.objects.filter(is_default=True, is_embedding=kind).exclude(pk=target.pk).update(
                    is_default=False
                )
                LLMConfig.objects.filter(pk=target.pk).update(is_default=True, updated_at=timezone.now())
                audit_record(
                    actor=actor,
                    action=AuditLog.Action.SET_DEFAULT,
                    target=target,
                    changes={"is_default": {"old": False, "new": True}, "previous_default": previous},
                    source=source,
                    ip_address=ip_address, user_agent=user_agent,
                )
                llm_config_cache_drop()
                return LLMConfig.objects.get(pk=target.pk)
        except IntegrityError:
            # Only possible on backends without row locks (SQLite): the partial unique index refused a second default
            # committed between our read and our write. Try again from a fresh read.
            if attempt == 2:
                raise
    raise ConfigConflict("The config changed while it was being made the default; try again.")


def _lock_kind(*, is_embedding: bool) -> dict[Any, LLMConfig]:
    """Lock every config of one kind, always in primary-key order so that concurrent lockers cannot deadlock."""
    return {
        row.pk: row
        for row in LLMConfig.objects.select_for_update()
        .filter(is_embedding=is_embedding)
        .order_by("pk")
        .only("id", "name", "is_active", "is_default", "is_embedding")
    }


def llm_config_record_usage(
    *,
    config_id: uuid.UUID | str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cost: Decimal = Decimal(0),
    failed: bool = False,
    last_error: str = "",
    calls: int = 1,
) -> None:
    """Count `calls` calls (failed ones too) and their tokens atomically in the database (no read-modify-write), in
    one UPDATE written once per shape (this runs at every turn's end)."""
    prompt_tokens, completion_tokens = max(prompt_tokens, 0), max(completion_tokens, 0)
    values: dict[str, Any] = {"last_used_at": timezone.now()}
    increments: dict[str, Any] = {
        "usage_count": calls, "prompt_tokens_total": prompt_tokens, "completion_tokens_total": completion_tokens,
        "total_tokens_total": prompt_tokens + completion_tokens, "cost_total": cost,
    }
    if failed:
        values["last_error"] = last_error[:300]
        increments["error_count"] = 1
    row_update(LLMConfig, config_id, values=values, increments=increments)


def _health_audit(*, config: LLMConfig, old: str, new: str, error: str = "", actor=None, source: str = "",
                  until: float | None = None) -> None:
    changes: dict[str, Any] = {"health": {"old": old, "new": new}}
    if error:
        changes["last_error"] = error
    if until is not None:
        changes["until"] = datetime.fromtimestamp(until, UTC).isoformat()
    audit_record(actor=actor, action=AuditLog.Action.HEALTH, target=config, changes=changes, source=source)


def llm_config_cool_down(*, config: LLMConfig, error, until: float) -> None:
    """Record that `config` left its pool's rotation until `until` (the cooldown itself is in the cache)."""
    _health_audit(config=config, old="ok", new="cooling_down", error=f"{error.category}: {error.message}"[:300],
                  until=until, source="router")
    logger.warning("LLM config %s cools down: %s", config.pk, error.category)


def llm_config_mark_auth_failed(*, config: LLMConfig, error) -> None:
    """The provider refused the key of `config`: leave it out of its pool until a successful connection test or a
    new key. Only the first refusal changes the row and writes the audit record."""
    message = f"{error.category}: {error.message}"[:300]
    with transaction.atomic():
        changed = LLMConfig.objects.filter(pk=config.pk, auth_failed_at__isnull=True).update(
            auth_failed_at=timezone.now(), last_error=message
        )
        if changed:
            _health_audit(config=config, old="ok", new="auth_failed", error=message, source="router")
            llm_config_cache_drop()
    if changed:
        logger.warning("LLM config %s marked auth_failed", config.pk)


def llm_config_health_clear(*, config: LLMConfig, actor=None, source: str = "", ip_address: str | None = None,
                            user_agent: str = "") -> None:
    """A key that works again (a successful test, a new key): back in rotation, cooldown and refusal forgotten.
    The change of state, if there was one, is audited (a cooldown that simply runs out is not)."""
    from llmconfigs.routing import cooldown_clear, cooling_until

    was_cooling = bool(cooling_until([config.pk]))
    cooldown_clear(config.pk)
    with transaction.atomic():
        changed = LLMConfig.objects.filter(pk=config.pk, auth_failed_at__isnull=False).update(auth_failed_at=None)
        if changed or was_cooling:
            audit_record(actor=actor, action=AuditLog.Action.HEALTH, target=config,
                         changes={"health": {"old": "auth_failed" if changed else "cooling_down", "new": "ok"}},
                         source=source, ip_address=ip_address, user_agent=user_agent)
        if changed:
            llm_config_cache_drop()


def llm_config_delete(*, config: LLMConfig, actor=None, source: str = "", ip_address: str | None = None,
                      user_agent: str = "") -> None:
    """Delete a config, unless it is the current default (that would leave every chat without a model)."""
    with transaction.atomic():
        locked = LLMConfig.objects.select_for_update().filter(pk=config.pk).first()
        if locked is None:
            return
        if locked.is_default:
            kind = "embedding" if locked.is_embedding else "chat"
            raise ConfigProtected(
                f"{locked.name!r} is the default {kind} config and cannot be deleted; make another config the "
                "default first."
            )
        # Recorded first, while the row still has its id; a failed delete rolls the record back with it.
        audit_record(
            actor=actor, action=AuditLog.Action.DELETE, target=locked, source=source, ip_address=ip_address,
            user_agent=user_agent,
            changes={"name": {"old": locked.name}, "api_key": {"old": locked.api_key_mask}},
        )
        locked.delete()
        llm_config_cache_drop()


def llm_config_activate(*, config: LLMConfig, actor=None, source: str = "", ip_address: str | None = None,
                        user_agent: str = "") -> LLMConfig:
    return _llm_config_set_active(config=config, active=True, actor=actor, source=source, ip_address=ip_address,
                                  user_agent=user_agent)


def llm_config_deactivate(*, config: LLMConfig, actor=None, source: str = "", ip_address: str | None = None,
                          user_agent: str = "") -> LLMConfig:
    """Deactivate a config; the default is refused (another config must become the default first)."""
    return _llm_config_set_active(config=config, active=False, actor=actor, source=source, ip_address=ip_address,
                                  user_agent=user_agent)


def _llm_config_set_active(*, config: LLMConfig, active: bool, actor, source: str, ip_address: str | None,
                           user_agent: str) -> LLMConfig:
    with transaction.atomic():
        locked = LLMConfig.objects.select_for_update().get(pk=config.pk)
        if locked.is_active == active:
            return locked
        if not active and locked.is_default:
            raise ConfigProtected(
                f"{locked.name!r} is the default config and cannot be deactivated; make another config the default "
                "first.",
                field="is_active",
            )
        _version_baseline(locked)
        locked.is_active = active
        # Activation re-validates: e.g. a keyless template must get its key before it may serve.
        locked.full_clean()
        if getattr(actor, "is_authenticated", False):
            locked.updated_by = actor
        locked.save(update_fields=["is_active", "updated_by", "updated_at"])
        audit_record(
            actor=actor, action=AuditLog.Action.ACTIVATE if active else AuditLog.Action.DEACTIVATE, target=locked,
            changes={"is_active": {"old": not active, "new": active}}, source=source, ip_address=ip_address,
            user_agent=user_agent,
        )
        llm_config_version_record(config=locked, action="activate" if active else "deactivate", actor=actor,
                                  source=source)
        llm_config_cache_drop()
    return locked


@dataclass(frozen=True)
class ConnectionTestResult:
    ok: bool
    latency_ms: float
    category: str = ""
    message: str = ""
    status_code: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "latency_ms": self.latency_ms, "category": self.category, "message": self.message,
                "status_code": self.status_code}


# Enough for any provider to produce a token, small enough to cost nothing.
_CONNECTION_TEST_MAX_TOKENS = 8


def llm_config_test_connection(*, config: LLMConfig, actor=None, source: str = "", ip_address: str | None = None,
                               user_agent: str = "") -> ConnectionTestResult:
    """One real minimal call through the production factory (streaming chat, or an embedding), with the short
    connection-test timeout and no retries. Returns ok + latency, or the provider's error with the key scrubbed."""
    config = LLMConfig.objects.get(pk=config.pk)
    timeout = settings.LLM_CONNECTION_TEST_TIMEOUT
    call = CallRecord(config=config, kind=CallKind.CONNECTION_TEST)
    started = time.perf_counter()
    try:
        if config.is_embedding:
            factory.embeddings(config, timeout=timeout, max_retries=0).embed_query("ping")
        else:
            model = factory.chat_model(config, streaming=True, timeout=timeout, max_retries=0,
                                       max_tokens=_CONNECTION_TEST_MAX_TOKENS)
            for chunk in model.stream("ping"):
                if call.ttft_ms is None and (chunk.content or chunk.tool_call_chunks):
                    call.ttft_ms = round((time.perf_counter() - started) * 1000, 1)
                if chunk.usage_metadata:
                    call.prompt_tokens += chunk.usage_metadata.get("input_tokens", 0)
                    call.completion_tokens += chunk.usage_metadata.get("output_tokens", 0)
        result = ConnectionTestResult(ok=True, latency_ms=round((time.perf_counter() - started) * 1000, 1))
    except Exception as exc:
        error = factory.provider_error(exc, api_key=config.api_key)
        result = ConnectionTestResult(
            ok=False, latency_ms=round((time.perf_counter() - started) * 1000, 1), category=error.category,
            message=scrub(error.message, config.api_key), status_code=error.status_code,
        )
        logger.warning("Connection test of LLM config %s failed: %s: %s", config.pk, result.category, result.message)
    call.latency_ms, call.error_category = result.latency_ms, result.category
    provider_calls_record(calls=[call], origin=CallOrigin(user_id=actor.pk if getattr(actor, "is_authenticated",
                                                                                         False) else None))
    audit_record(actor=actor, action=AuditLog.Action.TEST_CONNECTION, target=config, changes=result.as_dict(),
                 source=source, ip_address=ip_address, user_agent=user_agent)
    if result.ok:
        llm_config_record_usage(config_id=config.pk)
        llm_config_health_clear(config=config, actor=actor, source=source, ip_address=ip_address,
                                user_agent=user_agent)
    elif not config.is_embedding:
        from llmconfigs.errors import ProviderCallError
        from llmconfigs.routing import provider_failure_record

        provider_failure_record(config=config, error=ProviderCallError(result.category, result.message,
                                                                       status_code=result.status_code))
    return result


def llm_config_seed_from_env(
    *, provider: str, api_key: str, model: str = "", base_url: str = ""
) -> tuple[LLMConfig, bool]:
    """Create or update the default chat config from the legacy LLM_* variables. Idempotent: the config is found by
    its seed name, updated in place, and made the default. Returns (config, created)."""
    from llmconfigs.providers import provider_spec

    spec = provider_spec(provider)
    name = f"default-{provider}"
    fields = {
        "provider": provider,
        "model_name": model or spec.default_model,
        "base_url": base_url,
        "is_active": True,
        "description": "Seeded from LLM_TYPE / LLM_MODEL / LLM_BASE_URL.",
    }
    existing = LLMConfig.objects.filter(name=name).first()
    if existing is None:
        config = llm_config_create(name=name, api_key=api_key, source="command", top_p=spec.default_top_p, **fields)
        created = True
    else:
        config = llm_config_update(config=existing, api_key=api_key, source="command", **fields)
        created = False
    if not config.is_default:
        config = llm_config_set_default(config=config, source="command")
    return config, created


def llm_config_seed_templates() -> list[LLMConfig]:
    """Inactive, keyless templates, one per provider, with its usual base URL and model. Existing ones are kept."""
    from llmconfigs.providers import PROVIDERS

    created = []
    for spec in PROVIDERS.values():
        if not spec.default_model:
            continue
        name = f"template-{spec.key}"
        if LLMConfig.objects.filter(name=name).exists():
            continue
        created.append(
            llm_config_create(
                name=name,
                provider=spec.key,
                model_name=spec.default_model,
                base_url=spec.default_base_url,
                top_p=spec.default_top_p,
                is_active=False,
                description=f"Template for {spec.label}: add a key, check the model, activate.",
                source="command",
            )
        )
    return created


DEMO_CONFIG_NAME = "demo-fake-upstream"


def llm_config_seed_demo(*, base_url: str) -> tuple[LLMConfig, bool]:
    """The demo config of `make demo`: an OpenAI-compatible model at `base_url` (the project's fake upstream, which
    needs no key). Idempotent; it becomes the default chat config only when there is none, so a configured provider
    stays the default. Returns (config, is_default)."""
    fields = {"provider": "openai_compatible", "model_name": "demo", "base_url": base_url, "is_active": True,
              "description": "The fake upstream of `make demo`: canned answers, no provider key. Not a real model."}
    config = LLMConfig.objects.filter(name=DEMO_CONFIG_NAME).first()
    if config is None:
        config = llm_config_create(name=DEMO_CONFIG_NAME, source="command", **fields)
    else:
        config = llm_config_update(config=config, source="command", **fields)
    if not config.is_default and not LLMConfig.objects.filter(is_default=True, is_embedding=False).exists():
        config = llm_config_set_default(config=config, source="command")
    return config, config.is_default
