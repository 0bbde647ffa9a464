"""The project's password and token checks with the brakes on guessing (opsagent.common.throttling): DRF token
authentication for /api and the admin login form."""
from __future__ import annotations

from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import ValidationError
from rest_framework.authentication import TokenAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed, Throttled

from opsagent.common.clients import client_ip
from opsagent.common.throttling import (
    auth_failure_record,
    auth_locked_for,
    login_failure_record,
    login_failures_clear,
    login_locked_for,
)


class ThrottledTokenAuthentication(TokenAuthentication):
    """DRF's token authentication; an address with too many failed authentications gets 429 with Retry-After for
    any token until its lock ends (so that guessing learns nothing meanwhile). Requests without a token pay
    nothing; with one, a cache read."""

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword.lower().encode():
            return None
        ip = client_ip(request)
        locked_for = auth_locked_for(ip=ip)
        if locked_for:
            raise Throttled(locked_for, detail="Too many failed authentication attempts from this address.")
        try:
            return super().authenticate(request)
        except AuthenticationFailed:
            auth_failure_record(ip=ip)
            raise


class LoginThrottle:
    """A login form refused while the username or the address is locked after too many failures."""

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        ip = client_ip(self.request) if self.request is not None else None
        locked_for = login_locked_for(username=username, ip=ip)
        if locked_for:
            minutes = -(-locked_for // 60)
            raise ValidationError(
                "Too many failed login attempts. Try again in %(minutes)d minute(s).",
                code="locked", params={"minutes": minutes},
            )
        try:
            cleaned = super().clean()
        except ValidationError:
            # A right password refused by the form's own rule (the admin's: staff only) is no guess.
            if getattr(self, "user_cache", None) is None:
                login_failure_record(username=username, ip=ip)
            raise
        login_failures_clear(username=username)
        return cleaned


class ThrottledAdminLoginForm(LoginThrottle, AdminAuthenticationForm):
    """The admin login (staff only)."""


class ThrottledLoginForm(LoginThrottle, AuthenticationForm):
    """The chat page's login: any active user; the same brakes on guessing as the admin's, on the same counters."""
