"""URLs of difyapi (mounted by opsagent.urls)."""

urlpatterns = []
