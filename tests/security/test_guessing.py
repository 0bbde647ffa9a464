"""Issue 15, item 6 (no brake on guessing): wrong app keys, API tokens and admin passwords from one address are
answered 429 (or refused at the login) once they reach the limit, across workers sharing Redis, while other
addresses are served. Each test speaks from its own loopback address (127.x.y.z), so counts never mix."""
from __future__ import annotations

import random

import httpx
import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token

from agentcore.models import AgentApp
from difyapi.auth import api_key_create

LIMIT = 5
SMALL_LIMITS = {"AUTH_FAILURE_LIMIT": str(LIMIT), "AUTH_FAILURE_WINDOW_SECONDS": "120"}


def _address() -> str:
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


def _client(server, address: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=server.base_url, transport=transport, timeout=20)


def _wrong_key(n: int) -> dict[str, str]:
    return {"Authorization": f"Bearer app-guess-{n:04d}-aaaaaaaaaaaaaaaaaaaa"}


@pytest.fixture
def app_key(db) -> str:
    app = AgentApp.objects.create(name="guessing", mode="chat")
    return api_key_create(app=app)[1]


@pytest.fixture
def token(plain_user) -> str:
    return Token.objects.create(user=plain_user).key


def _assert_dify_429(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert (body["code"], body["status"]) == ("too_many_requests", 429)
    assert 0 < int(response.headers["retry-after"]) <= 120


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_wrong_app_keys_lock_the_address_out_while_others_are_served(start_daphne, app_key, token):
    server = start_daphne(**SMALL_LIMITS)
    guesser, other = _address(), _address()
    good = {"Authorization": f"Bearer {app_key}"}
    with _client(server, guesser) as client:
        for n in range(LIMIT):
            assert client.get("/v1/info", headers=_wrong_key(n)).status_code == 401
        _assert_dify_429(client.get("/v1/info", headers=_wrong_key(LIMIT)))
        # Locked for any key, so a right guess is not told apart from a wrong one; the consumers too.
        _assert_dify_429(client.get("/v1/info", headers=good))
        _assert_dify_429(client.post("/v1/chat-messages/x/stop", headers=good, json={"user": "u"}))
        _assert_dify_429(client.post("/v1/chat-messages", headers=good, json={"inputs": {}, "query": "hi",
                                                                            "user": "u"}))
        # One count per address across surfaces: the REST API refuses its tokens too.
        locked = client.get("/api/llm-configs/", headers={"Authorization": f"Token {token}"})
        assert locked.status_code == 429 and "retry-after" in locked.headers
    with _client(server, other) as client:
        assert client.get("/v1/info", headers=good).status_code == 200
        assert client.get("/v1/info", headers=_wrong_key(0)).status_code == 401


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_wrong_api_tokens_get_drf_429_with_retry_after(start_daphne, token):
    server = start_daphne(**SMALL_LIMITS)
    guesser, other = _address(), _address()
    with _client(server, guesser) as client:
        for n in range(LIMIT):
            response = client.get("/api/llm-configs/", headers={"Authorization": f"Token wrong{n:036d}"})
            assert response.status_code == 401
        response = client.get("/api/llm-configs/", headers={"Authorization": f"Token {token}"})
        assert response.status_code == 429
        assert 0 < int(response.headers["retry-after"]) <= 120
        assert "Too many failed authentication attempts" in response.json()["detail"]
    with _client(server, other) as client:
        assert client.get("/api/llm-configs/", headers={"Authorization": f"Token {token}"}).status_code == 200


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_two_workers_sharing_redis_share_the_count(start_daphne, app_key):
    redis_url = settings.REDIS_URL or "redis://127.0.0.1:6379/15"
    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.skip("Redis is not reachable")
    first = start_daphne(REDIS_URL=redis_url, **SMALL_LIMITS)
    second = start_daphne(REDIS_URL=redis_url, **SMALL_LIMITS)
    guesser = _address()
    with _client(first, guesser) as a, _client(second, guesser) as b:
        # Alternating workers: neither sees the limit on its own (3 and 2 failures), together they reach it.
        for n in range(LIMIT):
            assert (a if n % 2 == 0 else b).get("/v1/info", headers=_wrong_key(n)).status_code == 401
        _assert_dify_429(b.get("/v1/info", headers=_wrong_key(LIMIT)))
        _assert_dify_429(a.get("/v1/info", headers={"Authorization": f"Bearer {app_key}"}))


# ----- the admin login (Django's test client: each request states its REMOTE_ADDR) -----

LOGIN_URL = "/admin/login/?next=/admin/"


def _login(client, username: str, password: str, address: str):
    return client.post(LOGIN_URL, {"username": username, "password": password}, REMOTE_ADDR=address)


@pytest.fixture
def admin_user(db):
    return get_user_model().objects.create_user(username="root", password="right-password-123", is_staff=True,
                                                is_superuser=True)


@pytest.mark.django_db
def test_admin_username_is_locked_after_failures_from_anywhere(client, admin_user, settings):
    settings.ADMIN_LOGIN_FAILURE_LIMIT = 3
    for n in range(3):
        response = _login(client, "root", f"wrong-{n}", _address())
        assert response.status_code == 200 and "correct username and password" in response.content.decode()
    response = _login(client, "root", "right-password-123", _address())
    assert response.status_code == 200  # the form again, not the redirect of a login
    assert "Too many failed login attempts" in response.content.decode()
    assert "_auth_user_id" not in client.session
    get_user_model().objects.create_user(username="other", password="other-password-123", is_staff=True)
    assert _login(client, "other", "other-password-123", _address()).status_code == 302


@pytest.mark.django_db
def test_admin_logins_from_one_address_are_limited_across_usernames(client, admin_user, settings):
    settings.AUTH_FAILURE_LIMIT = 4
    guesser = _address()
    for n in range(4):
        assert _login(client, f"user{n}", "guess", guesser).status_code == 200
    response = _login(client, "root", "right-password-123", guesser)
    assert "Too many failed login attempts" in response.content.decode()
    assert _login(client, "root", "right-password-123", _address()).status_code == 302


@pytest.mark.django_db
def test_a_successful_login_forgets_the_usernames_failures(client, admin_user, settings):
    settings.ADMIN_LOGIN_FAILURE_LIMIT = 3
    for _ in range(2):
        _login(client, "root", "wrong", _address())
    assert _login(client, "root", "right-password-123", _address()).status_code == 302
    client.logout()
    for _ in range(2):
        _login(client, "root", "wrong", _address())
    assert _login(client, "root", "right-password-123", _address()).status_code == 302
