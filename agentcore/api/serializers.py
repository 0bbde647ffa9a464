"""Request and response shapes of the agent's REST API (validation of input only; the services do the work)."""
from __future__ import annotations

from django.conf import settings
from rest_framework import serializers

from agentcore.models import Approval, MCPServer, Message, Session, Task, Thought, ToolPolicy
from agentcore.permissions import may_see_mcp_secrets
from agentcore.runs import TurnOverrides
from llmconfigs.secrets import mask_secret
from opsagent.common.client_input import ClientInputError, ObjectBounds, object_check

# Bounds of the MCP server fields that hold lists of strings (a command line's arguments, tool names) and maps of
# strings (env, headers).
LIST_MAX_ITEMS = 200
LIST_ITEM_MAX_LENGTH = 4096
SECRET_MAP_BOUNDS = ObjectBounds(max_bytes=64 * 1024, max_keys=100, max_key_length=255, max_string_length=8192,
                                 max_depth=1)


class TurnSerializer(serializers.Serializer):
    """A query with its per-turn overrides (shared by REST chat and the WebSocket `chat` message)."""

    message = serializers.CharField(trim_whitespace=False, max_length=settings.QUERY_MAX_LENGTH)
    inputs = serializers.DictField(required=False, default=dict)
    model_config_id = serializers.UUIDField(required=False, allow_null=True)
    model = serializers.CharField(required=False, allow_null=True, allow_blank=False, max_length=200)
    temperature = serializers.FloatField(required=False, allow_null=True)
    max_tokens = serializers.IntegerField(required=False, allow_null=True)
    top_p = serializers.FloatField(required=False, allow_null=True)
    tools = serializers.ListField(child=serializers.CharField(max_length=200), required=False, allow_null=True,
                                  max_length=LIST_MAX_ITEMS)

    def validate_message(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("This field may not be blank.")
        return value

    def overrides(self) -> TurnOverrides:
        data = self.validated_data
        return TurnOverrides(
            config_id=str(data["model_config_id"]) if data.get("model_config_id") else None,
            model=data.get("model"),
            temperature=data.get("temperature"),
            max_tokens=data.get("max_tokens"),
            top_p=data.get("top_p"),
            tools=data.get("tools"),
        )


class ChatRequestSerializer(TurnSerializer):
    session_id = serializers.UUIDField(required=False, allow_null=True)
    app_id = serializers.UUIDField(required=False, allow_null=True)
    response_mode = serializers.ChoiceField(choices=["blocking", "streaming"], default="blocking")


class PendingApprovalSerializer(serializers.Serializer):
    id = serializers.CharField()
    tool = serializers.CharField()
    tool_input = serializers.DictField()


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    total_price = serializers.CharField()
    currency = serializers.CharField()
    latency = serializers.FloatField()


class ChatResponseSerializer(serializers.Serializer):
    session_id = serializers.CharField()
    message_id = serializers.CharField()
    task_id = serializers.CharField()
    answer = serializers.CharField()
    status = serializers.CharField(help_text="normal | stopped | paused | error")
    error = serializers.DictField(required=False, help_text="{category, message} when the run failed")
    pending_approvals = PendingApprovalSerializer(many=True)
    usage = UsageSerializer(allow_null=True)


class SessionSerializer(serializers.ModelSerializer):
    app_id = serializers.UUIDField(required=False, allow_null=True)
    llm_config_id = serializers.UUIDField(required=False, allow_null=True)
    model_parameters = serializers.DictField(required=False)

    class Meta:
        model = Session
        fields = ["id", "app_id", "name", "source", "inputs", "llm_config_id", "model_parameters", "created_at",
                  "updated_at"]
        read_only_fields = ["id", "source", "created_at", "updated_at"]
        extra_kwargs = {"name": {"required": False}, "inputs": {"required": False}}


class SessionUpdateSerializer(SessionSerializer):
    class Meta(SessionSerializer.Meta):
        read_only_fields = [*SessionSerializer.Meta.read_only_fields, "app_id", "inputs"]


class ThoughtSerializer(serializers.ModelSerializer):
    class Meta:
        model = Thought
        fields = ["id", "position", "thought", "tool", "tool_input", "observation", "status", "created_at",
                  "updated_at"]


class MessageSerializer(serializers.ModelSerializer):
    thoughts = ThoughtSerializer(many=True, read_only=True)
    llm_config_id = serializers.UUIDField(read_only=True)

    class Meta:
        model = Message
        fields = ["id", "session_id", "task_id", "query", "answer", "status", "error", "error_category",
                  "llm_config_id", "model_name", "model_parameters", "prompt_tokens", "completion_tokens",
                  "total_tokens", "total_price", "currency", "latency", "time_to_first_token", "created_at",
                  "attempts", "thoughts"]


class TaskSerializer(serializers.ModelSerializer):
    class Meta:
        model = Task
        fields = ["id", "title", "status", "order", "created_at", "updated_at"]


class ToolSerializer(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    source = serializers.CharField()
    enabled = serializers.BooleanField()
    requires_approval = serializers.BooleanField()
    approver = serializers.CharField()


class ToolPolicyUpdateSerializer(serializers.Serializer):
    enabled = serializers.BooleanField(required=False)
    requires_approval = serializers.BooleanField(required=False)
    approver = serializers.ChoiceField(choices=ToolPolicy.Approver.choices, required=False)


class ApprovalSerializer(serializers.ModelSerializer):
    decided_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = Approval
        fields = ["id", "session_id", "message_id", "tool", "tool_input", "approver", "status", "comment",
                  "decided_by", "decided_by_end_user", "decided_at", "created_at"]


class ApprovalDecisionSerializer(serializers.Serializer):
    comment = serializers.CharField(required=False, allow_blank=True, default="", max_length=10_000)


class DecidedMessageSerializer(serializers.Serializer):
    id = serializers.CharField()
    answer = serializers.CharField(allow_blank=True)
    status = serializers.CharField()


class ApprovalDecisionResponseSerializer(serializers.Serializer):
    approval = ApprovalSerializer()
    message = DecidedMessageSerializer()


class SecretMapField(serializers.DictField):
    """A dict of secrets (env vars, HTTP headers): written in full, read back as masks only."""

    child = serializers.CharField(allow_blank=True)

    def to_internal_value(self, data):
        # Strictly strings: a number silently turned into text is not what the server will be given.
        if isinstance(data, dict) and not all(isinstance(value, str) for value in data.values()):
            raise serializers.ValidationError("Every value must be a string.")
        if isinstance(data, dict):
            try:
                object_check(data, field=self.field_name, bounds=SECRET_MAP_BOUNDS)
            except ClientInputError as exc:
                raise serializers.ValidationError(exc.message) from None
        return super().to_internal_value(data)

    def to_representation(self, value):
        return {key: mask_secret(str(secret)) for key, secret in (value or {}).items()}


class MCPServerSerializer(serializers.ModelSerializer):
    env = SecretMapField(required=False, help_text="Environment of a stdio server. Shown masked.")
    headers = SecretMapField(required=False, help_text="HTTP headers of a streamable_http server. Shown masked.")

    class Meta:
        model = MCPServer
        fields = ["id", "name", "transport", "command", "args", "env", "url", "headers", "enabled", "allowed_tools",
                  "requires_approval_default", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]

    def to_representation(self, instance):
        data = super().to_representation(instance)
        request = self.context.get("request")
        if not may_see_mcp_secrets(request.user if request else None):
            data["args"] = [mask_secret(str(arg)) for arg in data.get("args") or []]
        return data

    def validate_args(self, value):
        if not isinstance(value, list) or not all(isinstance(arg, str) for arg in value):
            raise serializers.ValidationError("A list of strings.")
        if len(value) > LIST_MAX_ITEMS or any(len(arg) > LIST_ITEM_MAX_LENGTH for arg in value):
            raise serializers.ValidationError(
                f"At most {LIST_MAX_ITEMS} strings of at most {LIST_ITEM_MAX_LENGTH} characters each."
            )
        return value

    def validate_allowed_tools(self, value):
        return self.validate_args(value)

    def validate(self, attrs):
        def current(name):
            return attrs.get(name, getattr(self.instance, name, "") if self.instance else "")

        transport = current("transport") or MCPServer.Transport.STDIO
        if transport == MCPServer.Transport.STDIO and not current("command"):
            raise serializers.ValidationError({"command": ["A stdio server needs a command."]})
        if transport == MCPServer.Transport.STREAMABLE_HTTP:
            url = current("url")
            if not url:
                raise serializers.ValidationError({"url": ["A streamable_http server needs a URL."]})
            if not url.startswith(("http://", "https://")):
                raise serializers.ValidationError({"url": ["Use an http(s) URL."]})
        return attrs


class MCPToolSerializer(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField(allow_blank=True)


class MCPServerTestSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    tools = MCPToolSerializer(many=True, required=False)
    error = serializers.CharField(required=False)


class RunStopResponseSerializer(serializers.Serializer):
    result = serializers.CharField(help_text='"success" when a running task of yours was told to stop')
    stopped = serializers.BooleanField()
