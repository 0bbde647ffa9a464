from django.apps import AppConfig


class DifyApiConfig(AppConfig):
    name = "difyapi"
    verbose_name = "Dify Service API"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from difyapi import auth  # noqa: F401  (connects the signals that keep the app cache fresh)
