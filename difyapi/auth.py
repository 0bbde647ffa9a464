"""App API keys (`app-...`): creation, hashing, revocation and the Bearer authentication of every /v1 request."""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from decimal import Decimal

from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from agentcore.limits import LIMIT_FIELDS, Limits, Meter
from agentcore.models import AgentApp
from difyapi.errors import DifyError, forbidden, too_many_auth_failures, unauthorized
from difyapi.models import ApiKey
from llmconfigs.models import AuditLog
from llmconfigs.services import audit_changes, audit_record
from opsagent.common.cache import cache_forget, cache_get, cache_get_many
from opsagent.common.throttling import (
    auth_failure_record,
    auth_lock_key,
    auth_lock_refusal_observe,
    auth_lock_remaining,
)

KEY_PREFIX = "app-"
CACHE_TTL = 600
CACHE_TTL_INVALID = 60
APP_CACHE_TTL = 60
LAST_USED_RESOLUTION = 60  # seconds


def api_key_hash(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_generate() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


def api_key_create(*, app: AgentApp, raw_key: str | None = None, name: str = "", created_by=None, source: str = "",
                   ip_address: str | None = None, user_agent: str = "") -> tuple[ApiKey, str]:
    """Create a key for `app`; returns (row, plaintext). The plaintext is never stored: show it once.
    With `raw_key`, that exact key is used, idempotently (an existing live key for the same app is returned).
    A new key is audited (by its mask, `app-…last4`, never the key or its hash)."""
    raw = raw_key or api_key_generate()
    if not raw.startswith(KEY_PREFIX) or len(raw) < len(KEY_PREFIX) + 16:
        raise ValueError(f"An app key must start with {KEY_PREFIX!r} and be at least 20 characters long.")
    digest = api_key_hash(raw)
    with transaction.atomic():
        existing = ApiKey.objects.select_for_update().filter(key_hash=digest).first()
        if existing is not None:
            if existing.app_id != app.pk:
                raise ValueError("That key already belongs to another app.")
            if existing.revoked_at is not None:
                raise ValueError("That key was revoked; choose another.")
            return existing, raw
        key = ApiKey.objects.create(app=app, key_hash=digest, last4=raw[-4:], name=name, created_by=created_by)
        audit_record(actor=created_by, action=AuditLog.Action.CREATE, target=key, source=source,
                     ip_address=ip_address, user_agent=user_agent,
                     changes={"key": {"new": str(key)}, "app": {"new": app.name}, "name": {"new": name}})
    return key, raw


def api_key_revoke(*, key: ApiKey, actor=None, source: str = "", ip_address: str | None = None,
                   user_agent: str = "") -> ApiKey:
    """Revoke a key (once: revoking a revoked key changes and records nothing) and forget its cached validity."""
    with transaction.atomic():
        if ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now()):
            audit_record(actor=actor, action=AuditLog.Action.REVOKE, target=key, source=source,
                         ip_address=ip_address, user_agent=user_agent,
                         changes={"key": {"old": str(key)}, "app": {"old": str(key.app)}})
        # Now and again on commit: inside a caller's transaction, a request between this and the commit would
        # cache the key as valid again.
        cache_forget(_cache_key(key.key_hash))
    key.refresh_from_db()
    return key


def api_key_update(*, key: ApiKey, actor=None, source: str = "", ip_address: str | None = None,
                   user_agent: str = "") -> ApiKey:
    """Save a key's name and limits (already validated, e.g. by the admin form), with an audit row of what changed
    (never the key: only its mask names it). Saving drops its cached entry, which holds its limits."""
    fields = ["name", *LIMIT_FIELDS]
    with transaction.atomic():
        stored = ApiKey.objects.select_for_update().get(pk=key.pk)
        changes = audit_changes({name: getattr(stored, name) for name in fields},
                                {name: getattr(key, name) for name in fields}, plain=_plain)
        key.save(update_fields=fields)
        if changes:
            audit_record(actor=actor, action=AuditLog.Action.UPDATE, target=key, source=source,
                         ip_address=ip_address, user_agent=user_agent, changes=changes)
    return key


def _plain(value):
    """A value as an audit row holds it: budgets as strings at their stored precision."""
    return f"{value:.4f}" if isinstance(value, Decimal) else value


def api_key_cache_forget(sender, instance: ApiKey, **kwargs) -> None:
    """Receiver of post_save of ApiKey (connected in DifyApiConfig.ready): its cached entry holds its limits."""
    cache_forget(_cache_key(instance.key_hash))


def _cache_key(digest: str) -> str:
    return f"dify:apikey:{digest}"


def _used_key(digest: str) -> str:
    return f"dify:apikey-used:{digest}"


def _app_cache_key(app_id: str) -> str:
    return f"dify:app:{app_id}"


def _app(app_id: str) -> AgentApp | None:
    """The app row, cached: every /v1 request reads it. Saving or deleting an app drops the entry (app_cache_forget),
    and a short TTL bounds what another process without a shared cache may still hold."""
    app = cache_get(_app_cache_key(app_id))
    if app is None:
        app = AgentApp.objects.filter(pk=app_id).first()
        if app is None:
            return None
        cache.set(_app_cache_key(app_id), app, APP_CACHE_TTL)
    return app


def app_cache_forget(sender, instance: AgentApp, **kwargs) -> None:
    """Receiver of post_save and post_delete of AgentApp (connected in DifyApiConfig.ready)."""
    cache_forget(_app_cache_key(str(instance.pk)))


@dataclass(frozen=True)
class AppContext:
    """The authenticated app of a /v1 request."""

    app: AgentApp
    api_key_id: str
    key_limits: Limits = Limits()

    @property
    def meter(self) -> Meter:
        """The request's usage is charged to, and limited by, its app and its key."""
        return Meter.of_app(self.app, key_id=self.api_key_id, key_limits=self.key_limits)


def parse_bearer(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, with Dify's exact 401 messages."""
    if not header or " " not in header.strip():
        raise unauthorized("Authorization header must be provided and start with 'Bearer'")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise unauthorized("Authorization scheme must be 'Bearer'")
    # Never empty: the stripped header has a space with a non-space character after it.
    return token.strip()


# The app of each key as this process last saw it, so that the app's cache entry is asked for in the same round trip
# as the key's (Redis). Only a guess: it is used when the key's own entry names the same app.
_key_apps: dict[str, str] = {}
KEY_APPS_LIMIT = 4096


def app_guess(header: str | None) -> str | None:
    """The app of the header's key as this process last saw it (None when it has not, or the header is not a Bearer
    key): for reading the app's cache entries with the key's own, as a guess that authenticate confirms."""
    try:
        token = parse_bearer(header)
    except DifyError:
        return None
    return _key_apps.get(api_key_hash(token))


def authenticate(header: str | None, *, client_ip: str | None) -> AppContext:
    """Resolve the Bearer key to its app (cached, revocation-aware) or raise the DifyError Dify would send. An address
    with too many wrong keys is refused (429) whatever key it sends, so that guessing learns nothing until the lock
    ends; the lock is read in the key's own cache round trip, and only failures are counted."""
    token = parse_bearer(header)
    digest = api_key_hash(token)
    app_guess = _key_apps.get(digest)
    lock = auth_lock_key(ip=client_ip)
    names = [_cache_key(digest), _used_key(digest)] + ([_app_cache_key(app_guess)] if app_guess else [])
    entries = cache_get_many(names + ([lock] if lock else []))  # one round trip with Redis
    locked_for = auth_lock_remaining(entries.get(lock))
    if locked_for:
        auth_lock_refusal_observe()
        raise too_many_auth_failures(locked_for)
    cached = entries.get(_cache_key(digest))
    if cached == "invalid":
        auth_failure_record(ip=client_ip)
        raise unauthorized("Access token is invalid")
    if cached is None:
        key = (ApiKey.objects.filter(key_hash=digest, revoked_at__isnull=True)
               .only("id", "app_id", *LIMIT_FIELDS).first())
        if key is None:
            cache.set(_cache_key(digest), "invalid", CACHE_TTL_INVALID)
            auth_failure_record(ip=client_ip)
            raise unauthorized("Access token is invalid")
        cached = {"key_id": str(key.pk), "app_id": str(key.app_id), "limits": Limits.of(key)}
        cache.set(_cache_key(digest), cached, CACHE_TTL)
    if _used_key(digest) not in entries:
        # "Last used" to the minute: one write per key a minute, not one per request. Kept apart from the key's
        # entry, which only a database read may set (a revocation deletes it).
        ApiKey.objects.filter(pk=cached["key_id"]).update(last_used_at=timezone.now())
        cache.set(_used_key(digest), True, LAST_USED_RESOLUTION)
    app_id = cached["app_id"]
    app = entries.get(_app_cache_key(app_id)) if app_id == app_guess else None
    if app is None:
        app = _app(app_id)
    if app is None:
        raise forbidden("The app no longer exists.")
    if app_id != app_guess:
        if len(_key_apps) >= KEY_APPS_LIMIT:
            _key_apps.clear()
        _key_apps[digest] = app_id
    if not app.is_active:
        raise DifyError("forbidden", "The app's API service has been disabled.", 403)
    return AppContext(app=app, api_key_id=cached["key_id"], key_limits=cached.get("limits") or Limits())


aauthenticate = sync_to_async(authenticate, thread_sensitive=True)
