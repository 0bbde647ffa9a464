"""LLM configurations (one row per provider/model/key an admin manages) and the audit trail of changes to them."""
import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import models
from django.db.models import Q

from llmconfigs.encryption import encrypted
from llmconfigs.providers import (
    MAX_TOKENS_LIMIT,
    PENALTY_RANGE,
    PROVIDERS,
    TEMPERATURE_RANGE,
    TOP_P_RANGE,
    Provider,
    parameter_errors,
)
from llmconfigs.secrets import url_origin
from opsagent.common.client_input import ClientInputError, ObjectBounds, object_check

# What extra_config may hold. It is shown in clear to API readers, so nothing in it may be a credential.
EXTRA_CONFIG_KEYS = {"extra_body", "vision", "embedding_batch_size"}
# It is merged into every request body sent upstream: a few parameters, never a document.
EXTRA_CONFIG_BOUNDS = ObjectBounds(max_bytes=16 * 1024, max_keys=100, max_key_length=255, max_string_length=8192,
                                   max_depth=6)


class LLMConfig(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100, unique=True)
    provider = models.CharField(max_length=32, choices=Provider.choices)
    model_name = models.CharField(max_length=200)
    # Encrypted at rest with FIELD_ENCRYPTION_KEY; read it only to build a provider client.
    api_key = encrypted(models.TextField(blank=True, default=""))
    # What may be shown of the key ("sk-a…f9e2"), kept beside it so that listing configs never decrypts anything.
    api_key_mask = models.CharField(max_length=16, blank=True, default="", editable=False)
    # Where the key may be sent: the origin (scheme://host:port) of the endpoint it was entered for. Pointing the
    # config at another origin needs the key again (clean()), and no client is built for a key away from home.
    api_key_origin = models.CharField(max_length=300, blank=True, default="", editable=False)
    base_url = models.CharField(max_length=500, blank=True, default="", help_text="Blank: the provider's default.")
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    temperature = models.FloatField(default=0.7)
    top_p = models.FloatField(default=1.0)
    frequency_penalty = models.FloatField(default=0.0)
    presence_penalty = models.FloatField(default=0.0)
    description = models.TextField(blank=True, default="")
    is_active = models.BooleanField(default=True)
    is_default = models.BooleanField(default=False)
    is_embedding = models.BooleanField(default=False)
    extra_config = models.JSONField(default=dict, blank=True)

    # Routing: active chat configs with the same route form a pool that clients address by that name.
    route = models.CharField(max_length=200, blank=True, default="",
                             help_text="The model name clients ask for; blank: this config's own model name. "
                                       "Active chat configs with the same route form a pool.")
    priority = models.IntegerField(default=0, help_text="Higher is tried first; lower priorities only when every "
                                                        "higher member is unavailable.")
    weight = models.PositiveIntegerField(default=1, help_text="Share of requests within its priority (3 vs 1: 75/25).")
    # Set by a 401/403 from the provider: the config is left out of its pool (without being deactivated) until a
    # connection test succeeds or its key changes. Kept in the database so that it survives restarts.
    auth_failed_at = models.DateTimeField(null=True, blank=True, editable=False)
    # The last provider failure, "category: message" with the key scrubbed.
    last_error = models.CharField(max_length=300, blank=True, default="", editable=False)

    input_price_per_million = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    output_price_per_million = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    currency = models.CharField(max_length=8, default="USD")

    usage_count = models.PositiveBigIntegerField(default=0, editable=False)
    error_count = models.PositiveBigIntegerField(default=0, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    prompt_tokens_total = models.PositiveBigIntegerField(default=0, editable=False)
    completion_tokens_total = models.PositiveBigIntegerField(default=0, editable=False)
    total_tokens_total = models.PositiveBigIntegerField(default=0, editable=False)
    cost_total = models.DecimalField(max_digits=18, decimal_places=7, default=0, editable=False)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False
    )
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False
    )

    class Meta:
        verbose_name = "LLM configuration"
        ordering = ["-is_default", "name"]
        indexes = [models.Index(fields=["provider", "is_active"]), models.Index(fields=["model_name"]),
                   models.Index(fields=["route"])]
        constraints = [
            models.UniqueConstraint(
                fields=["is_embedding"], condition=Q(is_default=True), name="llmconfig_one_default_per_kind"
            ),
            models.CheckConstraint(condition=~Q(is_default=True, is_active=False), name="llmconfig_default_is_active"),
            models.CheckConstraint(condition=Q(provider__in=Provider.values), name="llmconfig_provider_known"),
            models.CheckConstraint(
                condition=Q(temperature__gte=TEMPERATURE_RANGE.low, temperature__lte=TEMPERATURE_RANGE.high),
                name="llmconfig_temperature_range",
            ),
            models.CheckConstraint(
                condition=Q(top_p__gte=TOP_P_RANGE.low, top_p__lte=TOP_P_RANGE.high), name="llmconfig_top_p_range"
            ),
            models.CheckConstraint(
                condition=Q(frequency_penalty__gte=PENALTY_RANGE.low, frequency_penalty__lte=PENALTY_RANGE.high),
                name="llmconfig_frequency_penalty_range",
            ),
            models.CheckConstraint(
                condition=Q(presence_penalty__gte=PENALTY_RANGE.low, presence_penalty__lte=PENALTY_RANGE.high),
                name="llmconfig_presence_penalty_range",
            ),
            models.CheckConstraint(
                condition=Q(max_tokens__isnull=True) | Q(max_tokens__gte=1, max_tokens__lte=MAX_TOKENS_LIMIT),
                name="llmconfig_max_tokens_range",
            ),
            models.CheckConstraint(
                condition=Q(base_url="") | Q(base_url__startswith="http://") | Q(base_url__startswith="https://"),
                name="llmconfig_base_url_http",
            ),
            models.CheckConstraint(condition=~Q(name=""), name="llmconfig_name_not_blank"),
            models.CheckConstraint(condition=Q(weight__gte=1), name="llmconfig_weight_positive"),
            models.CheckConstraint(condition=~Q(model_name=""), name="llmconfig_model_name_not_blank"),
            models.CheckConstraint(
                condition=Q(input_price_per_million__isnull=True) | Q(input_price_per_million__gte=0),
                name="llmconfig_input_price_positive",
            ),
            models.CheckConstraint(
                condition=Q(output_price_per_million__isnull=True) | Q(output_price_per_million__gte=0),
                name="llmconfig_output_price_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.provider}/{self.model_name})"

    def __repr__(self) -> str:
        # Never include the key: reprs end up in tracebacks and logs.
        return f"<LLMConfig {self.pk} {self.name!r} {self.provider}/{self.model_name}>"

    @property
    def route_name(self) -> str:
        """The name of the pool this config serves in."""
        return self.route or self.model_name

    def endpoint_origin(self) -> str:
        """The origin of the endpoint this config calls (its base URL, else its provider's default)."""
        spec = PROVIDERS.get(self.provider)
        return url_origin(self.base_url or (spec.default_base_url if spec else ""))

    def key_origin_error(self) -> str:
        """Why the stored key may not be sent to the current endpoint ("" when it may)."""
        if not self.api_key or self.api_key_origin == self.endpoint_origin():
            return ""
        return (f"The API key was entered for {self.api_key_origin or 'another endpoint'}; this config now calls "
                f"{self.endpoint_origin() or 'no endpoint'}. Enter the API key again to send it there.")

    def clean(self) -> None:
        """Per-provider validation with messages per field (the database only knows the widest ranges)."""
        errors: dict[str, str] = {}
        if self.provider not in PROVIDERS:
            errors["provider"] = f"Unknown provider {self.provider!r}."
        else:
            errors.update(
                parameter_errors(
                    self.provider,
                    temperature=self.temperature,
                    top_p=self.top_p,
                    max_tokens=self.max_tokens,
                    frequency_penalty=self.frequency_penalty,
                    presence_penalty=self.presence_penalty,
                )
            )
            spec = PROVIDERS[self.provider]
            if not self.base_url and not spec.default_base_url:
                errors["base_url"] = f"{spec.label} has no default endpoint; enter its base URL."
            if self.is_embedding and not spec.embeddings:
                errors["is_embedding"] = f"{spec.label} does not offer embeddings through its OpenAI-compatible API."
            if self.is_active and spec.requires_api_key and not self.api_key:
                errors["api_key"] = f"{spec.label} needs an API key (keyless configs must stay inactive)."
            elif self.key_origin_error():
                errors["api_key"] = self.key_origin_error()
        if self.base_url:
            try:
                URLValidator(schemes=["http", "https"])(self.base_url)
            except ValidationError:
                errors["base_url"] = "Enter an http:// or https:// URL."
        if self.weight is not None and self.weight < 1:
            errors["weight"] = "The weight must be at least 1."
        if self.is_default and not self.is_active:
            errors["is_default"] = "The default config must be active."
        if not isinstance(self.extra_config, dict):
            errors["extra_config"] = "extra_config must be a JSON object."
        else:
            unknown = sorted(set(self.extra_config) - EXTRA_CONFIG_KEYS)
            if unknown:
                errors["extra_config"] = (
                    f"Unknown extra_config key(s): {', '.join(unknown)}. "
                    f"Allowed: {', '.join(sorted(EXTRA_CONFIG_KEYS))} (credentials belong in the API key field only)."
                )
            elif not isinstance(self.extra_config.get("extra_body", {}), dict):
                errors["extra_config"] = "extra_config.extra_body must be a JSON object."
            else:
                try:
                    object_check(self.extra_config, field="extra_config", bounds=EXTRA_CONFIG_BOUNDS)
                except ClientInputError as exc:
                    errors["extra_config"] = exc.message
        if errors:
            raise ValidationError(errors)


class AuditLog(models.Model):
    """Who did what to which object, when and from where. Secrets are masked before they get here."""

    class Action(models.TextChoices):
        CREATE = "create"
        UPDATE = "update"
        DELETE = "delete"
        SET_DEFAULT = "set_default"
        ACTIVATE = "activate"
        DEACTIVATE = "deactivate"
        TEST_CONNECTION = "test_connection"
        ROTATE_KEY = "rotate_key"
        HEALTH = "health"
        ROLLBACK = "rollback"
        REVOKE = "revoke"
        DECIDE = "decide"
        OTHER = "other"

    id = models.BigAutoField(primary_key=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_repr = models.CharField(max_length=150, blank=True, default="")
    action = models.CharField(max_length=32, choices=Action.choices)
    target_type = models.CharField(max_length=100)
    target_id = models.CharField(max_length=64, blank=True, default="")
    target_repr = models.CharField(max_length=300, blank=True, default="")
    source = models.CharField(max_length=16, blank=True, default="", help_text="admin, api, command, ...")
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=300, blank=True, default="", help_text="As the client sent it.")
    changes = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["target_type", "target_id"])]

    def __str__(self) -> str:
        return f"{self.actor_repr or 'system'} {self.action} {self.target_type} {self.target_repr}"


class LLMConfigVersion(models.Model):
    """One numbered state of an LLM config, written by every change to it (create, update, activate, rollback):
    the fields as they were after the change, and the key encrypted like the config's (never shown; readers learn
    only whether it changed). Numbers are per config, taken under the config's row lock."""

    id = models.BigAutoField(primary_key=True)
    config = models.ForeignKey(LLMConfig, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    # The versioned fields (llmconfigs.services.VERSIONED_FIELDS), JSON-ready (decimals as strings).
    fields = models.JSONField(default=dict)
    # Encrypted at rest like LLMConfig.api_key, re-encrypted by rotate_field_key with it.
    api_key = encrypted(models.TextField(blank=True, default=""))
    api_key_mask = models.CharField(max_length=16, blank=True, default="", editable=False)
    key_changed = models.BooleanField(default=False, help_text="The key differs from the previous version's.")
    action = models.CharField(max_length=32, blank=True, default="", help_text="What made this version.")
    rolled_back_from = models.PositiveIntegerField(null=True, blank=True,
                                                   help_text="The version a rollback restored.")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")
    actor_repr = models.CharField(max_length=150, blank=True, default="")
    source = models.CharField(max_length=16, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "LLM configuration version"
        ordering = ["config", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["config", "number"], name="llmconfigversion_unique_number"),
            models.CheckConstraint(condition=Q(number__gte=1), name="llmconfigversion_number_positive"),
        ]

    def __str__(self) -> str:
        return f"version {self.number} of {self.config_id}"

    def __repr__(self) -> str:
        return f"<LLMConfigVersion {self.config_id} #{self.number}>"


# ----- usage: one row per provider call, rolled up per hour and per day -----

# The upper bounds (ms) of the latency and time-to-first-token histogram buckets kept with every rollup row: powers of
# √2 from 4 ms to 131 s, plus one bucket above. A percentile read from them lies in the same bucket as the true one;
# reported as the bucket's geometric middle (interpolated by rank) it is within a factor 2^(1/4) (-16 %, +19 %) of
# the true value, whatever the spread of the calls (docs/api-rest.md#usage-reports).
HISTOGRAM_BOUNDS_MS = tuple(2 ** (k / 2) for k in range(4, 35))
HISTOGRAM_BUCKETS = len(HISTOGRAM_BOUNDS_MS) + 1
LATENCY_COLUMNS = tuple(f"latency_h{i:02d}" for i in range(HISTOGRAM_BUCKETS))
TTFT_COLUMNS = tuple(f"ttft_h{i:02d}" for i in range(HISTOGRAM_BUCKETS))


class CallKind(models.TextChoices):
    CHAT = "chat", "chat turn"
    TOOL_STEP = "tool_step", "tool-loop step"
    TITLE = "title", "conversation title"
    SUGGESTION = "suggestion", "suggested questions"
    CONNECTION_TEST = "connection_test", "connection test"
    COMPLETION = "completion", "chat completion (OpenAI-compatible surface)"


class ProviderCall(models.Model):
    """One call to a provider (a failed one too): who made it, through which config, how it went. Written in bulk
    when the turn ends, rolled up into UsageRollup by `manage.py usage_rollup`, deleted after USAGE_RETENTION_DAYS."""

    class Status(models.TextChoices):
        OK = "ok"
        ERROR = "error"

    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(help_text="When the call started (UTC).")
    config = models.ForeignKey(LLMConfig, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    config_name = models.CharField(max_length=100, help_text="The config's name at the time of the call.")
    model_name = models.CharField(max_length=200, blank=True, default="")
    route = models.CharField(max_length=200, blank=True, default="")
    app_id = models.CharField(max_length=36, blank=True, default="")
    app_name = models.CharField(max_length=100, blank=True, default="")
    key_id = models.CharField(max_length=36, blank=True, default="", help_text="The Dify API key's id, if any.")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+")
    kind = models.CharField(max_length=16, choices=CallKind.choices)
    status = models.CharField(max_length=8, choices=Status.choices)
    error_category = models.CharField(max_length=32, blank=True, default="")
    latency_ms = models.FloatField()
    ttft_ms = models.FloatField(null=True, blank=True, help_text="Streaming calls that produced a token.")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=18, decimal_places=7, default=0)
    currency = models.CharField(max_length=8, default="USD")
    # Set, in the same transaction that adds the row to its rollups, by the `usage_rollup` run that took it.
    rollup_batch = models.UUIDField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "usage"
        verbose_name_plural = "usage"
        ordering = ["-created_at", "-id"]
        default_permissions = ()
        permissions = [("view_usage", "Can view usage reports")]
        indexes = [
            models.Index(fields=["created_at"], name="providercall_created"),
            models.Index(fields=["created_at"], condition=Q(rollup_batch__isnull=True),
                         name="providercall_not_rolled"),
            models.Index(fields=["rollup_batch"], name="providercall_batch"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(status="ok", error_category="") | Q(status="error")
                                   & ~Q(error_category=""), name="providercall_status_matches_error"),
            models.CheckConstraint(condition=Q(latency_ms__gte=0), name="providercall_latency_positive"),
            models.CheckConstraint(condition=Q(cost__gte=0), name="providercall_cost_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.config_name} {self.status} at {self.created_at:%Y-%m-%d %H:%M:%S}"


class UsageRollup(models.Model):
    """The provider calls of one hour (or one day) that share every dimension: counts, token and cost sums, and
    latency/TTFT histograms (HISTOGRAM_BOUNDS_MS). Rows only grow, by upserts that add (never read-modify-write),
    so concurrent rollups cannot lose a count. Dimensions are strings ("" for none) so that the unique key holds
    no NULL."""

    class Size(models.TextChoices):
        HOUR = "hour"
        DAY = "day"

    id = models.BigAutoField(primary_key=True)
    size = models.CharField(max_length=4, choices=Size.choices)
    bucket = models.DateTimeField(help_text="The start of the hour or day (UTC).")
    config_id = models.CharField(max_length=36, blank=True, default="")
    config_name = models.CharField(max_length=100, blank=True, default="")
    model_name = models.CharField(max_length=200, blank=True, default="")
    route = models.CharField(max_length=200, blank=True, default="")
    app_id = models.CharField(max_length=36, blank=True, default="")
    app_name = models.CharField(max_length=100, blank=True, default="")
    key_id = models.CharField(max_length=36, blank=True, default="")
    user_id = models.CharField(max_length=36, blank=True, default="")
    user_name = models.CharField(max_length=150, blank=True, default="")
    kind = models.CharField(max_length=16, choices=CallKind.choices)
    error_category = models.CharField(max_length=32, blank=True, default="", help_text="Blank: the calls succeeded.")
    currency = models.CharField(max_length=8, default="USD")
    calls = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(max_digits=20, decimal_places=7, default=0)
    # What the reports read instead of the sum columns (reading and adding ninety columns per row was most of a
    # grouped report's time): calls, tokens, cost and both histograms cumulated, packed in one value
    # (llmconfigs.usage.rollup_packed). Derived from the columns by the rollup, in the transaction that adds to them.
    packed = models.BinaryField(default=b"", editable=False)
    # What a grouped report writes for an entry made of this row alone (most entries of a grouped series), after its
    # bucket and group: its numbers as JSON (llmconfigs.usage.rollup_entry_json), written with `packed`.
    entry_json = models.TextField(default="", editable=False)

    class Meta:
        default_permissions = ()
        constraints = [
            models.UniqueConstraint(
                fields=["size", "bucket", "config_id", "model_name", "route", "app_id", "key_id", "user_id", "kind",
                        "error_category", "currency"],
                name="usagerollup_one_row_per_bucket_and_dimensions",
            ),
        ]
        indexes = [models.Index(fields=["size", "bucket"], name="usagerollup_size_bucket"),
                   models.Index(fields=["config_id", "size", "bucket"], name="usagerollup_config")]

    def __str__(self) -> str:
        return f"{self.size} {self.bucket:%Y-%m-%d %H:00} {self.config_name} {self.kind} ({self.calls} calls)"


for _column in (*LATENCY_COLUMNS, *TTFT_COLUMNS):
    UsageRollup.add_to_class(_column, models.PositiveBigIntegerField(default=0))
