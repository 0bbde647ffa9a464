"""REST API for LLM configurations and their audit log: thin DRF views over the llmconfigs services and selectors."""
from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import exceptions, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from llmconfigs.models import AuditLog, LLMConfig
from llmconfigs.providers import PROVIDERS, Provider
from llmconfigs.routing import cooling_until, health_of
from llmconfigs.selectors import audit_log_list, llm_config_default, llm_config_list, llm_config_versions
from llmconfigs.services import (
    llm_config_activate,
    llm_config_create,
    llm_config_deactivate,
    llm_config_delete,
    llm_config_rollback,
    llm_config_set_default,
    llm_config_test_connection,
    llm_config_update,
)
from llmconfigs.usage_api import (
    USAGE_PARAMETERS,
    USAGE_PERMISSION,
    UsageCSVRenderer,
    UsageJSONRenderer,
    UsageReportResponses,
    usage_query,
    usage_response,
)
from opsagent.common.clients import audit_context
from opsagent.common.permissions import ActionPermissions

# ----- serializers -----


class HealthSerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=["ok", "cooling_down", "auth_failed"])
    until = serializers.DateTimeField(allow_null=True, help_text="End of the cooldown (null unless cooling_down).")
    last_error = serializers.CharField(help_text="The last provider failure: category and message, key scrubbed.")

    def to_representation(self, instance):
        return health_of(instance)


class LLMConfigSerializer(serializers.ModelSerializer):
    api_key = serializers.CharField(
        write_only=True,
        required=False,
        allow_blank=True,
        style={"input_type": "password"},
        help_text="Write-only. Never returned; see api_key_mask. Blank or absent on update keeps the stored key.",
    )
    api_key_mask = serializers.CharField(read_only=True, help_text="First 3 and last 4 characters of the key.")
    health = HealthSerializer(read_only=True, source="*", help_text="Whether the config is in its pool's rotation.")

    class Meta:
        model = LLMConfig
        fields = [
            "id", "name", "provider", "model_name", "api_key", "api_key_mask", "base_url", "max_tokens",
            "temperature", "top_p", "frequency_penalty", "presence_penalty", "description", "is_active", "is_default",
            "is_embedding", "extra_config", "route", "priority", "weight", "input_price_per_million",
            "output_price_per_million", "currency", "health", "usage_count", "error_count", "last_used_at",
            "prompt_tokens_total", "completion_tokens_total", "total_tokens_total", "cost_total", "created_at",
            "updated_at", "created_by", "updated_by",
        ]
        # The default moves only through set-default (one locked transaction), never as a side effect of an edit.
        read_only_fields = ["is_default"]
        # The model's clean() (run by the services) and the database constraints are the validators; DRF's copies of
        # the partial unique constraint would second-guess the services' locked default switch.
        validators = []


# Fields whose DRF representation of a database value is the value itself.
_PASS_THROUGH = (serializers.CharField, serializers.ChoiceField, serializers.BooleanField, serializers.IntegerField,
                 serializers.FloatField, serializers.JSONField, serializers.PrimaryKeyRelatedField)


class LLMConfigRowsSerializer(serializers.ListSerializer):
    """The list endpoint's serializer: rows fetched with .values_list(*value_names()) (no model instances, no key
    column), rendered in exactly the child serializer's formats. Building 1,000 instances and walking DRF's per-field
    machinery for each costs several times the query itself."""

    def to_representation(self, data):
        fields = [field for field in self.child.fields.values() if field.field_name in self.value_names()]
        names = [field.field_name for field in fields]
        converted = []
        for index, field in enumerate(fields):
            if isinstance(field, _PASS_THROUGH):
                continue
            if isinstance(field, serializers.DateTimeField) and not hasattr(field, "timezone"):
                # DRF looks the current time zone up again for every value; it cannot change during one response.
                field.timezone = field.default_timezone()
            converted.append((index, field.to_representation))
        rows = []
        health_columns = []
        for row in data:
            values = list(row)
            health_columns.append(values[-len(_HEALTH_COLUMNS):])
            values = values[:-len(_HEALTH_COLUMNS)]
            for index, convert in converted:
                if values[index] is not None:
                    values[index] = convert(values[index])
            rows.append(dict(zip(names, values, strict=True)))
        cooling = cooling_until([row["id"] for row in rows])
        for row, (auth_failed_at, last_error) in zip(rows, health_columns, strict=True):
            row["health"] = health_of(LLMConfig(pk=row["id"], auth_failed_at=auth_failed_at, last_error=last_error),
                                      cooling=cooling)
        return rows

    @classmethod
    def value_names(cls) -> list[str]:
        return [name for name, field in LLMConfigSerializer().fields.items()
                if not field.write_only and name != "health"]

    @classmethod
    def column_names(cls) -> list[str]:
        """What the list reads: the serializer's columns, then what its health is made of."""
        return [*cls.value_names(), *_HEALTH_COLUMNS]


_HEALTH_COLUMNS = ("auth_failed_at", "last_error")


class ConnectionTestSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    latency_ms = serializers.FloatField()
    category = serializers.CharField(help_text="auth, rate_limit, upstream_error, timeout, unreachable, bad_request")
    message = serializers.CharField(help_text="The provider's error, with the key scrubbed.")
    status_code = serializers.IntegerField(allow_null=True)


class ProviderSerializer(serializers.Serializer):
    key = serializers.CharField(help_text="The value of an LLM config's provider field.")
    label = serializers.CharField()
    default_base_url = serializers.CharField()
    default_model = serializers.CharField()
    default_embedding_model = serializers.CharField()
    temperature_range = serializers.CharField()
    top_p_range = serializers.CharField()
    requires_api_key = serializers.BooleanField()
    supports_stream_usage = serializers.BooleanField()
    supports_tools = serializers.BooleanField()
    supports_embeddings = serializers.BooleanField()
    supports_penalties = serializers.BooleanField()
    embedding_batch_size = serializers.IntegerField()


class LLMConfigVersionSerializer(serializers.Serializer):
    number = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    actor = serializers.IntegerField(allow_null=True, help_text="The user who made the change (null: a command).")
    actor_repr = serializers.CharField()
    source = serializers.CharField(help_text="admin, api, command, system")
    action = serializers.CharField(help_text="create, update, activate, deactivate, rollback, initial")
    rolled_back_from = serializers.IntegerField(allow_null=True, help_text="The version a rollback restored.")
    fields = serializers.DictField(help_text="The config's fields as this version left them (never the key).")
    api_key = serializers.ChoiceField(choices=["changed", "unchanged"],
                                      help_text="Whether the key differs from the previous version's.")
    diff = serializers.DictField(help_text="Fields that differ from the previous version: {field: {old, new}}.")


class RollbackSerializer(serializers.Serializer):
    version = serializers.IntegerField(min_value=1, help_text="The number of the version to restore.")


class AuditLogSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditLog
        fields = ["id", "actor", "actor_repr", "action", "target_type", "target_id", "target_repr", "source",
                  "ip_address", "user_agent", "changes", "created_at"]


def _bool_param(request, name: str) -> bool | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise exceptions.ValidationError({name: [f"Expected true or false, got {raw!r}."]})


def _audit_context(request) -> dict:
    return audit_context(request, source="api")


# ----- views -----

_LIST_PARAMETERS = [
    OpenApiParameter("is_active", OpenApiTypes.BOOL, description="Only active (true) or inactive (false) configs."),
    OpenApiParameter("is_embedding", OpenApiTypes.BOOL, description="Only embedding (true) or chat (false) configs."),
    OpenApiParameter("provider", OpenApiTypes.STR, enum=Provider.values),
    OpenApiParameter("search", OpenApiTypes.STR, description="Substring of the name, model name or description."),
]


@extend_schema_view(list=extend_schema(parameters=_LIST_PARAMETERS), destroy=extend_schema(
    responses={204: None, 409: OpenApiResponse(description="The config is the current default.")}
))
class LLMConfigViewSet(UsageReportResponses, viewsets.ModelViewSet):
    """LLM configurations: any authenticated user reads them (keys only as masks, so that API users can pick a model);
    every write and the connection test need the model's permissions, as in the admin."""

    serializer_class = LLMConfigSerializer
    permission_classes = [ActionPermissions]
    action_permissions = {
        "list": (), "retrieve": (), "default": (), "providers": (),
        "create": ("llmconfigs.add_llmconfig",),
        "update": ("llmconfigs.change_llmconfig",),
        "partial_update": ("llmconfigs.change_llmconfig",),
        "destroy": ("llmconfigs.delete_llmconfig",),
        "set_default": ("llmconfigs.change_llmconfig",),
        "activate": ("llmconfigs.change_llmconfig",),
        "deactivate": ("llmconfigs.change_llmconfig",),
        # The test sends the stored key upstream: the admin offers it to those who may change the config.
        "test": ("llmconfigs.change_llmconfig",),
        # Versions name who changed what: for those who may see configs in the admin.
        "versions": ("llmconfigs.view_llmconfig",),
        "rollback": ("llmconfigs.change_llmconfig",),
        "stats": (USAGE_PERMISSION,),
    }

    def get_queryset(self):
        if self.action != "list":
            return llm_config_list()
        provider = self.request.query_params.get("provider") or None
        if provider and provider not in PROVIDERS:
            raise exceptions.ValidationError({"provider": [f"Unknown provider {provider!r}."]})
        return llm_config_list(
            is_active=_bool_param(self.request, "is_active"),
            is_embedding=_bool_param(self.request, "is_embedding"),
            provider=provider,
            search=self.request.query_params.get("search") or None,
        )

    def list(self, request, *args, **kwargs):
        page = self.paginate_queryset(self.get_queryset().values_list(*LLMConfigRowsSerializer.column_names()))
        rows = LLMConfigRowsSerializer(page, child=LLMConfigSerializer(context=self.get_serializer_context()))
        return self.get_paginated_response(rows.data)

    def perform_create(self, serializer):
        serializer.instance = llm_config_create(**serializer.validated_data, **_audit_context(self.request))

    def perform_update(self, serializer):
        fields = dict(serializer.validated_data)
        api_key = fields.pop("api_key", None)
        serializer.instance = llm_config_update(
            config=serializer.instance, api_key=api_key, **fields, **_audit_context(self.request)
        )

    def perform_destroy(self, instance):
        llm_config_delete(config=instance, **_audit_context(self.request))

    @extend_schema(
        parameters=[OpenApiParameter("is_embedding", OpenApiTypes.BOOL, description="The embedding default.")],
        responses={200: LLMConfigSerializer, 404: OpenApiResponse(description="No default of that kind is set.")},
    )
    @action(detail=False, methods=["get"])
    def default(self, request):
        kind_is_embedding = bool(_bool_param(request, "is_embedding"))
        config = llm_config_default(is_embedding=kind_is_embedding)
        if config is None:
            kind = "embedding" if kind_is_embedding else "chat"
            raise exceptions.NotFound(f"No default {kind} config is set.")
        return Response(self.get_serializer(config).data)

    @extend_schema(request=None, responses={200: LLMConfigSerializer})
    @action(detail=True, methods=["post"], url_path="set-default")
    def set_default(self, request, pk=None):
        config = llm_config_set_default(config=self.get_object(), **_audit_context(request))
        return Response(self.get_serializer(llm_config_list().get(pk=config.pk)).data)

    @extend_schema(request=None, responses={200: LLMConfigSerializer})
    @action(detail=True, methods=["post"])
    def activate(self, request, pk=None):
        config = llm_config_activate(config=self.get_object(), **_audit_context(request))
        return Response(self.get_serializer(config).data)

    @extend_schema(request=None, responses={200: LLMConfigSerializer, 409: OpenApiResponse(
        description="The config is the current default.")})
    @action(detail=True, methods=["post"])
    def deactivate(self, request, pk=None):
        config = llm_config_deactivate(config=self.get_object(), **_audit_context(request))
        return Response(self.get_serializer(config).data)

    @extend_schema(request=None, responses={200: ConnectionTestSerializer})
    @action(detail=True, methods=["post"])
    def test(self, request, pk=None):
        result = llm_config_test_connection(config=self.get_object(), **_audit_context(request))
        return Response(ConnectionTestSerializer(result.as_dict()).data)

    @extend_schema(responses={200: LLMConfigVersionSerializer(many=True)})
    @action(detail=True, methods=["get"], pagination_class=None)
    def versions(self, request, pk=None):
        return Response(LLMConfigVersionSerializer(llm_config_versions(config=self.get_object()), many=True).data)

    @extend_schema(request=RollbackSerializer, responses={200: LLMConfigSerializer})
    @action(detail=True, methods=["post"])
    def rollback(self, request, pk=None):
        serializer = RollbackSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        config = llm_config_rollback(config=self.get_object(), version=serializer.validated_data["version"],
                                     **_audit_context(request))
        return Response(self.get_serializer(llm_config_list().get(pk=config.pk)).data)

    @extend_schema(parameters=USAGE_PARAMETERS, responses={200: OpenApiTypes.OBJECT})
    @action(detail=True, methods=["get"], renderer_classes=[UsageJSONRenderer, UsageCSVRenderer])
    def stats(self, request, pk=None):
        """The usage report of this config alone (as GET /api/usage/?config=<id>, without grouping)."""
        config = self.get_object()
        return usage_response(request, usage_query(request, config_id=str(config.pk)))

    @extend_schema(responses={200: ProviderSerializer(many=True)})
    @action(detail=False, methods=["get"], pagination_class=None)
    def providers(self, request):
        return Response(ProviderSerializer([spec.as_dict() for spec in PROVIDERS.values()], many=True).data)


@extend_schema_view(list=extend_schema(parameters=[
    OpenApiParameter("action", OpenApiTypes.STR, enum=AuditLog.Action.values),
    OpenApiParameter("target_type", OpenApiTypes.STR, description="e.g. llmconfigs.LLMConfig"),
    OpenApiParameter("target_id", OpenApiTypes.STR),
]))
class AuditLogViewSet(viewsets.ReadOnlyModelViewSet):
    """The audit trail of configuration changes (needs llmconfigs.view_auditlog). Secrets appear only as masks."""

    serializer_class = AuditLogSerializer
    permission_classes = [ActionPermissions]
    action_permissions = {"list": ("llmconfigs.view_auditlog",), "retrieve": ("llmconfigs.view_auditlog",)}

    def get_queryset(self):
        params = self.request.query_params
        return audit_log_list(
            action=params.get("action") or None,
            target_type=params.get("target_type") or None,
            target_id=params.get("target_id") or None,
        )
