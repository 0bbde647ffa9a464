from django.apps import AppConfig


class OpsAgentConfig(AppConfig):
    name = "opsagent"
    verbose_name = "OpsAgent"

    def ready(self):
        from django.contrib import admin

        from opsagent.common import surfaces
        from opsagent.common.authentication import ThrottledAdminLoginForm

        # Admin logins count against the brakes on guessing (opsagent.common.throttling).
        admin.site.login_form = ThrottledAdminLoginForm
        admin.site.site_header = "OpsAgent"
        admin.site.site_title = "OpsAgent admin"
        admin.site.index_title = "Models, agent apps, keys and conversations"
        # "View site" leads to the chat page (`/` sends signed-in users there).
        admin.site.site_url = "/"
        # The REST API (mounted under /api by opsagent.urls) refuses in DRF's format.
        surfaces.register("/api", surfaces.RestSurface())
