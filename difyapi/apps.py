from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class DifyApiConfig(AppConfig):
    name = "difyapi"
    verbose_name = "Dify Service API"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from agentcore.models import AgentApp
        from difyapi.annotations import annotation_setting_cache_forget
        from difyapi.auth import api_key_cache_forget, app_cache_forget
        from difyapi.errors import DifySurface
        from difyapi.models import AnnotationSetting, ApiKey
        from difyapi.openai.errors import OpenAISurface
        from opsagent.common import surfaces

        # Saving or deleting an app drops its cached row (difyapi.auth).
        for signal in (post_save, post_delete):
            signal.connect(app_cache_forget, sender=AgentApp, dispatch_uid="difyapi.app_cache")
        # A key's cached entry holds its limits: saving the key drops it.
        post_save.connect(api_key_cache_forget, sender=ApiKey, dispatch_uid="difyapi.key_cache")
        # Each turn reads the app's annotation reply setting from the cache (difyapi.annotations).
        for signal in (post_save, post_delete):
            signal.connect(annotation_setting_cache_forget, sender=AnnotationSetting,
                           dispatch_uid="difyapi.annotation_plan_cache")
        # Refusals made before a view runs (body limits, dead dependencies, bad query text) in Dify's envelope.
        surfaces.register("/v1", DifySurface())
        # ...except the OpenAI-compatible surface's, in OpenAI's envelope.
        surfaces.register("/v1/chat/completions", OpenAISurface())
