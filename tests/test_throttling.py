"""opsagent.common.throttling (failure counts and locks in the cache) and the client address it counts against."""
from __future__ import annotations

from django.test import RequestFactory

from opsagent.common.clients import client_ip, scope_client_ip
from opsagent.common.throttling import (
    auth_failure_record,
    auth_locked_for,
    login_failure_record,
    login_failures_clear,
    login_locked_for,
)


def test_an_address_is_locked_for_a_window_when_its_failures_reach_the_limit(settings):
    settings.AUTH_FAILURE_LIMIT = 3
    settings.AUTH_FAILURE_WINDOW_SECONDS = 60
    assert auth_failure_record(ip="10.0.0.1") is None
    assert auth_failure_record(ip="10.0.0.1") is None
    assert auth_locked_for(ip="10.0.0.1") is None
    assert auth_failure_record(ip="10.0.0.1") == 60
    assert 0 < auth_locked_for(ip="10.0.0.1") <= 60
    assert auth_locked_for(ip="10.0.0.2") is None


def test_a_zero_limit_turns_the_brake_off(settings):
    settings.AUTH_FAILURE_LIMIT = 0
    for _ in range(50):
        auth_failure_record(ip="10.0.0.1")
    assert auth_locked_for(ip="10.0.0.1") is None


def test_login_locks_per_username_and_a_success_forgets_the_failures(settings):
    settings.ADMIN_LOGIN_FAILURE_LIMIT = 2
    settings.AUTH_FAILURE_LIMIT = 100
    login_failure_record(username="root user\n", ip="10.0.0.1")
    login_failures_clear(username="root user\n")
    login_failure_record(username="root user\n", ip="10.0.0.2")
    assert login_locked_for(username="root user\n", ip="10.0.0.3") is None
    login_failure_record(username="root user\n", ip="10.0.0.3")
    assert login_locked_for(username="root user\n", ip="10.0.0.4")
    assert login_locked_for(username="someone", ip="10.0.0.4") is None


def test_forwarded_addresses_are_believed_only_from_trusted_proxies(settings):
    factory = RequestFactory()
    forwarded = {"REMOTE_ADDR": "10.0.0.9", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 203.0.113.7, 10.0.0.8"}
    assert client_ip(factory.get("/", **forwarded)) == "10.0.0.9"
    settings.TRUSTED_PROXY_IPS = ["10.0.0.9", "10.0.0.8"]
    # The rightmost address no trusted proxy added; what the client wrote before it is ignored.
    assert client_ip(factory.get("/", **forwarded)) == "203.0.113.7"
    scope = {"client": ("10.0.0.9", 1234), "headers": [(b"x-forwarded-for", b"6.6.6.6, 203.0.113.7")]}
    assert scope_client_ip(scope) == "203.0.113.7"
    assert scope_client_ip({"client": ("192.0.2.1", 1), "headers": scope["headers"]}) == "192.0.2.1"


def test_a_forwarded_hop_is_an_address_or_nothing(settings):
    # Some proxies add the client's port; a hop that is no address at all ("unknown") names nobody. Either way no
    # text other than an address reaches an audit row (PostgreSQL's inet column refuses it: a 500) or a lockout.
    settings.TRUSTED_PROXY_IPS = ["10.0.0.9"]
    factory = RequestFactory()

    def forwarded(value: str) -> str | None:
        return client_ip(factory.get("/", REMOTE_ADDR="10.0.0.9", HTTP_X_FORWARDED_FOR=value))

    assert forwarded("203.0.113.7:5123") == "203.0.113.7"
    assert forwarded("[2001:db8::1]:443, 10.0.0.9:80") == "2001:db8::1"
    assert forwarded("2001:db8::2") == "2001:db8::2"
    assert forwarded("6.6.6.6, unknown") is None
    assert forwarded("<script>" * 100) is None
