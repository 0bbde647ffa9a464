"""URLs of llmconfigs (mounted by opsagent.urls)."""

urlpatterns = []
