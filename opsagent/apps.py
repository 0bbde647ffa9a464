from django.apps import AppConfig


class OpsAgentConfig(AppConfig):
    name = "opsagent"
    verbose_name = "OpsAgent"
