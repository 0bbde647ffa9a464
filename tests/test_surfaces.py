"""opsagent.common.surfaces: the refusals made before a view runs are rendered by the surface of the path's prefix,
which the apps register (the leaf imports no app)."""
import json

import pytest

from difyapi.errors import DifySurface
from opsagent.common import surfaces
from opsagent.common.dependencies import DependencyUnavailable


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(surfaces, "_surfaces", {})
    return surfaces


def test_the_longest_registered_prefix_wins_and_only_whole_segments_match(registry):
    outer, inner = surfaces.Surface(), surfaces.RestSurface()
    registry.register("/v1", outer)
    registry.register("/v1/files/", inner)
    assert registry.surface_for("/v1") is outer
    assert registry.surface_for("/v1/chat-messages") is outer
    assert registry.surface_for("/v1/files/upload") is inner
    assert registry.surface_for("/v10/chat-messages") is registry.DEFAULT
    assert registry.surface_for("/admin/") is registry.DEFAULT


def test_the_apps_register_their_surfaces_when_django_starts():
    assert isinstance(surfaces.surface_for("/v1/chat-messages"), DifySurface)
    assert type(surfaces.surface_for("/api/llm-configs/")) is surfaces.RestSurface
    assert type(surfaces.surface_for("/health/")) is surfaces.Surface


def test_each_surface_answers_a_dead_dependency_in_its_own_format(settings):
    settings.DEPENDENCY_RETRY_SECONDS = 7
    failure = DependencyUnavailable("redis")
    dify = surfaces.surface_for("/v1/messages").unavailable(failure).response()
    rest = surfaces.surface_for("/api/agent/sessions/").unavailable(failure).response()
    assert (dify.status_code, dify["Retry-After"]) == (rest.status_code, rest["Retry-After"]) == (503, "7")
    assert json.loads(dify.content) == {"code": "service_unavailable", "message": failure.message, "status": 503}
    assert json.loads(rest.content) == {"detail": failure.message, "code": "service_unavailable"}


def test_a_refusal_gives_daphne_and_asgi_the_same_headers_as_the_response():
    refusal = surfaces.Refusal.json({"detail": "no"}, 429, headers={"Retry-After": "3"})
    assert refusal.raw_headers() == [(b"content-type", b"application/json"), (b"retry-after", b"3")]
    response = refusal.response()
    assert (response.status_code, response["Content-Type"], response["Retry-After"]) == (429, "application/json", "3")
