"""URLs of agentcore's REST API (mounted at /api/ by opsagent.urls)."""
from django.urls import path
from rest_framework.routers import SimpleRouter

from agentcore.api import views

router = SimpleRouter()
router.register("sessions", views.SessionViewSet, basename="agent-session")
router.register("tools", views.ToolViewSet, basename="agent-tool")
router.register("approvals", views.ApprovalViewSet, basename="agent-approval")
router.register("mcp-servers", views.MCPServerViewSet, basename="mcp-server")

urlpatterns = [
    path("agent/chat/", views.ChatView.as_view(), name="agent-chat"),
    path("runs/<uuid:task_id>/stop/", views.RunStopView.as_view(), name="agent-run-stop"),
    *router.urls,
]
