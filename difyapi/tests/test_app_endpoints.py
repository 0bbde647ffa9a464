"""GET /v1/, auth, the 404/405 envelopes, CSRF exemption, /info, /parameters, /meta, /site, /models and the audio
stubs, checked against SPEC.md §1, §9, §10 and the /v1/models extension."""
from __future__ import annotations

import pytest
from django.utils import timezone

from agentcore.models import ToolPolicy
from difyapi.auth import api_key_revoke
from difyapi.models import ApiKey
from difyapi.tests.factories import DifyClient, assert_error, make_app, make_key

pytestmark = pytest.mark.django_db


@pytest.fixture
def app():
    return make_app(name="Ops Helper", description="Answers ops questions", opening_statement="Hi!",
                    suggested_questions=["What is the load?"])


@pytest.fixture
def client(app):
    return DifyClient(make_key(app))


def test_index_needs_no_auth_and_welcomes():
    response = DifyClient(None).get("/v1/")
    assert response.status_code == 200
    assert response.json() == {"welcome": "Dify OpenAPI", "api_version": "v1", "server_version": "1.9.1"}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "Authorization header must be provided and start with 'Bearer'"),
        ("Bearer", "Authorization header must be provided and start with 'Bearer'"),
        ("Basic abcdef", "Authorization scheme must be 'Bearer'"),
        ("Bearer app-unknownunknownunknown", "Access token is invalid"),
    ],
)
def test_auth_failures_are_difys_401(app, header, message):
    client = DifyClient(None)
    headers = {"Authorization": header} if header else {}
    response = client.get("/v1/info", **headers)
    assert_error(response, 401, "unauthorized", message)
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'


def test_scheme_is_case_insensitive(app):
    key = make_key(app)
    response = DifyClient(None).get("/v1/info", Authorization=f"bearer {key}")
    assert response.status_code == 200


def test_revoked_key_gets_401(app):
    key = make_key(app)
    client = DifyClient(key)
    assert client.get("/v1/info").status_code == 200  # now cached as valid
    api_key_revoke(key=ApiKey.objects.get(app=app))
    assert_error(client.get("/v1/info"), 401, "unauthorized", "Access token is invalid")


def test_a_request_records_when_its_key_was_last_used(app):
    key = make_key(app)
    row = ApiKey.objects.get(app=app)
    assert row.last_used_at is None
    before = timezone.now()
    assert DifyClient(key).get("/v1/info").status_code == 200
    row.refresh_from_db()
    assert row.last_used_at is not None and row.last_used_at >= before
    first = row.last_used_at
    assert DifyClient(key).get("/v1/info").status_code == 200  # within the minute: no second write
    row.refresh_from_db()
    assert row.last_used_at == first


def test_disabled_app_gets_403(app, client):
    app.is_active = False
    app.save()
    assert_error(client.get("/v1/info"), 403, "forbidden", "The app's API service has been disabled.")


def test_app_changes_reach_requests_that_had_the_app_cached(app, client):
    assert client.get("/v1/info").json()["name"] == "Ops Helper"  # the app is cached now
    app.name = "Ops Helper 2"
    app.save()
    assert client.get("/v1/info").json()["name"] == "Ops Helper 2"
    app.is_active = False
    app.save()
    assert_error(client.get("/v1/info"), 403, "forbidden", "The app's API service has been disabled.")


def test_a_key_that_now_belongs_to_another_app_reaches_that_app(app):
    from django.core.cache import cache

    from difyapi.auth import _cache_key, api_key_hash

    key = make_key(app)
    client = DifyClient(key)
    assert client.get("/v1/info").json()["name"] == "Ops Helper"  # this process now expects the key's app
    other = make_app(name="Other app")
    ApiKey.objects.filter(app=app).update(app=other)
    cache.delete(_cache_key(api_key_hash(key)))  # as an edit of the key would
    assert client.get("/v1/info").json()["name"] == "Other app"


def test_deleted_app_is_refused_even_when_it_was_cached(app, client):
    assert client.get("/v1/info").status_code == 200
    app.delete()
    response = client.get("/v1/info")
    # The key is still cached as valid: what refuses it is the check that its app exists.
    assert response.status_code == 403
    assert response.json() == {"code": "forbidden", "message": "The app no longer exists.", "status": 403}


def test_unknown_path_is_a_404_envelope(client):
    assert_error(client.get("/v1/nope"), 404, "not_found")
    assert_error(client.get("/v1/conversations/not-a-uuid/name"), 404, "not_found")


def test_wrong_method_is_a_405_envelope(client):
    response = client.post("/v1/info", {})
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response["Allow"]


def test_post_endpoints_are_csrf_exempt(client):
    # The client enforces CSRF checks like a browser-less Django client would; the Bearer API must not need a token.
    response = client.post("/v1/text-to-audio", {"text": "hi", "user": "alice"})
    assert response.status_code == 400


def test_info(client):
    response = client.get("/v1/info", {"user": "ignored"})
    assert response.status_code == 200
    assert response.json() == {
        "name": "Ops Helper", "description": "Answers ops questions", "tags": [], "mode": "chat",
        "author_name": "OpsAgent",
    }


def test_parameters_have_difys_keys_and_the_apps_values(app, client, settings):
    settings.UPLOAD_IMAGE_FILE_SIZE_LIMIT_MB = 7
    app.user_input_form = [{"text-input": {"label": "City", "variable": "city", "required": True, "default": ""}}]
    app.file_upload = {"image": {"enabled": True, "number_limits": 2}}
    app.suggested_questions_after_answer = True
    app.save()
    data = client.get("/v1/parameters").json()
    assert set(data) == {
        "opening_statement", "suggested_questions", "suggested_questions_after_answer", "speech_to_text",
        "text_to_speech", "retriever_resource", "annotation_reply", "more_like_this", "user_input_form",
        "sensitive_word_avoidance", "file_upload", "system_parameters",
    }
    assert data["opening_statement"] == "Hi!"
    assert data["suggested_questions"] == ["What is the load?"]
    assert data["suggested_questions_after_answer"] == {"enabled": True}
    assert data["speech_to_text"] == {"enabled": False}
    assert data["user_input_form"] == app.user_input_form
    assert data["file_upload"]["image"] == {
        "enabled": True, "number_limits": 2, "detail": "high", "transfer_methods": ["remote_url", "local_file"],
    }
    assert data["system_parameters"] == {
        "image_file_size_limit": 7, "video_file_size_limit": 100, "audio_file_size_limit": 50,
        "file_size_limit": 15, "workflow_file_upload_limit": 10,
    }


def test_parameters_defaults_for_a_bare_app():
    client = DifyClient(make_key(make_app()))
    data = client.get("/v1/parameters").json()
    assert data["opening_statement"] is None
    assert data["file_upload"] == {
        "image": {
            "enabled": False, "number_limits": 3, "detail": "high", "transfer_methods": ["remote_url", "local_file"],
        }
    }
    assert data["suggested_questions_after_answer"] == {"enabled": False}


def test_parameters_report_the_upload_settings_chat_messages_applies(settings):
    """Uploads configured in Dify's current shape (top-level keys), with a limit over the workflow limit: the report
    says on, capped, in both shapes, as chat-messages applies it."""
    settings.WORKFLOW_FILE_UPLOAD_LIMIT = 4
    app = make_app(file_upload={"enabled": True, "number_limits": 100, "allowed_file_types": ["document"]})
    data = DifyClient(make_key(app)).get("/v1/parameters").json()["file_upload"]
    assert (data["enabled"], data["number_limits"], data["allowed_file_types"]) == (True, 4, ["document"])
    assert (data["image"]["enabled"], data["image"]["number_limits"]) == (True, 4)


def test_meta_is_empty_for_chat_and_lists_enabled_tools_for_agent_chat(client):
    assert client.get("/v1/meta").json() == {"tool_icons": {}}
    ToolPolicy.objects.create(name="dns_lookup", enabled=False)
    ToolPolicy.objects.create(name="mcp_weather", source=ToolPolicy.Source.MCP, enabled=True)
    agent = DifyClient(make_key(make_app(mode="agent-chat")))
    icons = agent.get("/v1/meta").json()["tool_icons"]
    assert "mcp_weather" in icons and "current_time" in icons
    assert "dns_lookup" not in icons and "run_shell" not in icons  # disabled by policy / by default
    assert set(icons["current_time"]) == {"background", "content"}
    listed = DifyClient(make_key(make_app(mode="agent-chat", enabled_tools=["http_check", "dns_lookup"])))
    assert list(listed.get("/v1/meta").json()["tool_icons"]) == ["http_check"]


def test_site(client):
    data = client.get("/v1/site").json()
    assert set(data) == {
        "title", "chat_color_theme", "chat_color_theme_inverted", "icon_type", "icon", "icon_background", "icon_url",
        "description", "copyright", "privacy_policy", "input_placeholder", "custom_disclaimer", "default_language",
        "show_workflow_steps", "use_icon_as_answer_icon",
    }
    assert data["title"] == "Ops Helper" and data["description"] == "Answers ops questions"


def test_models_lists_active_chat_configs_without_keys(app, client, make_llm_config):
    default = make_llm_config(name="main", model_name="gpt-main", default=True)
    other = make_llm_config(name="other", model_name="gpt-other")
    make_llm_config(name="another", model_name="gpt-another")
    off = make_llm_config(name="off", is_active=False)
    make_llm_config(name="embed", is_embedding=True)
    response = client.get("/v1/models")
    data = response.json()["data"]
    assert [item["name"] for item in data] == ["main", "another", "other"]  # the default first, then by name
    assert data[0] == {"id": str(default.id), "name": "main", "provider": "openai", "model_name": "gpt-main",
                       "route": "gpt-main", "is_default": True,
                       # OpenAI's model list fields (the OpenAI-compatible surface): the same body serves both.
                       "object": "model", "created": int(default.created_at.timestamp()), "owned_by": "openai"}
    assert response.json()["object"] == "list"
    assert data[1]["is_default"] is False
    assert b"sk-test" not in response.content
    app.llm_config = other
    app.save()
    flags = {item["name"]: item["is_default"] for item in client.get("/v1/models").json()["data"]}
    assert flags == {"main": False, "another": False, "other": True}
    app.llm_config = off  # the app's own config, deactivated: the app falls back to the default config
    app.save()
    flags = {item["name"]: item["is_default"] for item in client.get("/v1/models").json()["data"]}
    assert flags == {"main": True, "another": False, "other": False}


def test_audio_endpoints_answer_not_supported(client):
    response = client.upload("/v1/audio-to-text", {"file": _audio(), "user": "alice"})
    assert_error(response, 400, "provider_not_support_speech_to_text", "Provider not support speech to text.")
    assert_error(client.upload("/v1/audio-to-text", {"user": "alice"}), 400, "no_audio_uploaded")
    assert_error(client.post("/v1/text-to-audio", {"text": "hi", "user": "alice"}), 400, "invalid_param",
                 "TTS is not enabled")


def test_json_endpoints_refuse_non_json_bodies(client):
    response = client.post_raw("/v1/text-to-audio", "text=hi", "application/x-www-form-urlencoded")
    assert_error(response, 415, "unsupported_media_type")
    for body in ("  ", "{not json", "[1, 2]"):
        response = client.post_raw("/v1/text-to-audio", body, "application/json")
        assert_error(response, 400, "bad_request", "Invalid JSON payload received or JSON payload is empty.")


def _audio():
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile("a.mp3", b"ID3fake", content_type="audio/mpeg")
