"""The admin's Usage page: who may open it, what it shows (the API's numbers), the links to it, and that it is
safe (no key, no inline script or style)."""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.urls import reverse

from llmconfigs.tests.test_usage import record
from llmconfigs.usage import CallOrigin, usage_rollup
from tests.fixtures import client_for

pytestmark = pytest.mark.django_db
URL = "/admin/llmconfigs/providercall/"


@pytest.fixture
def calls(make_llm_config):
    fast = make_llm_config(name="fast", model_name="m-fast", input_price_per_million=Decimal("1"),
                           output_price_per_million=Decimal("2"))
    slow = make_llm_config(name="slow", model_name="m-slow")
    now = datetime.now(UTC) - timedelta(minutes=5)
    for i in range(3):
        record(fast, now - timedelta(hours=i), latency=120, ttft=40, prompt=1000, completion=100,
               origin=CallOrigin(app_id="a1", app_name="Ops"))
    record(fast, now, category="timeout", latency=30000, ttft=None, prompt=0, completion=0)
    record(slow, now - timedelta(days=2), latency=9000, ttft=3000)
    usage_rollup()
    record(slow, now, category="rate_limit", latency=50)
    return fast, slow


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_the_page_needs_view_usage_not_the_staff_flag(bare_staff_user, grant, calls):
    assert logged_in(bare_staff_user).get(URL).status_code == 403
    index = logged_in(bare_staff_user).get("/admin/")
    assert URL not in index.content.decode()
    reader = grant(bare_staff_user, "llmconfigs.view_usage")
    assert logged_in(reader).get(URL).status_code == 200
    assert URL in logged_in(reader).get("/admin/").content.decode()


def test_the_page_shows_the_api_numbers_charts_and_pool_health(staff_user, calls):
    fast, slow = calls
    page = logged_in(staff_user).get(URL, {"period": "7d", "group_by": "config"})
    assert page.status_code == 200
    html = page.content.decode()
    api = client_for(staff_user).get(reverse("usage"), {
        "from": page.context["start"].isoformat(), "to": page.context["end"].isoformat(), "group_by": "config"}).json()
    for total in api["totals"]:
        row = re.search(rf'<tr data-group="{total["group"]["id"]}">(.*?)</tr>', html, re.S).group(1)
        assert f'<td class="calls">{total["calls"]}</td>' in row
        assert f'<td class="errors">{total["errors"]}</td>' in row
        assert f'<td class="success-rate">{total["success_rate"]}</td>' in row
        assert f'<td class="tokens">{total["prompt_tokens"]} / {total["completion_tokens"]}</td>' in row
    fast_total = next(t for t in api["totals"] if t["group"]["name"] == "fast")
    assert (fast_total["calls"], fast_total["success_rate"], fast_total["cost"]) == (4, 0.75, {"USD": "0.0036000"})
    assert html.count('class="usage-chart"') == 5
    assert "Calls and errors" in html and "m-fast" in html
    # The slowest config leads the top list; both failing ones are listed; every active member's health is shown.
    slowest = re.search(r'<table id="usage-slowest">(.*?)</table>', html, re.S).group(1)
    assert slowest.index("fast") < slowest.index("slow")  # fast's p95 is its 30 s timeout
    failing = re.search(r'<table id="usage-failing">(.*?)</table>', html, re.S).group(1)
    assert "timeout: 1" in failing and "rate_limit: 1" in failing
    health = re.search(r'<table id="usage-health">(.*?)</table>', html, re.S).group(1)
    assert 'class="health-ok">ok' in health and "slow" in health
    for config in calls:
        assert config.api_key not in html


def test_narrowed_to_a_config_and_grouped_by_app(staff_user, calls):
    fast, _ = calls
    html = logged_in(staff_user).get(URL, {"config": str(fast.pk), "group_by": "app", "period": "24h"}
                                     ).content.decode()
    groups = dict(re.findall(r'<tr data-group="([^"]*)">\s*<td>([^<]*)</td>', html))
    assert groups == {"a1": "Ops", "": "(none)"}


def test_bad_filter_values_fall_back_to_the_defaults(staff_user, calls):
    page = logged_in(staff_user).get(URL, {"period": "forever", "group_by": "<script>", "config": "x"})
    assert page.status_code == 200
    assert page.context["period"] == "7d" and "<script>" not in page.content.decode()


def test_the_page_has_no_inline_script_or_style(staff_user, calls):
    page = logged_in(staff_user).get(URL)
    html = page.content.decode()
    assert "<script>" not in html and " style=" not in html and "<style" not in html
    assert "script-src 'self'" in page["Content-Security-Policy"]
