"""The shared wire helpers: usage with prices as plain decimal strings, compact raw-UTF-8 JSON, request parsing with
Dify's errors, and the never-a-traceback guarantee of every /v1 view."""
from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from difyapi import selectors
from difyapi.encoding import dify_json
from difyapi.errors import DifyError
from difyapi.presenters import usage_to_dify
from difyapi.tests.factories import DifyClient, assert_error, make_app, make_key
from difyapi.validation import int_from, limit_from, optional_user_from, parse_json_body, user_from, uuid_from
from llmconfigs.pricing import usage_cost


def test_usage_prices_are_plain_decimal_strings():
    cost = usage_cost(input_price_per_million=Decimal("1"), output_price_per_million=Decimal("2"), currency="USD",
                      prompt_tokens=1033, completion_tokens=128)
    usage = usage_to_dify(prompt_tokens=1033, completion_tokens=128, cost=cost, latency=0.5, time_to_first_token=0.1,
                          time_to_generate=0.4)
    assert usage["prompt_price"] == "0.0010330" and usage["completion_price"] == "0.0002560"
    assert usage["total_price"] == "0.0012890" and usage["total_tokens"] == 1161
    assert usage["prompt_unit_price"] == "1" and usage["prompt_price_unit"] == "0.000001"
    free = usage_to_dify(prompt_tokens=0, completion_tokens=0, cost=usage_cost(
        input_price_per_million=None, output_price_per_million=None, currency="", prompt_tokens=0,
        completion_tokens=0))
    assert free["total_price"] == "0.0000000" and "E" not in free["prompt_price"]
    assert free["currency"] == "USD" and free["latency"] == 0.0 and free["time_to_first_token"] is None
    assert all(isinstance(usage[key], str) for key in usage if "price" in key)


def test_json_is_compact_raw_utf8():
    assert dify_json({"a": "磁盘", "b": [1, 2]}) == '{"a":"磁盘","b":[1,2]}'.encode()


def test_parsing_helpers():
    assert user_from(42) == "42"
    assert optional_user_from(None) == "DEFAULT-USER" and optional_user_from("") == "DEFAULT-USER"
    for bad in (None, "", "   ", True, [], {}):
        with pytest.raises(DifyError, match="Arg user must be provided."):
            user_from(bad)
    assert uuid_from("", field="x") is None
    value = uuid.uuid4()
    assert uuid_from(str(value), field="x") == value
    with pytest.raises(DifyError, match="x must be a valid UUID"):
        uuid_from(5, field="x")
    assert limit_from(None) == 20 and limit_from("100") == 100
    for bad in ("0", "101", "1.5", "abc", True):
        with pytest.raises(DifyError) as info:
            limit_from(bad)
        assert info.value.code == "invalid_param" and "limit" in info.value.message
    assert int_from("7", field="page", default=1, minimum=1) == 7
    assert parse_json_body(b'{"a": 1}', "application/json; charset=utf-8") == {"a": 1}
    assert parse_json_body(b"{}", "application/vnd.api+json") == {}
    with pytest.raises(DifyError) as info:
        parse_json_body(b"{}", "text/plain")
    assert info.value.status == 415


@pytest.mark.django_db
def test_an_unexpected_failure_is_a_500_envelope_without_a_traceback(monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("database exploded with sk-secret-value")

    monkeypatch.setattr(selectors, "app_models", broken)
    response = DifyClient(make_key(make_app())).get("/v1/models")
    data = assert_error(response, 500, "internal_server_error")
    assert "sk-secret" not in data["message"] and "Traceback" not in response.content.decode()
