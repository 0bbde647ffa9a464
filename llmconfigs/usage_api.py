"""REST usage reports: GET /api/usage/ (JSON, or CSV with ?format=csv or /api/usage.csv) and the per-config
GET /api/llm-configs/{id}/stats/ (in llmconfigs.api), thin views over llmconfigs.usage."""
from __future__ import annotations

import csv
import dataclasses
import io
from datetime import UTC

import orjson
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from llmconfigs.models import CallKind, UsageRollup
from llmconfigs.usage import (
    GROUPS,
    UsageQuery,
    usage_csv_rows,
    usage_period,
    usage_report,
    usage_report_json,
)
from opsagent.common.permissions import ActionPermissions

USAGE_PERMISSION = "llmconfigs.view_usage"
_DATETIME_FORMATS = ["iso-8601", "%Y-%m-%d"]
# A spreadsheet runs a cell that starts with one of these as a formula: names come from admins and clients.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class UsageQuerySerializer(serializers.Serializer):
    """The query string of a usage report. `from` and `to` are ISO 8601 (a date is its midnight; without an offset:
    UTC) and are widened to bucket edges."""

    to = serializers.DateTimeField(required=False, input_formats=_DATETIME_FORMATS, default_timezone=UTC)
    bucket = serializers.ChoiceField(choices=UsageRollup.Size.values, default=UsageRollup.Size.HOUR)
    group_by = serializers.ChoiceField(choices=list(GROUPS), required=False)
    config = serializers.UUIDField(required=False, help_text="Only this LLM config's calls.")
    app = serializers.UUIDField(required=False, help_text="Only this agent app's calls.")
    key = serializers.CharField(required=False, max_length=36, help_text="Only this Dify API key's calls (its id).")
    kind = serializers.ChoiceField(choices=CallKind.values, required=False)
    # A choice rather than a BooleanField: DRF reads a boolean missing from a query string as false.
    series = serializers.ChoiceField(choices=["true", "false"], default="true",
                                     help_text="false: only the totals per group, without the series per bucket.")

    def get_fields(self):
        fields = super().get_fields()
        # "from" is a Python keyword: declared here rather than as a class attribute.
        fields["from"] = serializers.DateTimeField(required=False, input_formats=_DATETIME_FORMATS,
                                                   default_timezone=UTC)
        return fields

    def validate(self, attrs) -> UsageQuery:
        try:
            start, end = usage_period(start=attrs.get("from"), end=attrs.get("to"), bucket=attrs["bucket"])
        except ValueError as exc:
            raise serializers.ValidationError({"from": [str(exc)]}) from None
        filters = {"config_id": attrs.get("config"), "app_id": attrs.get("app"), "key_id": attrs.get("key"),
                   "kind": attrs.get("kind")}
        return UsageQuery(start=start, end=end, bucket=attrs["bucket"], group_by=attrs.get("group_by", ""),
                          filters=tuple((name, str(value)) for name, value in filters.items() if value),
                          series=attrs["series"] == "true")


def usage_query(request, *, config_id: str = "") -> UsageQuery:
    """The validated query of `request` (a DRF ValidationError otherwise); with `config_id`, the stats of that one
    config: its calls alone, not grouped."""
    serializer = UsageQuerySerializer(data=request.query_params)
    serializer.is_valid(raise_exception=True)
    query = serializer.validated_data
    if not config_id:
        return query
    filters = tuple(item for item in query.filters if item[0] != "config_id") + (("config_id", config_id),)
    return dataclasses.replace(query, group_by="", filters=filters)


class ReportJSON(bytes):
    """A report already written as compact JSON (usage_report_json)."""


def usage_response(request, query: UsageQuery) -> Response:
    """The report of `query` for the renderer the request accepted: JSON written directly from the numbers, or the
    report's dicts for the CSV."""
    if getattr(request, "accepted_renderer", None) is not None and request.accepted_renderer.format == "csv":
        return Response(usage_report(query=query))
    return Response(ReportJSON(usage_report_json(query=query)))


class UsageJSONRenderer(JSONRenderer):
    """A report as compact JSON, encoded by orjson, or as usage_report_json wrote it: a grouped report over a long
    period has tens of thousands of entries, which the standard library's encoder takes several times longer to
    write (docs/benchmarks.md)."""

    def render(self, data, accepted_media_type=None, renderer_context=None) -> bytes:
        indent = self.get_indent(accepted_media_type or "", renderer_context or {})
        if isinstance(data, ReportJSON):
            if not indent:
                return bytes(data)
            data = orjson.loads(bytes(data))
        if not isinstance(data, dict) or indent:
            return super().render(data, accepted_media_type, renderer_context)
        return orjson.dumps(data)


class UsageCSVRenderer(BaseRenderer):
    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        for row in usage_csv_rows(data):
            writer.writerow([f"'{cell}" if isinstance(cell, str) and cell.startswith(_FORMULA_START) else cell
                             for cell in row])
        return out.getvalue()


class UsageReportResponses:
    """Errors are JSON whatever format the report was asked in; a CSV report downloads as a file."""

    def handle_exception(self, exc):
        response = super().handle_exception(exc)
        self.request.accepted_renderer = JSONRenderer()
        self.request.accepted_media_type = JSONRenderer.media_type
        return response

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        if response.status_code == 200 and getattr(request, "accepted_renderer", None) is not None \
                and request.accepted_renderer.format == "csv":
            response["Content-Disposition"] = 'attachment; filename="usage.csv"'
        return response


USAGE_PARAMETERS = [
    OpenApiParameter("from", OpenApiTypes.DATETIME, description="Start (UTC unless an offset is given), widened "
                     "down to a bucket edge. Default: 1 day (hour buckets) or 30 days (day buckets) before `to`."),
    OpenApiParameter("to", OpenApiTypes.DATETIME, description="End (exclusive), widened up to a bucket edge. "
                     "Default: now. At most 31 days after `from` with hour buckets, 366 with day buckets."),
    OpenApiParameter("bucket", OpenApiTypes.STR, enum=UsageRollup.Size.values),
    OpenApiParameter("config", OpenApiTypes.UUID), OpenApiParameter("app", OpenApiTypes.UUID),
    OpenApiParameter("key", OpenApiTypes.STR), OpenApiParameter("kind", OpenApiTypes.STR, enum=CallKind.values),
    OpenApiParameter("series", OpenApiTypes.STR, enum=["true", "false"], description="`false`: only the totals "
                     "per group over the period (`series` is empty), much faster for many groups over a long period. "
                     "Default `true`."),
    OpenApiParameter("format", OpenApiTypes.STR, enum=["json", "csv"]),
]


class UsageView(UsageReportResponses, APIView):
    """Calls, success rate, error categories, latency and TTFT p50/p95, tokens and cost per bucket and group
    (needs llmconfigs.view_usage)."""

    permission_classes = [ActionPermissions]
    action_permissions = {"get": (USAGE_PERMISSION,)}
    renderer_classes = [UsageJSONRenderer, UsageCSVRenderer]

    @extend_schema(parameters=[*USAGE_PARAMETERS, OpenApiParameter("group_by", OpenApiTypes.STR, enum=list(GROUPS))],
                   responses={200: OpenApiTypes.OBJECT})
    def get(self, request, format=None):
        return usage_response(request, usage_query(request))
