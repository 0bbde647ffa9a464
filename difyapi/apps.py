from django.apps import AppConfig


class DifyApiConfig(AppConfig):
    name = "difyapi"
    verbose_name = "Dify Service API"
    default_auto_field = "django.db.models.BigAutoField"
