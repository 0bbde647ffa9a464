"""Deployment security settings (issue 15, Verification): `manage.py check --deploy` is clean once the production
environment variables are given and names what is missing without them; behind a TLS proxy a real daphne redirects
plain http, sends HSTS and marks cookies Secure (that the defaults keep plain http on 127.0.0.1 working is in
test_headers.py)."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
HTTPS_ENV = {
    "DJANGO_SECURE_SSL_REDIRECT": "true",
    "DJANGO_SECURE_HSTS_SECONDS": "31536000",
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "DJANGO_SECURE_HSTS_PRELOAD": "true",
    "DJANGO_SESSION_COOKIE_SECURE": "true",
    "DJANGO_CSRF_COOKIE_SECURE": "true",
    "DJANGO_SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https",
}


def deploy_check(**env: str) -> subprocess.CompletedProcess:
    """`manage.py check --deploy --fail-level WARNING` with the production settings module and only `env` (plus the
    secrets production must have): nothing from the test run leaks in."""
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DJANGO_SETTINGS_MODULE": "opsagent.settings",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "FIELD_ENCRYPTION_KEY": secrets.token_urlsafe(48),
        "DJANGO_ALLOWED_HOSTS": "ops.example.com",
        **env,
    }
    return subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=300)


def test_deploy_check_is_clean_with_the_production_environment():
    result = deploy_check(**HTTPS_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_deploy_check_names_each_https_setting_left_at_its_development_default():
    result = deploy_check()
    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr, warning
    result = deploy_check(**{**HTTPS_ENV, "DJANGO_SECURE_HSTS_PRELOAD": "false"})
    assert result.returncode != 0 and "security.W021" in result.stderr


def test_a_malformed_proxy_header_setting_stops_the_start():
    result = deploy_check(**{**HTTPS_ENV, "DJANGO_SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO"})
    assert result.returncode != 0 and "DJANGO_SECURE_PROXY_SSL_HEADER" in result.stderr


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_behind_a_tls_proxy_http_is_redirected_and_https_is_strict(start_daphne):
    server = start_daphne(**HTTPS_ENV)
    with httpx.Client(base_url=server.base_url, timeout=20) as client:
        plain = client.get("/admin/login/")
        assert plain.status_code == 301 and plain.headers["location"].startswith("https://")
        # Load balancer probes stay on plain http.
        assert client.get("/health/").status_code == 200
        secure = client.get("/admin/login/", headers={"X-Forwarded-Proto": "https"})
        assert secure.status_code == 200
        assert secure.headers["strict-transport-security"] == "max-age=31536000; includeSubDomains; preload"
        assert "; secure" in secure.headers["set-cookie"].lower()

