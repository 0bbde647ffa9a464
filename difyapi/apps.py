from django.apps import AppConfig


class DifyApiConfig(AppConfig):
    name = "difyapi"
    verbose_name = "Dify Service API"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from difyapi import auth  # noqa: F401  (connects the signals that keep the app cache fresh)
        from difyapi.errors import DifySurface
        from opsagent.common import surfaces

        # Refusals made before a view runs (body limits, dead dependencies, bad query text) in Dify's envelope.
        surfaces.register("/v1", DifySurface())
