"""URLs of llmconfigs (mounted under /api/ by opsagent.urls)."""
from django.urls import path
from rest_framework.routers import SimpleRouter

from llmconfigs.api import AuditLogViewSet, LLMConfigViewSet
from llmconfigs.usage_api import UsageView

router = SimpleRouter()
router.register("llm-configs", LLMConfigViewSet, basename="llm-config")
router.register("audit-logs", AuditLogViewSet, basename="audit-log")

urlpatterns = [
    path("usage/", UsageView.as_view(), name="usage"),
    path("usage.csv", UsageView.as_view(), {"format": "csv"}, name="usage-csv"),
    *router.urls,
]
