"""App key authentication in the request's own process (the daphne attack suite sees the same rules from outside):
a key reaches only its own app, revocation touches one key, wrong keys lock their address out, and the caches
(valid keys, wrong keys, apps, "last used") save the database reads they are there to save."""
from __future__ import annotations

import time

import pytest
from django.core.cache import cache
from django.db import connection, transaction
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext

from difyapi.auth import KEY_PREFIX, _cache_key, api_key_create, api_key_generate, api_key_hash, api_key_revoke
from difyapi.models import ApiKey
from difyapi.tests.factories import assert_error, make_app, make_key

pytestmark = pytest.mark.django_db

WRONG_KEY = "app-wrongwrongwrongwrongwrong"


def info(key: str, *, address: str = "10.9.8.7", scheme: str = "Bearer "):
    return Client().get("/v1/info", headers={"Authorization": f"{scheme}{key}"}, REMOTE_ADDR=address)


def tables_read(queries) -> set[str]:
    return {table for query in queries for table in ("difyapi_apikey", "agentcore_agentapp") if table in query["sql"]}


def test_a_generated_key_is_the_prefix_and_24_random_bytes_url_safe():
    keys = {api_key_generate() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert key.startswith(KEY_PREFIX) and len(key) == len(KEY_PREFIX) + 32  # 24 bytes in base64url


def test_a_created_key_records_its_name_and_creator_and_stores_only_its_hash_and_last_four(staff_user):
    app = make_app()
    row, raw = api_key_create(app=app, created_by=staff_user)
    assert (row.app, row.name, row.created_by, row.key_hash, row.last4) == (app, "", staff_user, api_key_hash(raw),
                                                                           raw[-4:])


def test_a_chosen_key_needs_the_prefix_and_sixteen_more_characters():
    app = make_app()
    shortest = KEY_PREFIX + "k" * 16
    assert api_key_create(app=app, raw_key=shortest)[1] == shortest
    with pytest.raises(ValueError, match="must start with 'app-' and be at least 20 characters long"):
        api_key_create(app=app, raw_key=shortest[:-1])


def test_a_chosen_key_of_another_app_or_a_revoked_one_is_refused():
    app = make_app()
    row, raw = api_key_create(app=app, raw_key=KEY_PREFIX + "chosen-0123456789")
    with pytest.raises(ValueError) as taken:
        api_key_create(app=make_app(), raw_key=raw)
    assert str(taken.value) == "That key already belongs to another app."
    api_key_revoke(key=row)
    with pytest.raises(ValueError) as revoked:
        api_key_create(app=app, raw_key=raw)
    assert str(revoked.value) == "That key was revoked; choose another."


def test_a_wrong_key_is_refused_while_other_keys_exist():
    make_key(make_app())
    assert_error(info(WRONG_KEY), 401, "unauthorized", "Access token is invalid")


def test_revoking_a_key_leaves_the_apps_other_keys_working():
    app = make_app()
    first, second = make_key(app), make_key(app)
    api_key_revoke(key=ApiKey.objects.get(last4=first[-4:]))
    assert_error(info(first), 401, "unauthorized", "Access token is invalid")
    assert info(second).status_code == 200
    assert ApiKey.objects.get(last4=second[-4:]).revoked_at is None


def test_a_key_revoked_inside_a_transaction_is_not_left_valid_by_a_request_before_the_commit(
        django_capture_on_commit_callbacks):
    app = make_app()
    key = make_key(app)
    assert info(key).status_code == 200  # cached as valid
    row = ApiKey.objects.get(app=app)
    entry = _cache_key(row.key_hash)
    valid = cache.get(entry)
    assert valid is not None
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        api_key_revoke(key=row)
        # A request on another connection before the commit still reads the key as valid and caches it again.
        cache.set(entry, valid)
    assert_error(info(key), 401, "unauthorized", "Access token is invalid")


def test_revoking_a_revoked_key_keeps_the_time_it_was_revoked():
    app = make_app()
    make_key(app)
    revoked_at = api_key_revoke(key=ApiKey.objects.get(app=app)).revoked_at
    assert api_key_revoke(key=ApiKey.objects.get(app=app)).revoked_at == revoked_at


def test_spaces_after_the_scheme_are_ignored_and_a_token_with_a_space_is_a_wrong_token():
    key = make_key(make_app())
    assert info(key, scheme="Bearer   ").status_code == 200
    assert_error(info(f"{key} {key}"), 401, "unauthorized", "Access token is invalid")


def test_wrong_keys_lock_their_address_out_even_for_a_right_key_while_others_are_served(settings):
    settings.AUTH_FAILURE_LIMIT = 3
    settings.AUTH_FAILURE_WINDOW_SECONDS = 120
    key = make_key(make_app())
    # The first wrong key is looked up, the next two are answered from the cache: both kinds count.
    for _ in range(3):
        assert_error(info(WRONG_KEY, address="10.0.0.66"), 401, "unauthorized", "Access token is invalid")
    locked = info(key, address="10.0.0.66")
    body = assert_error(locked, 429, "too_many_requests")
    retry_after = int(locked["Retry-After"])
    assert 0 < retry_after <= 120 and f"Try again in {retry_after} seconds." in body["message"]
    assert info(key, address="10.0.0.67").status_code == 200


def test_a_wrong_key_is_remembered_and_asked_for_once():
    with CaptureQueriesContext(connection) as first:
        assert_error(info(WRONG_KEY), 401, "unauthorized", "Access token is invalid")
    with CaptureQueriesContext(connection) as again:
        assert_error(info(WRONG_KEY), 401, "unauthorized", "Access token is invalid")
    assert tables_read(first.captured_queries) == {"difyapi_apikey"}
    assert again.captured_queries == []


def test_a_second_key_of_an_app_already_seen_reads_its_key_but_not_the_app():
    app = make_app()
    first, second = make_key(app), make_key(app)
    assert info(first).status_code == 200
    with CaptureQueriesContext(connection) as queries:
        assert info(second).json()["name"] == app.name
    assert tables_read(queries.captured_queries) == {"difyapi_apikey"}
    with CaptureQueriesContext(connection) as queries:
        assert info(second).status_code == 200
    assert queries.captured_queries == []  # the key, its app and "last used" all answered by the cache


@pytest.fixture
def clock(monkeypatch):
    """clock(seconds): move the cache's clock (time.time) that far ahead of now."""
    real = time.time

    def move(seconds: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real() + seconds)

    return move


# The clock moves this process's time, which Redis's own expiry does not follow: the cache is the in-process one here,
# on every database (the lifetimes asked of the cache are the same whatever its backend).
@override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                                       "LOCATION": "auth-expiry"}})
def test_cached_answers_expire_after_their_time(clock):
    app = make_app()
    key = make_key(app)
    assert info(key).status_code == 200 and info(WRONG_KEY).status_code == 401
    clock(59)
    with CaptureQueriesContext(connection) as queries:
        assert info(key).status_code == 200 and info(WRONG_KEY).status_code == 401
    assert queries.captured_queries == []
    clock(61)  # a wrong key, the app and "last used" are kept a minute
    with CaptureQueriesContext(connection) as queries:
        assert info(WRONG_KEY).status_code == 401
    assert tables_read(queries.captured_queries) == {"difyapi_apikey"}
    with CaptureQueriesContext(connection) as queries:
        assert info(key).status_code == 200
    assert [q["sql"].split()[0] for q in queries.captured_queries] == ["UPDATE", "SELECT"]  # last used; the app
    assert tables_read(queries.captured_queries) == {"difyapi_apikey", "agentcore_agentapp"}
    clock(599)  # a valid key, ten minutes (revocation deletes it at once)
    with CaptureQueriesContext(connection) as queries:
        assert info(key).status_code == 200
    assert "SELECT" not in [q["sql"].split()[0] for q in queries.captured_queries if "difyapi_apikey" in q["sql"]]
    clock(601)
    with CaptureQueriesContext(connection) as queries:
        assert info(key).status_code == 200
    assert "SELECT" in [q["sql"].split()[0] for q in queries.captured_queries if "difyapi_apikey" in q["sql"]]
