from django.apps import AppConfig


class AgentCoreConfig(AppConfig):
    name = "agentcore"
    verbose_name = "Agent"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from agentcore import checks  # noqa: F401  (registers the system checks)
        from agentcore.tools import registry  # noqa: F401  (connects the signals that keep the tool setup fresh)
