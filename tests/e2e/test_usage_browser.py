"""The admin's Usage page in a real headless Chromium against daphne: reached from the admin index, its five SVG
charts drawn, no CSP violation or script error, nothing wider than a 1280 px window, its totals those of the API.
USAGE_SCREENSHOTS=1 keeps a full-page screenshot under var/browser/."""
from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from llmconfigs.usage import CallOrigin, CallRecord, provider_calls_record, usage_rollup
from tests.e2e.test_chat_browser import PASSWORD, Steps, _login

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _history(configs) -> None:
    """Two weeks of calls on three models and two apps, the last hours not rolled up yet."""
    now = datetime.now(UTC)
    calls = []
    for hour in range(14 * 24, 0, -3):
        for n, config in enumerate(configs):
            failed = (hour + n) % 11 == 0
            calls.append(CallRecord(config=config, kind="chat", started=(now - timedelta(hours=hour)).timestamp(),
                                    latency_ms=300.0 * (n + 1) + hour % 200, ttft_ms=None if failed else 80.0 * (n + 1),
                                    prompt_tokens=0 if failed else 800 + 10 * n, completion_tokens=0 if failed else 120,
                                    error_category="timeout" if failed and n else ("rate_limit" if failed else "")))
    provider_calls_record(calls=calls[: len(calls) // 2], origin=CallOrigin(app_id="a-ops", app_name="ops"))
    provider_calls_record(calls=calls[len(calls) // 2:], origin=CallOrigin(app_id="a-chat", app_name="chat"))
    usage_rollup()
    provider_calls_record(calls=[CallRecord(config=configs[0], kind="title", latency_ms=90.0, prompt_tokens=30)],
                          origin=CallOrigin(app_id="a-chat", app_name="chat"))


def test_the_usage_page_in_the_browser(chromium, daphne_server, django_user_model, make_llm_config):
    django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    configs = [make_llm_config(name=f"gpt-{n}", model_name=f"model-{n}", route="main",
                               input_price_per_million=Decimal("1.5"), output_price_per_million=Decimal("6"))
               for n in range(3)]
    _history(configs)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        steps = Steps(page, "usage")
        with steps.step("login"):
            _login(page, daphne_server.base_url)
        with steps.step("from-the-index"):
            page.goto(f"{daphne_server.base_url}/admin/")
            page.click("a[href='/admin/llmconfigs/providercall/']")
            page.wait_for_selector("svg.usage-chart")
        with steps.step("charts-and-tables"):
            assert page.locator("svg.usage-chart").count() == 5
            assert page.locator("svg.usage-chart rect").count() > 100
            assert page.locator("#usage-health tbody tr").count() == 3
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280
            if os.environ.get("USAGE_SCREENSHOTS"):
                steps.shot("1280px")
        with steps.step("group-by-app"):
            page.select_option("#id_period", "30d")
            page.select_option("#id_group_by", "app")
            page.click(".usage-filters button")
            page.wait_for_selector("#usage-totals tr[data-group='a-ops']")
            shown = int(page.inner_text("#usage-totals tr[data-group='a-chat'] td.calls"))
            api = page.request.get(f"{daphne_server.base_url}{page.get_attribute('.usage-period a', 'href')}").json()
            assert shown == next(t["calls"] for t in api["totals"] if t["group"]["id"] == "a-chat")
        assert steps.errors == []
