"""Brakes on guessing: failed authentications counted per client address (and failed admin logins per username) in
the shared cache, and a lock once a count reaches its limit. With REDIS_URL every worker sees the same counts."""
from __future__ import annotations

import hashlib
import math
import time

from django.conf import settings
from django.core.cache import cache

from opsagent.common.metrics import rate_limit_refusal_observe

# Every surface (app keys on /v1, tokens on /api and the WebSocket, admin logins) adds to one count per address.
CLIENT = "client"
LOGIN = "login"


def _subject(kind: str, subject: str) -> str:
    # Usernames may hold anything a cache key must not (spaces, control characters, any length).
    return hashlib.sha256(subject.encode()).hexdigest()[:32] if kind == LOGIN else subject


def _count_key(kind: str, subject: str) -> str:
    return f"throttle:count:{kind}:{_subject(kind, subject)}"


def _lock_key(kind: str, subject: str) -> str:
    return f"throttle:lock:{kind}:{_subject(kind, subject)}"


def auth_lock_key(*, ip: str | None) -> str | None:
    """The cache key that holds this address's lock, for callers that read it in their own cache round trip."""
    return _lock_key(CLIENT, ip) if ip else None


def auth_lock_remaining(until: float | None) -> int | None:
    """Whole seconds left of a lock read from the cache (at least 1), or None when there is no lock."""
    if until is None:
        return None
    left = until - time.time()
    return math.ceil(left) if left > 0 else None


def auth_locked_for(*, ip: str | None) -> int | None:
    """Seconds until this address may authenticate again, None when it may now (one cache read)."""
    key = auth_lock_key(ip=ip)
    left = auth_lock_remaining(cache.get(key)) if key else None
    if left:
        auth_lock_refusal_observe()
    return left


def auth_lock_refusal_observe() -> None:
    """A request refused because its address is locked (for the metrics)."""
    rate_limit_refusal_observe(scope="client", limit="auth_lock")


def _failure_record(kind: str, subject: str, *, limit: int, window: int) -> int | None:
    """Count one failure in the subject's window (which starts at its first failure); at the limit, lock the subject
    for one window and start counting again. Returns the lock's length when this failure set it."""
    key = _count_key(kind, subject)
    cache.add(key, 0, window)
    try:
        count = cache.incr(key)
    except ValueError:  # the window ended between the two calls
        cache.add(key, 1, window)
        count = 1
    if count < limit:
        return None
    cache.set(_lock_key(kind, subject), time.time() + window, window)
    cache.delete(key)
    return window


def auth_failure_record(*, ip: str | None) -> int | None:
    """One failed authentication (a wrong key, token or password) from `ip`."""
    if not ip or settings.AUTH_FAILURE_LIMIT <= 0:
        return None
    return _failure_record(CLIENT, ip, limit=settings.AUTH_FAILURE_LIMIT, window=settings.AUTH_FAILURE_WINDOW_SECONDS)


def login_locked_for(*, username: str, ip: str | None) -> int | None:
    """Seconds until this username may try to log in from this address again (either may be locked)."""
    keys = [_lock_key(LOGIN, username)] + ([_lock_key(CLIENT, ip)] if ip else [])
    remaining = [auth_lock_remaining(until) for until in cache.get_many(keys).values()]
    left = max((left for left in remaining if left), default=None)
    if left:
        rate_limit_refusal_observe(scope="client", limit="login_lock")
    return left


def login_failure_record(*, username: str, ip: str | None) -> None:
    """A failed admin login: counts against the address and against the username (guessing one account's password
    from many addresses)."""
    auth_failure_record(ip=ip)
    if username and settings.ADMIN_LOGIN_FAILURE_LIMIT > 0:
        _failure_record(LOGIN, username, limit=settings.ADMIN_LOGIN_FAILURE_LIMIT,
                        window=settings.ADMIN_LOGIN_LOCKOUT_SECONDS)


def login_failures_clear(*, username: str) -> None:
    """A successful login forgets the username's earlier failures (not the address's)."""
    cache.delete(_count_key(LOGIN, username))
