"""URLs of agentcore (mounted by opsagent.urls)."""

urlpatterns = []
