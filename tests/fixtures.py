"""Fixtures for every test: the fake OpenAI-compatible upstream, LLM configs pointing at it, users and API clients."""
from __future__ import annotations

import itertools

import pytest
from django.core.cache import cache

from tests.fakes.upstream import FakeUpstream

_counter = itertools.count(1)


@pytest.fixture(scope="session")
def _upstream_server():
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def fake_upstream(_upstream_server):
    """A real HTTP server on 127.0.0.1 speaking the OpenAI chat/embeddings API; script it with `.script(Reply(...))`."""
    _upstream_server.reset()
    yield _upstream_server
    _upstream_server.reset()


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def _dependencies_up():
    """A test that found a dependency down leaves no open circuit breaker to the next one."""
    from opsagent.common.dependencies import database, redis_server

    yield
    database.up()
    redis_server.up()


@pytest.fixture
async def close_worker_connections():
    """For async tests on a transactional database (`pytest.mark.usefixtures("close_worker_connections")`): async ORM
    calls leave a connection open in asgiref's worker thread; close it so the test database can be dropped."""
    import asyncio

    from asgiref.sync import sync_to_async
    from django.db import connections

    yield
    # Work a run left in the background (a prune, a saver opened ahead) ends on this loop, which ends with the test.
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=10)
    await sync_to_async(connections.close_all)()


@pytest.fixture
def make_llm_config(db, fake_upstream):
    """Create an LLMConfig through the service, pointing at the fake upstream unless told otherwise."""
    from llmconfigs.services import llm_config_create, llm_config_set_default

    def make(*, default: bool = False, **fields):
        n = next(_counter)
        values = {
            "name": f"config-{n}",
            "provider": "openai",
            "model_name": f"fake-model-{n}",
            "base_url": fake_upstream.base_url,
            "api_key": f"sk-test-{n:04d}-secretvalue-abcdef{n:04d}",
        }
        values.update(fields)
        config = llm_config_create(**values)
        if default:
            config = llm_config_set_default(config=config)
        return config

    return make


@pytest.fixture
def default_llm_config(make_llm_config):
    return make_llm_config(name="default-chat", model_name="fake-default", default=True)


# The apps whose permissions an OpsAgent operator is granted in the admin.
OPSAGENT_APPS = ("llmconfigs", "agentcore", "difyapi")


@pytest.fixture
def grant(db, django_user_model):
    """grant(user, "app.codename", ...): give `user` those permissions; returns the user read again (Django caches
    a user's permissions on the instance)."""
    from django.contrib.auth.models import Permission

    def give(user, *names: str):
        for name in names:
            app_label, codename = name.split(".", 1)
            user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
        return django_user_model.objects.get(pk=user.pk)

    return give


@pytest.fixture
def staff_user(django_user_model):
    """A staff member granted every permission of OpsAgent's apps (the custom ones too), as an operator would be in
    the admin. The staff flag itself grants nothing: see bare_staff_user."""
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user(username="staff", password="pw-staff-123", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label__in=OPSAGENT_APPS))
    return django_user_model.objects.get(pk=user.pk)


@pytest.fixture
def bare_staff_user(django_user_model):
    """is_staff and no permission at all: the REST API and the admin must let it do nothing an API user can't."""
    return django_user_model.objects.create_user(username="bare-staff", password="pw-bare-123", is_staff=True)


@pytest.fixture
def plain_user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="pw-alice-123")


def client_for(user):
    """An APIClient authenticated as `user` (for tests that act as several users)."""
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def api_client():
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture
def staff_client(api_client, staff_user):
    api_client.force_authenticate(staff_user)
    return api_client


@pytest.fixture
def user_client(plain_user):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(plain_user)
    return client


def refused_by_database(write) -> bool:
    """Whether the database refuses `write` (an IntegrityError from a constraint), in a savepoint of its own."""
    from django.db import IntegrityError, transaction

    try:
        with transaction.atomic():
            write()
    except IntegrityError:
        return True
    return False
