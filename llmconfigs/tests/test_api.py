"""REST API /api/llm-configs/ and /api/audit-logs/: permissions, CRUD through the services, errors, no N+1."""
import json
import socket

import pytest

from llmconfigs.models import AuditLog, LLMConfig
from tests.fakes.upstream import Reply
from tests.stored_secrets import assert_stored_encrypted

pytestmark = pytest.mark.django_db

URL = "/api/llm-configs/"
KEY = "sk-api-test-key-0123456789abcdef"


def _body(fake_upstream, **fields):
    body = {"name": "new-config", "provider": "openai", "model_name": "gpt-test", "api_key": KEY,
            "base_url": fake_upstream.base_url}
    body.update(fields)
    return body


# ----- permissions -----


def test_anonymous_gets_401_json(api_client):
    response = api_client.get(URL)
    assert response.status_code == 401
    assert response["Content-Type"].startswith("application/json")
    assert "detail" in response.json()


def test_plain_user_reads_masked_but_cannot_write(user_client, make_llm_config, fake_upstream):
    config = make_llm_config(api_key=KEY)
    listed = user_client.get(URL).json()["results"]
    assert [c["api_key_mask"] for c in listed] == ["sk-…cdef"]
    assert user_client.get(f"{URL}{config.pk}/").status_code == 200
    assert user_client.post(URL, _body(fake_upstream), format="json").status_code == 403
    assert user_client.patch(f"{URL}{config.pk}/", {"temperature": 0.1}, format="json").status_code == 403
    assert user_client.delete(f"{URL}{config.pk}/").status_code == 403
    assert user_client.post(f"{URL}{config.pk}/set-default/").status_code == 403
    assert user_client.post(f"{URL}{config.pk}/test/").status_code == 403
    assert user_client.get("/api/audit-logs/").status_code == 403


def test_token_authentication_works(api_client, staff_user):
    from rest_framework.authtoken.models import Token

    token = Token.objects.create(user=staff_user)
    response = api_client.get(URL, HTTP_AUTHORIZATION=f"Token {token.key}")
    assert response.status_code == 200


# ----- CRUD -----


def test_create_returns_masked_config_and_stores_encrypted_key(staff_client, fake_upstream, staff_user):
    response = staff_client.post(URL, _body(fake_upstream, temperature=0.4), format="json", REMOTE_ADDR="10.9.8.7")

    assert response.status_code == 201, response.content
    data = response.json()
    assert "api_key" not in data
    assert data["api_key_mask"] == "sk-…cdef"
    assert data["temperature"] == 0.4 and data["is_default"] is False
    config = LLMConfig.objects.get(pk=data["id"])
    assert config.api_key == KEY
    assert_stored_encrypted(config, "api_key", KEY, secrets=(KEY, KEY[-12:]))
    audit = AuditLog.objects.get(action="create")
    assert (audit.actor, audit.source, audit.ip_address) == (staff_user, "api", "10.9.8.7")


def test_update_blank_key_keeps_it_and_partial_update_changes_one_field(staff_client, make_llm_config):
    config = make_llm_config(api_key=KEY)
    response = staff_client.patch(f"{URL}{config.pk}/", {"api_key": "", "max_tokens": 256}, format="json")
    assert response.status_code == 200, response.content
    fresh = LLMConfig.objects.get(pk=config.pk)
    assert (fresh.api_key, fresh.max_tokens) == (KEY, 256)

    full = {"name": config.name, "provider": "deepseek", "model_name": "deepseek-chat", "base_url": config.base_url}
    response = staff_client.put(f"{URL}{config.pk}/", full, format="json")
    assert response.status_code == 200, response.content
    assert LLMConfig.objects.get(pk=config.pk).provider == "deepseek"
    assert LLMConfig.objects.get(pk=config.pk).api_key == KEY


def test_delete_and_refusal_to_delete_the_default(staff_client, make_llm_config):
    default = make_llm_config(default=True)
    other = make_llm_config()
    refused = staff_client.delete(f"{URL}{default.pk}/")
    assert refused.status_code == 409
    assert "default" in refused.json()["detail"]
    assert staff_client.delete(f"{URL}{other.pk}/").status_code == 204
    assert list(LLMConfig.objects.values_list("pk", flat=True)) == [default.pk]


def test_retrieve_unknown_and_malformed_ids_are_404(staff_client):
    assert staff_client.get(f"{URL}00000000-0000-0000-0000-000000000000/").status_code == 404
    assert staff_client.get(f"{URL}not-a-uuid/").status_code == 404


# ----- validation: per field, never a 500 -----


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"provider": "zhipu", "top_p": 1.0}, "top_p"),
        ({"provider": "zhipu", "temperature": 0.0}, "temperature"),
        ({"provider": "moonshot", "temperature": 1.5}, "temperature"),
        ({"provider": "deepseek", "is_embedding": True}, "is_embedding"),
        ({"temperature": 5}, "temperature"),
        ({"provider": "skynet"}, "provider"),
        ({"base_url": "ftp://example.com"}, "base_url"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"name": ""}, "name"),
        ({"temperature": "warm"}, "temperature"),
        ({"extra_config": [1, 2]}, "extra_config"),
        ({"api_key": "", "is_active": True}, "api_key"),
    ],
)
def test_invalid_input_is_a_400_naming_the_field(staff_client, fake_upstream, fields, bad_field):
    response = staff_client.post(URL, _body(fake_upstream, **fields), format="json")
    assert response.status_code == 400, response.content
    assert bad_field in response.json()
    assert not LLMConfig.objects.exists()


def test_duplicate_name_is_a_field_error(staff_client, make_llm_config, fake_upstream):
    make_llm_config(name="taken")
    response = staff_client.post(URL, _body(fake_upstream, name="taken"), format="json")
    assert response.status_code == 400
    assert "name" in response.json()


def test_a_name_taken_concurrently_is_a_409_conflict(staff_client, make_llm_config, fake_upstream, monkeypatch):
    from rest_framework.validators import UniqueValidator

    # The other request's row commits between this request's checks and its insert: the unique index refuses it.
    make_llm_config(name="taken")
    monkeypatch.setattr(UniqueValidator, "__call__", lambda self, value, serializer_field: None)
    monkeypatch.setattr(LLMConfig, "validate_unique", lambda self, exclude=None: None)
    response = staff_client.post(URL, _body(fake_upstream, name="taken"), format="json")
    assert response.status_code == 409, response.content
    assert response.json()["code"] == "config_conflict"
    assert LLMConfig.objects.filter(name="taken").count() == 1


def test_deactivating_the_default_is_refused(staff_client, make_llm_config):
    default = make_llm_config(default=True)
    assert staff_client.post(f"{URL}{default.pk}/deactivate/").status_code == 409
    assert staff_client.patch(f"{URL}{default.pk}/", {"is_active": False}, format="json").status_code == 400
    assert LLMConfig.objects.get(pk=default.pk).is_active


def test_is_default_is_read_only_in_the_body(staff_client, make_llm_config):
    config = make_llm_config()
    staff_client.patch(f"{URL}{config.pk}/", {"is_default": True}, format="json")
    assert not LLMConfig.objects.get(pk=config.pk).is_default


# ----- list: filters, pagination, query count -----


def test_list_filters_and_search(user_client, make_llm_config):
    make_llm_config(name="alpha-chat", provider="deepseek")
    make_llm_config(name="beta-embed", is_embedding=True)
    make_llm_config(name="gamma-off", is_active=False, model_name="special-model")

    def names(query):
        return [c["name"] for c in user_client.get(URL + query).json()["results"]]

    assert names("?is_embedding=true") == ["beta-embed"]
    assert names("?is_active=false") == ["gamma-off"]
    assert names("?provider=deepseek") == ["alpha-chat"]
    assert names("?search=special") == ["gamma-off"]
    assert user_client.get(URL + "?is_active=maybe").status_code == 400
    assert user_client.get(URL + "?provider=skynet").status_code == 400


def test_page_size_is_honoured_up_to_1000(user_client, make_llm_config):
    for _ in range(3):
        make_llm_config()
    page = user_client.get(URL + "?page_size=2").json()
    assert page["count"] == 3 and len(page["results"]) == 2 and page["next"]
    assert len(user_client.get(URL + "?page_size=5000").json()["results"]) == 3


@pytest.mark.parametrize("count", [5, 50])
def test_list_query_count_does_not_grow_with_configs(user_client, count, django_assert_num_queries):
    from llmconfigs.models import LLMConfig as Model

    Model.objects.bulk_create(
        Model(name=f"bulk-{i}", provider="openai", model_name="m", api_key=f"sk-bulk-{i:04d}-abcdefgh",
              api_key_mask="sk-…efgh")
        for i in range(count)
    )
    with django_assert_num_queries(2):  # one COUNT, one SELECT, for 5 as for 50: no per-row query
        response = user_client.get(URL + "?page_size=1000")
    assert len(response.json()["results"]) == count


def test_list_never_decrypts_keys(user_client, make_llm_config, monkeypatch):
    make_llm_config()
    field = LLMConfig._meta.get_field("api_key")

    def fail(*args, **kwargs):
        raise AssertionError("the list decrypted a key")

    monkeypatch.setattr(field, "_load", fail)
    assert user_client.get(URL).status_code == 200


# ----- actions -----


def test_default_set_default_and_kind(staff_client, make_llm_config):
    assert staff_client.get(URL + "default/").status_code == 404
    first = make_llm_config(default=True)
    second = make_llm_config()
    embedding = make_llm_config(is_embedding=True, default=True)
    assert staff_client.get(URL + "default/").json()["id"] == str(first.pk)
    assert staff_client.get(URL + "default/?is_embedding=true").json()["id"] == str(embedding.pk)

    response = staff_client.post(f"{URL}{second.pk}/set-default/")
    assert response.status_code == 200 and response.json()["is_default"] is True
    assert staff_client.get(URL + "default/").json()["id"] == str(second.pk)
    assert AuditLog.objects.filter(action="set_default", target_id=str(second.pk), source="api").exists()


def test_set_default_of_an_inactive_config_is_a_400(staff_client, make_llm_config):
    config = make_llm_config(is_active=False)
    response = staff_client.post(f"{URL}{config.pk}/set-default/")
    assert response.status_code == 400
    assert "inactive" in response.json()["detail"]


def test_activate_and_deactivate(staff_client, make_llm_config):
    config = make_llm_config()
    assert staff_client.post(f"{URL}{config.pk}/deactivate/").json()["is_active"] is False
    assert staff_client.post(f"{URL}{config.pk}/activate/").json()["is_active"] is True
    template = make_llm_config(api_key="", is_active=False)
    refused = staff_client.post(f"{URL}{template.pk}/activate/")
    assert refused.status_code == 400 and "api_key" in refused.json()


def test_connection_test_endpoint_ok_and_failures(staff_client, make_llm_config, fake_upstream):
    config = make_llm_config(api_key=KEY)
    fake_upstream.script(Reply(text="pong"))
    ok = staff_client.post(f"{URL}{config.pk}/test/").json()
    assert ok["ok"] is True and ok["latency_ms"] > 0

    fake_upstream.script(Reply(status=401, error_message="Incorrect API key provided: {api_key}"))
    failed = staff_client.post(f"{URL}{config.pk}/test/")
    assert failed.status_code == 200
    assert failed.json()["category"] == "auth" and failed.json()["status_code"] == 401
    assert KEY not in failed.content.decode()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # A new host takes the key again (test_key_exfiltration.py covers the refusal).
    moved = staff_client.patch(f"{URL}{config.pk}/", {"base_url": f"http://127.0.0.1:{port}/v1", "api_key": KEY},
                               format="json")
    assert moved.status_code == 200
    assert staff_client.post(f"{URL}{config.pk}/test/").json()["category"] == "unreachable"


def test_providers_lists_the_registry(user_client):
    providers = {p["key"]: p for p in user_client.get(URL + "providers/").json()}
    assert {"openai", "deepseek", "tongyi", "ollama", "vllm", "doubao", "zhipu", "moonshot", "baidu",
            "openai_compatible"} == set(providers)
    assert providers["zhipu"]["top_p_range"] == "(0, 1)"
    assert providers["moonshot"]["supports_embeddings"] is False


# ----- the key never leaves -----


def test_no_response_ever_contains_the_key(staff_client, make_llm_config, fake_upstream):
    response = staff_client.post(URL, _body(fake_upstream), format="json")
    config_id = response.json()["id"]
    fake_upstream.script(Reply(status=401, error_message="bad key {api_key}"))
    bodies = [
        response,
        staff_client.get(URL),
        staff_client.get(f"{URL}{config_id}/"),
        staff_client.patch(f"{URL}{config_id}/", {"temperature": 9}, format="json"),
        staff_client.patch(f"{URL}{config_id}/", {"description": "x"}, format="json"),
        staff_client.post(f"{URL}{config_id}/set-default/"),
        staff_client.get(URL + "default/"),
        staff_client.post(f"{URL}{config_id}/test/"),
        staff_client.get("/api/audit-logs/"),
        staff_client.get("/api/schema/"),
    ]
    for body in bodies:
        assert KEY not in body.content.decode(), body.request["PATH_INFO"]
        assert KEY[5:20] not in body.content.decode()


# ----- audit log -----


def test_audit_log_lists_writes_with_filters(staff_client, make_llm_config, fake_upstream):
    config_id = staff_client.post(URL, _body(fake_upstream), format="json").json()["id"]
    staff_client.patch(f"{URL}{config_id}/", {"temperature": 0.2}, format="json")
    staff_client.post(f"{URL}{config_id}/test/")
    other = make_llm_config()

    rows = staff_client.get(f"/api/audit-logs/?target_id={config_id}").json()["results"]
    assert [r["action"] for r in rows] == ["test_connection", "update", "create"]
    assert rows[1]["changes"]["temperature"]["new"] == 0.2
    assert rows[2]["changes"]["api_key"] == {"new": "sk-…cdef"}
    updates = staff_client.get("/api/audit-logs/?action=update").json()["results"]
    assert [r["target_id"] for r in updates] == [config_id]
    by_type = staff_client.get("/api/audit-logs/?target_type=llmconfigs.LLMConfig").json()["count"]
    assert by_type == 4
    assert str(other.pk) not in json.dumps(rows)


def test_list_rows_are_rendered_exactly_like_retrieve(user_client, make_llm_config):
    from decimal import Decimal

    from llmconfigs.services import llm_config_record_usage

    config = make_llm_config(
        input_price_per_million=Decimal("0.15"), max_tokens=99, extra_config={"extra_body": {"a": 1}}
    )
    llm_config_record_usage(config_id=config.pk, prompt_tokens=7, completion_tokens=3, cost=Decimal("0.0000021"))
    (listed,) = user_client.get(URL).json()["results"]
    assert listed == user_client.get(f"{URL}{config.pk}/").json()
    assert listed["last_used_at"].endswith("Z") and listed["cost_total"] == "0.0000021"
