"""URL map: the chat page (`/` leads to it), admin, health, metrics, the REST API under /api, the Dify Service API
under /v1."""
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from agentcore.pages import chat_page, home
from opsagent.common.authentication import ThrottledLoginForm
from opsagent.views import health, metrics

urlpatterns = [
    path("", home, name="home"),
    path("chat/", chat_page, name="chat"),
    # Any active user signs in here for the chat page (the admin's login admits staff only).
    path("login/", auth_views.LoginView.as_view(template_name="chat/login.html", authentication_form=ThrottledLoginForm,
                                                redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="login"), name="logout"),
    path("admin/", admin.site.urls),
    path("health/", health, name="health"),
    path("metrics", metrics, name="metrics"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/", include("llmconfigs.urls")),
    path("api/", include("agentcore.urls")),
    path("v1/", include("difyapi.urls")),
]
