from django.apps import AppConfig


class AgentCoreConfig(AppConfig):
    name = "agentcore"
    verbose_name = "Agent"
    default_auto_field = "django.db.models.BigAutoField"
