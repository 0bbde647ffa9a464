"""The admin's "Usage" page (llmconfigs.view_usage): charts and tables of the usage reports (llmconfigs.usage, the
same numbers as GET /api/usage/) and the current health of every pool member. Registered by llmconfigs.admin."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.template.response import TemplateResponse
from django.urls import reverse

from llmconfigs.charts import bar_chart, column_chart
from llmconfigs.models import LLMConfig, ProviderCall, UsageRollup
from llmconfigs.routing import cooling_until, health_of
from llmconfigs.usage import UsageQuery, bucket_length, usage_period, usage_report

USAGE_PERMISSION = "llmconfigs.view_usage"
PERIODS = {
    "24h": ("Last 24 hours", timedelta(days=1), UsageRollup.Size.HOUR),
    "7d": ("Last 7 days", timedelta(days=7), UsageRollup.Size.HOUR),
    "30d": ("Last 30 days", timedelta(days=30), UsageRollup.Size.DAY),
    "90d": ("Last 90 days", timedelta(days=90), UsageRollup.Size.DAY),
    "365d": ("Last 365 days", timedelta(days=365), UsageRollup.Size.DAY),
}
GROUP_LABELS = {"model": "model", "config": "LLM config", "route": "route (pool)", "app": "app", "key": "API key",
                "user": "user"}
TOP = 6  # groups drawn in their own colour; the rest are "other"
TOP_LIST = 5


def usage_page_url(**filters: str) -> str:
    """The usage page narrowed to one config, app or key (config=<id>, app=<id>, key=<id>)."""
    return reverse("admin:llmconfigs_providercall_changelist") + ("?" + urlencode(filters) if filters else "")


class UsageFilterForm(forms.Form):
    period = forms.ChoiceField(choices=[(k, v[0]) for k, v in PERIODS.items()], initial="7d", required=False)
    group_by = forms.ChoiceField(choices=list(GROUP_LABELS.items()), initial="model", required=False,
                                 label="Group by")
    config = forms.UUIDField(required=False, widget=forms.HiddenInput)
    app = forms.UUIDField(required=False, widget=forms.HiddenInput)
    key = forms.CharField(required=False, max_length=36, widget=forms.HiddenInput)


class UsageAdmin(admin.ModelAdmin):
    """Nothing to add, change or delete: the changelist is the usage page."""

    def has_module_permission(self, request) -> bool:
        return request.user.has_perm(USAGE_PERMISSION)

    def has_view_permission(self, request, obj=None) -> bool:
        return request.user.has_perm(USAGE_PERMISSION)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def get_urls(self):
        return [url for url in super().get_urls() if url.name == "llmconfigs_providercall_changelist"]

    def changelist_view(self, request, extra_context=None):
        if not self.has_view_permission(request):
            raise PermissionDenied
        form = UsageFilterForm(request.GET or None)
        values = form.cleaned_data if form.is_valid() else {}
        context = {
            **self.admin_site.each_context(request), "opts": self.opts, "title": "Usage", "form": form,
            **usage_page(period=values.get("period") or "7d", group_by=values.get("group_by") or "model",
                         filters={"config_id": values.get("config"), "app_id": values.get("app"),
                                  "key_id": values.get("key")}),
        }
        return TemplateResponse(request, "admin/llmconfigs/usage.html", context)


def _query(start: datetime, end: datetime, bucket: str, group_by: str, filters: dict[str, Any], *,
           series: bool = True) -> UsageQuery:
    return UsageQuery(start=start, end=end, bucket=bucket, group_by=group_by,
                      filters=tuple((name, str(value)) for name, value in filters.items() if value), series=series)


def _buckets(start: datetime, end: datetime, bucket: str) -> list[datetime]:
    step, moments = bucket_length(bucket), []
    while start < end:
        moments.append(start)
        start += step
    return moments


def _label(moment: datetime, bucket: str) -> str:
    return moment.strftime("%m-%d %H:00" if bucket == UsageRollup.Size.HOUR else "%Y-%m-%d")


def _by_group_per_bucket(report: dict[str, Any], buckets: list[datetime], value) -> list[tuple[str, list[float]]]:
    """Series for a stacked chart: the TOP groups by calls, then "other"."""
    names = {t["group"]["id"]: t["group"]["name"] or "(none)" for t in report["totals"]}
    shown = [t["group"]["id"] for t in report["totals"][:TOP]]
    index = {moment.isoformat(): i for i, moment in enumerate(buckets)}
    series = {group: [0.0] * len(buckets) for group in [*shown, "other"]}
    for row in report["series"]:
        group = row["group"]["id"] if row["group"]["id"] in shown else "other"
        if row["bucket"] in index:
            series[group][index[row["bucket"]]] += value(row)
    return [(names.get(group, "other"), values) for group, values in series.items()
            if group != "other" or any(values)]


def usage_page(*, period: str, group_by: str, filters: dict[str, Any]) -> dict[str, Any]:
    """What the usage page shows for `period` (a PERIODS key) grouped by `group_by`, narrowed by `filters`."""
    _, length, bucket = PERIODS[period]
    now = datetime.now(UTC)
    start, end = usage_period(start=now - length, end=now, bucket=bucket)
    over_time = usage_report(query=_query(start, end, bucket, "", filters))
    by_model = usage_report(query=_query(start, end, bucket, "model", filters, series=False))
    by_config = usage_report(query=_query(start, end, bucket, "config", filters, series=False))
    day_start, day_end = usage_period(start=now - length, end=now, bucket=UsageRollup.Size.DAY)
    days = _buckets(day_start, day_end, UsageRollup.Size.DAY)
    by_group = usage_report(query=_query(start, end, bucket, group_by, filters, series=False))
    by_group_daily = usage_report(query=_query(day_start, day_end, UsageRollup.Size.DAY, group_by, filters))

    buckets = _buckets(start, end, bucket)
    index = {moment.isoformat(): i for i, moment in enumerate(buckets)}
    ok, failed = [0.0] * len(buckets), [0.0] * len(buckets)
    for row in over_time["series"]:
        ok[index[row["bucket"]]] = row["calls"] - row["errors"]
        failed[index[row["bucket"]]] = row["errors"]
    models = by_model["totals"][:12]
    currencies = sorted({c for t in by_group["totals"] for c in t["cost"]})
    currency = currencies[0] if len(currencies) == 1 else ("USD" if "USD" in currencies else
                                                          (currencies[0] if currencies else "USD"))
    with_calls = [t for t in by_config["totals"] if t["calls"]]
    return {
        "period": period, "group_by": group_by, "group_label": GROUP_LABELS[group_by], "start": start, "end": end,
        "bucket": bucket, "filters": {k: v for k, v in filters.items() if v},
        "api_url": reverse("usage") + "?" + urlencode({"from": start.isoformat(), "to": end.isoformat(),
                                                       "bucket": bucket, "group_by": group_by,
                                                       **{k.removesuffix("_id"): str(v)
                                                          for k, v in filters.items() if v}}),
        "calls_chart": column_chart(title="Calls and errors", labels=[_label(m, bucket) for m in buckets],
                                    series=[("succeeded", ok), ("failed", failed)]),
        "latency_chart": bar_chart(title="Latency per model", unit=" ms", names=["p50", "p95"], rows=[
            (t["group"]["name"] or "(none)", [t["latency_ms"]["p50"], t["latency_ms"]["p95"]]) for t in models]),
        "ttft_chart": bar_chart(title="Time to first token per model", unit=" ms", names=["p50", "p95"], rows=[
            (t["group"]["name"] or "(none)", [t["ttft_ms"]["p50"], t["ttft_ms"]["p95"]]) for t in models]),
        "tokens_chart": column_chart(
            title=f"Tokens per {GROUP_LABELS[group_by]} per day", labels=[_label(d, "day") for d in days],
            series=_by_group_per_bucket(by_group_daily, days, lambda row: row["total_tokens"])),
        "cost_chart": column_chart(
            title=f"Cost ({currency}) per {GROUP_LABELS[group_by]} per day", labels=[_label(d, "day") for d in days],
            series=_by_group_per_bucket(by_group_daily, days, lambda row: float(row["cost"].get(currency, 0)))),
        "currency": currency, "other_currencies": [c for c in currencies if c != currency],
        "totals": by_group["totals"],
        "slowest": sorted(with_calls, key=lambda t: -(t["latency_ms"]["p95"] or 0))[:TOP_LIST],
        "failing": sorted([t for t in with_calls if t["errors"]],
                          key=lambda t: (-t["errors"], t["success_rate"]))[:TOP_LIST],
        "health": pool_health(),
    }


def pool_health() -> list[dict[str, Any]]:
    """Every active chat config by pool (route), with its health now."""
    members = list(LLMConfig.objects.filter(is_active=True, is_embedding=False)
                   .only("id", "name", "model_name", "route", "priority", "weight", "auth_failed_at", "last_error")
                   .order_by("route", "model_name", "-priority", "name"))
    cooling = cooling_until([m.pk for m in members])
    return [{"route": m.route_name, "config": m, "health": health_of(m, cooling=cooling)}
            for m in sorted(members, key=lambda m: (m.route_name, -m.priority, m.name))]


admin.site.register(ProviderCall, UsageAdmin)
