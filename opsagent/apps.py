from django.apps import AppConfig


class OpsAgentConfig(AppConfig):
    name = "opsagent"
    verbose_name = "OpsAgent"

    def ready(self):
        from django.contrib import admin

        from opsagent.authentication import ThrottledAdminLoginForm

        # Admin logins count against the brakes on guessing (opsagent.throttling).
        admin.site.login_form = ThrottledAdminLoginForm
