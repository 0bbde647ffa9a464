"""Writes to LLM configurations: create/update/default/usage, each in one transaction with its audit record."""
from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from llmconfigs.errors import ConfigInactive, ConfigWrongKind
from llmconfigs.models import AuditLog, LLMConfig
from llmconfigs.secrets import mask_secret
from llmconfigs.selectors import llm_config_cache_invalidate


def audit_record(
    *,
    actor=None,
    action: str,
    target: Any,
    changes: dict[str, Any] | None = None,
    source: str = "",
    ip_address: str | None = None,
) -> AuditLog:
    """Append one audit row. `changes` must already be free of secrets (use masks)."""
    user = actor if getattr(actor, "is_authenticated", False) else None
    return AuditLog.objects.create(
        actor=user,
        actor_repr=user.get_username() if user else "",
        action=action,
        target_type=target._meta.label if hasattr(target, "_meta") else str(type(target).__name__),
        target_id=str(getattr(target, "pk", "") or ""),
        target_repr=str(target)[:300],
        source=source,
        ip_address=ip_address,
        changes=changes or {},
    )


def _invalidate_cache() -> None:
    # Now, so reads later in this transaction see the change; and again after commit, so a concurrent reader that
    # cached the old row in between is corrected.
    llm_config_cache_invalidate()
    transaction.on_commit(llm_config_cache_invalidate)


def _set_api_key(config: LLMConfig, api_key: str | None) -> bool:
    """Store a new key unless `api_key` is None or blank (blank on edit keeps the stored key)."""
    if api_key is None or not api_key.strip():
        return False
    config.api_key = api_key.strip()
    config.api_key_mask = mask_secret(config.api_key)
    return True


def _changed(before: dict[str, Any], config: LLMConfig, fields: list[str]) -> dict[str, Any]:
    diff = {}
    for name in fields:
        old, new = before.get(name), getattr(config, name)
        if old != new:
            diff[name] = {"old": _jsonable(old), "new": _jsonable(new)}
    return diff


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    return value


def llm_config_create(*, actor=None, api_key: str = "", source: str = "", ip_address: str | None = None,
                      **fields: Any) -> LLMConfig:
    config = LLMConfig(**fields)
    _set_api_key(config, api_key)
    config.created_by = config.updated_by = actor if getattr(actor, "is_authenticated", False) else None
    config.full_clean()
    with transaction.atomic():
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
                     ip_address=ip_address)
        _invalidate_cache()
    return config


_AUDITED_FIELDS = [
    "name", "provider", "model_name", "base_url", "max_tokens", "temperature", "top_p", "frequency_penalty",
    "presence_penalty", "description", "is_active", "is_default", "is_embedding", "extra_config",
    "input_price_per_million", "output_price_per_million", "currency",
]


def llm_config_update(*, config: LLMConfig, actor=None, api_key: str | None = None, source: str = "",
                      ip_address: str | None = None, **fields: Any) -> LLMConfig:
    """Update fields; `api_key` None or blank keeps the stored key. Default/active flags go through their services."""
    with transaction.atomic():
        locked = LLMConfig.objects.select_for_update().get(pk=config.pk)
        before = {name: getattr(locked, name) for name in _AUDITED_FIELDS}
        before_mask = locked.api_key_mask
        for name, value in fields.items():
            setattr(locked, name, value)
        key_changed = _set_api_key(locked, api_key)
        if locked.is_default and not locked.is_active:
            raise ConfigInactive("The default config cannot be deactivated; make another config the default first.",
                                 field="is_active")
        locked.updated_by = actor if getattr(actor, "is_authenticated", False) else locked.updated_by
        locked.full_clean()
        if locked.is_default and not before["is_default"]:
            LLMConfig.objects.filter(is_default=True, is_embedding=locked.is_embedding).exclude(pk=locked.pk).update(
                is_default=False
            )
        locked.save()
        changes = _changed(before, locked, _AUDITED_FIELDS)
        if key_changed:
            changes["api_key"] = {"old": before_mask, "new": locked.api_key_mask}
        if changes:
            audit_record(actor=actor, action=AuditLog.Action.UPDATE, target=locked, changes=changes, source=source,
                         ip_address=ip_address)
        _invalidate_cache()
    return locked


def llm_config_set_default(*, config: LLMConfig, actor=None, source: str = "", ip_address: str | None = None,
                           ) -> LLMConfig:
    """Make `config` the one default of its kind (chat or embedding): one transaction, rows locked."""
    for attempt in range(3):
        try:
            with transaction.atomic():
                target = LLMConfig.objects.select_for_update().get(pk=config.pk)
                if not target.is_active:
                    raise ConfigInactive(f"{target.name!r} is inactive; activate it before making it the default.")
                # Lock the current default(s) of this kind too, so concurrent callers queue up here.
                previous = list(
                    LLMConfig.objects.select_for_update()
                    .filter(is_default=True, is_embedding=target.is_embedding)
                    .exclude(pk=target.pk)
                    .values_list("name", flat=True)
                )
                if target.is_default and not previous:
                    return target
                LLMConfig.objects.filter(is_default=True, is_embedding=target.is_embedding).exclude(
                    pk=target.pk
                ).update(is_default=False)
                LLMConfig.objects.filter(pk=target.pk).update(is_default=True, updated_at=timezone.now())
                target.is_default = True
                audit_record(
                    actor=actor,
                    action=AuditLog.Action.SET_DEFAULT,
                    target=target,
                    changes={"is_default": {"old": False, "new": True}, "previous_default": previous},
                    source=source,
                    ip_address=ip_address,
                )
                _invalidate_cache()
                return target
        except IntegrityError:
            # Another transaction set a default between our lock and our write (possible on backends without row
            # locks); the partial unique index refused the second default. Try again from a fresh read.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def llm_config_record_usage(
    *,
    config_id: uuid.UUID | str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cost: Decimal = Decimal(0),
) -> None:
    """Count one call and its tokens atomically in the database (no read-modify-write, no lost updates)."""
    LLMConfig.objects.filter(pk=config_id).update(
        usage_count=F("usage_count") + 1,
        last_used_at=timezone.now(),
        prompt_tokens_total=F("prompt_tokens_total") + max(prompt_tokens, 0),
        completion_tokens_total=F("completion_tokens_total") + max(completion_tokens, 0),
        total_tokens_total=F("total_tokens_total") + max(prompt_tokens, 0) + max(completion_tokens, 0),
        cost_total=F("cost_total") + cost,
    )


def llm_config_check_chat_usable(*, config: LLMConfig) -> None:
    if config.is_embedding:
        raise ConfigWrongKind(f"{config.name!r} is an embedding config.")
    if not config.is_active:
        raise ConfigInactive(f"{config.name!r} is inactive.")


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
