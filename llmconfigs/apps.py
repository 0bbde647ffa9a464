from django.apps import AppConfig


class LLMConfigsConfig(AppConfig):
    name = "llmconfigs"
    verbose_name = "LLM configurations"
    default_auto_field = "django.db.models.BigAutoField"
