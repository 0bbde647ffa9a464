from django.apps import AppConfig


class LLMConfigsConfig(AppConfig):
    name = "llmconfigs"
    verbose_name = "LLM configurations"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from llmconfigs.routing import pool_health_metrics
        from opsagent.common import metrics

        # /metrics shows every pool member's health, read when scraped.
        metrics.state_source_register(pool_health_metrics)
