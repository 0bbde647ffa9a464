"""URLs of llmconfigs (mounted under /api/ by opsagent.urls)."""
from rest_framework.routers import SimpleRouter

from llmconfigs.api import AuditLogViewSet, LLMConfigViewSet

router = SimpleRouter()
router.register("llm-configs", LLMConfigViewSet, basename="llm-config")
router.register("audit-logs", AuditLogViewSet, basename="audit-log")

urlpatterns = router.urls
