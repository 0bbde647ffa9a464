"""The checks every client value passes (opsagent.common.client_input): depth, text PostgreSQL can store, finite
numbers, object size bounds, and where the surfaces apply them (the DRF parser, the query string middleware)."""
from __future__ import annotations

import pytest

from opsagent.common.client_input import ClientInputError, ObjectBounds, json_loads, object_check

BOUNDS = ObjectBounds(max_bytes=100, max_keys=3, max_key_length=5, max_string_length=10, max_depth=2)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_as_deep_as_the_limit_is_accepted_one_more_level_is_not(settings):
    settings.JSON_MAX_DEPTH = 4
    assert json_loads(nested(4)) == [[[[]]]]
    with pytest.raises(ClientInputError, match="at most 4 levels"):
        json_loads(nested(5))
    with pytest.raises(ClientInputError, match="at most 4 levels"):
        json_loads('{"a": {"b": {"c": {"d": {}}}}}')


def test_json_too_deep_for_the_parser_itself_is_a_client_error():
    with pytest.raises(ClientInputError, match="nested too deeply"):
        json_loads(nested(100_000))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"user": "a\\u0000b"}', "user must not contain NUL characters"),
        ('{"inputs": {"k": ["ok", "\\u0000"]}}', "inputs.k[1] must not contain NUL"),
        ('{"inputs": {"k\\u0000": 1}}', "a key of inputs must not contain NUL"),
        ('{"query": "\\ud800"}', "query must be valid Unicode text"),
        ('{"\\udfff": 1}', "a key of the body must be valid Unicode"),
        ('{"inputs": {"x": NaN}}', "inputs.x must be a finite number"),
        ('{"t": 1e999}', "t must be a finite number"),
        ('["\\u0000"]', "[0] must not contain NUL"),
    ],
)
def test_text_no_column_can_store_and_non_finite_numbers_are_refused_naming_the_field(text, message):
    with pytest.raises(ClientInputError) as refused:
        json_loads(text)
    assert message in refused.value.message


def test_nul_is_stripped_only_from_the_named_top_level_fields():
    assert json_loads('{"query": "a\\u0000b", "n": 1}', strip_nul=("query",)) == {"query": "ab", "n": 1}
    with pytest.raises(ClientInputError, match="user must not contain NUL"):
        json_loads('{"query": "a", "user": "\\u0000"}', strip_nul=("query",))


def test_valid_unicode_passes_untouched():
    # A surrogate pair written as escapes is one character, not a lone surrogate.
    value = json_loads('{"text": "é 中文 \\ud83d\\ude00", "list": [1, 2.5, null, true]}')
    assert value == {"text": "é 中文 😀", "list": [1, 2.5, None, True]}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": "x" * 11}, "inputs.a must be at most 10 characters"),
        ({"a": ["x" * 11]}, "inputs.a[0] must be at most 10"),
        ({"a": 1, "b": 2, "c": 3, "d": 4}, "at most 3 keys"),
        ({"a": {"b": 1, "c": 2, "d": 3}}, "at most 3 keys"),
        ({"toolong": 1}, "keys must be at most 5 characters"),
        ({"a": {"b": {}}}, "nested at most 2 levels"),
        ({"a": "中" * 10, "b": "中" * 10, "c": "中" * 10}, "at most 100 bytes"),
    ],
)
def test_object_bounds(value, message):
    with pytest.raises(ClientInputError) as refused:
        object_check(value, field="inputs", bounds=BOUNDS)
    assert message in refused.value.message
    assert refused.value.field == "inputs"


def test_an_object_within_every_bound_passes():
    object_check({"a": "x" * 10, "b": {"c": 1}}, field="inputs", bounds=BOUNDS)


def test_rest_bodies_go_through_the_bounded_parser(admin_client):
    response = admin_client.post("/api/sessions/", data=nested(100_000), content_type="application/json")
    assert response.status_code == 400 and "nested too deeply" in response.json()["detail"]
    response = admin_client.post("/api/sessions/", data='{"name": "\\ud800"}', content_type="application/json")
    assert response.status_code == 400 and "valid Unicode" in response.json()["detail"]


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/api/llm-configs/?search=a%00b", {"search": ["Must not contain NUL characters."]}),
        ("/api/audit-logs/?target_id=%00", {"target_id": ["Must not contain NUL characters."]}),
        ("/api/tools/a%00b/", {"path": ["Must not contain NUL characters."]}),
        ("/api/llm-configs/?a%00=1", {"query string": ["Must not contain NUL characters."]}),
    ],
)
def test_nul_in_a_rest_path_or_query_string_is_a_field_error(admin_client, url, body):
    response = admin_client.get(url)
    assert (response.status_code, response.json()) == (400, body)


def test_nul_in_a_v1_query_string_is_a_dify_refusal(client):
    response = client.get("/v1/conversations?user=%00")
    assert response.json() == {"code": "invalid_param", "message": "user must not contain NUL characters",
                               "status": 400}
