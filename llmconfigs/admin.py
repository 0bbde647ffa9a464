"""Django admin for LLM configurations (the config UI) and the read-only audit trail. Every write goes through the
services, so the admin gets the same validation, audit records and cache invalidation as the API."""
from __future__ import annotations

import json

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied, ValidationError
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.utils.timezone import localtime

from llmconfigs import usage_admin  # noqa: F401  (registers the Usage page)
from llmconfigs.errors import LLMConfigError
from llmconfigs.models import AuditLog, LLMConfig
from llmconfigs.providers import PROVIDERS
from llmconfigs.routing import cooling_until, health_of
from llmconfigs.selectors import llm_config_versions
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
from opsagent.common.clients import audit_context

# Lookups that would filter or order by the key; the changelist refuses them instead of leaking it by bisection.
_SECRET_FIELDS = ("api_key",)


class LLMConfigForm(forms.ModelForm):
    new_api_key = forms.CharField(
        label="New API key",
        required=False,
        strip=True,
        # render_value=False: the stored key is never written into the page, not even as a value attribute.
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Leave blank to keep the stored key. The key is encrypted at rest and never shown again.",
    )

    class Meta:
        model = LLMConfig
        # Never "api_key": the stored key must not be bound to a widget (new_api_key replaces it).
        fields = [
            "name", "provider", "model_name", "base_url", "description", "temperature", "top_p", "max_tokens",
            "frequency_penalty", "presence_penalty", "is_active", "is_embedding", "input_price_per_million",
            "output_price_per_million", "currency", "extra_config", "route", "priority", "weight",
        ]
        labels = {"base_url": "Base URL", "top_p": "top_p", "max_tokens": "max_tokens"}

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("new_api_key"):
            # So that the model's clean() (run next, by _post_clean) judges the key the config will have, bound to
            # the endpoint the form points it at (a key left blank stays bound to where it was entered).
            self.instance.api_key = cleaned["new_api_key"]
            self.instance.api_key_origin = LLMConfig(
                provider=cleaned.get("provider") or "", base_url=cleaned.get("base_url") or ""
            ).endpoint_origin()
        return cleaned

    def _update_errors(self, errors):
        # The model names the key "api_key" and may name read-only fields (is_default); show those errors on the
        # "new key" field and at the top instead of failing on a field the form does not have.
        if hasattr(errors, "error_dict"):
            remapped: dict[str, list] = {}
            for name, error_list in errors.error_dict.items():
                target = "new_api_key" if name in _SECRET_FIELDS else name
                if target != NON_FIELD_ERRORS and target not in self.fields:
                    target = NON_FIELD_ERRORS
                remapped.setdefault(target, []).extend(error_list)
            errors = ValidationError(remapped)
        super()._update_errors(errors)


def _provider_table() -> str:
    rows = format_html_join(
        "",
        "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        (
            (
                spec.label,
                spec.default_base_url or "(enter one)",
                spec.default_model or "-",
                spec.temperature.describe(),
                spec.top_p.describe(),
                "yes" if spec.penalties else "no",
                "yes" if spec.embeddings else "no",
            )
            for spec in PROVIDERS.values()
        ),
    )
    return format_html(
        '<table class="provider-help"><thead><tr><th>Provider</th><th>Default base URL</th><th>Usual model</th>'
        "<th>temperature</th><th>top_p</th><th>Penalties</th><th>Embeddings</th></tr></thead><tbody>{}</tbody>"
        "</table>",
        rows,
    )


def _shown(value) -> str:
    """A version's field value as the diff shows it."""
    if value is None or value == "":
        return "(empty)"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


def _copy_saved(target: LLMConfig, saved: LLMConfig) -> None:
    """The admin keeps using the object it built the form around; give it the row the service saved."""
    for field in LLMConfig._meta.concrete_fields:
        setattr(target, field.attname, getattr(saved, field.attname))
    target._state.adding = False
    target._state.db = saved._state.db


class _HealthChangeList(ChangeList):
    """The list page reads the cooldowns of all its rows in one cache round trip, not one per row."""

    def get_results(self, request):
        super().get_results(request)
        cooling = cooling_until([obj.pk for obj in self.result_list])
        for obj in self.result_list:
            obj.cooling = cooling


@admin.register(LLMConfig)
class LLMConfigAdmin(admin.ModelAdmin):
    form = LLMConfigForm
    # Seven columns, so that the list fits a 1400 px screen beside the admin's navigation: related facts share one.
    list_display = ["name", "model_and_provider", "pool", "health", "state", "usage", "key"]
    list_filter = ["provider", "is_active", "is_default", "is_embedding"]
    search_fields = ["name", "model_name", "route"]
    ordering = ["-is_default", "name"]
    readonly_fields = [
        "masked_key", "provider_help", "is_default", "health", "usage_count", "error_count", "last_used_at",
        "prompt_tokens_total",
        "completion_tokens_total", "total_tokens_total", "cost_total", "created_at", "updated_at", "created_by",
        "updated_by",
    ]
    fieldsets = [
        ("Model", {"fields": ["name", "provider", "model_name", "base_url", "description"]}),
        ("Routing", {
            "fields": ["route", "priority", "weight", "health"],
            "description": "Active chat configs with the same route form a pool: clients ask for the route as their "
                           "model, and a failing member hands the request to the next one before the first token.",
        }),
        ("Provider defaults and accepted ranges", {
            "fields": ["provider_help"],
            "description": "A blank base URL uses the provider's default. ( and ) exclude the bound.",
        }),
        ("Credentials", {"fields": ["masked_key", "new_api_key"]}),
        ("Sampling parameters", {
            "fields": ["temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty"],
            "description": "Checked against the provider's ranges (see the table above) when you save.",
        }),
        ("Status", {
            "fields": ["is_active", "is_default", "is_embedding"],
            "description": "Use the “Set as default” action in the list to change the default.",
        }),
        ("Pricing", {"fields": ["input_price_per_million", "output_price_per_million", "currency"]}),
        ("Advanced", {"fields": ["extra_config"], "classes": ["collapse"],
                      "description": 'JSON with any of: extra_body (object sent with every request), '
                                     'vision (true/false), embedding_batch_size (integer).'}),
        ("Usage", {"fields": ["usage_count", "error_count", "last_used_at", "prompt_tokens_total",
                              "completion_tokens_total", "total_tokens_total", "cost_total"]}),
        ("History", {"fields": ["created_at", "created_by", "updated_at", "updated_by"], "classes": ["collapse"]}),
    ]
    actions = ["set_as_default", "activate", "deactivate", "test_connection"]

    # ----- reads -----

    def get_queryset(self, request):
        # The key is decrypted only when a form needs it (lazily, for validation); lists never read it.
        return super().get_queryset(request).defer("api_key")

    def get_changelist(self, request, **kwargs):
        return _HealthChangeList

    def lookup_allowed(self, lookup, value, request=None):
        if lookup.split("__", 1)[0] in _SECRET_FIELDS:
            return False
        return super().lookup_allowed(lookup, value, request)

    def get_actions(self, request):
        actions = super().get_actions(request)
        # Bulk delete would bypass the rule that the default cannot be deleted; delete one config at a time.
        actions.pop("delete_selected", None)
        return actions

    @admin.display(description="Model", ordering="model_name")
    def model_and_provider(self, obj: LLMConfig) -> str:
        return format_html('{}<br><span class="quiet">{}</span>', obj.model_name, obj.get_provider_display())

    @admin.display(description="Pool · priority · weight", ordering="route")
    def pool(self, obj: LLMConfig) -> str:
        return f"{obj.route_name} · {obj.priority} · {obj.weight}"

    @admin.display(description="State", ordering="-is_default")
    def state(self, obj: LLMConfig) -> str:
        words = ["active" if obj.is_active else "inactive"]
        if obj.is_default:
            words.append("default")
        words.append("embedding" if obj.is_embedding else "chat")
        return ", ".join(words)

    @admin.display(description="Usage", ordering="usage_count")
    def usage(self, obj: LLMConfig) -> str:
        last = date_format(localtime(obj.last_used_at), "Y-m-d H:i") if obj.last_used_at else "never"
        return format_html(
            "{} calls, {} errors · tokens {} in / {} out / {} total<br>{} {} · last used {}",
            f"{obj.usage_count:,}", f"{obj.error_count:,}", f"{obj.prompt_tokens_total:,}",
            f"{obj.completion_tokens_total:,}", f"{obj.total_tokens_total:,}", f"{obj.cost_total.normalize():f}",
            obj.currency, last,
        )

    @admin.display(description="Health")
    def health(self, obj: LLMConfig) -> str:
        if obj.pk is None:
            return "-"
        health = health_of(obj, cooling=getattr(obj, "cooling", None))
        if health["state"] == "ok":
            return "ok"
        detail = f" until {health['until']}" if health["until"] else ""
        return f"{health['state']}{detail} ({health['last_error']})"

    @admin.display(description="Key", ordering="api_key_mask")
    def key(self, obj: LLMConfig) -> str:
        return obj.api_key_mask or "-"

    @admin.display(description="Stored key")
    def masked_key(self, obj: LLMConfig) -> str:
        if not obj.api_key_mask:
            return "(none)"
        return f"{obj.api_key_mask}, sent only to {obj.api_key_origin}"

    @admin.display(description="Providers")
    def provider_help(self, obj: LLMConfig) -> str:
        return _provider_table()

    # ----- writes, through the services -----

    def _audit(self, request) -> dict:
        return audit_context(request, source="admin")

    def save_model(self, request, obj, form, change):
        fields = {name: form.cleaned_data[name] for name in form.cleaned_data if name != "new_api_key"}
        new_key = form.cleaned_data.get("new_api_key") or ""
        if change:
            saved = llm_config_update(config=obj, api_key=new_key or None, **fields, **self._audit(request))
        else:
            saved = llm_config_create(api_key=new_key, **fields, **self._audit(request))
        _copy_saved(obj, saved)

    def delete_view(self, request, object_id, extra_context=None):
        obj = self.get_object(request, unquote(object_id))
        if obj is not None and obj.is_default:
            self.message_user(
                request, f"{obj.name!r} is the default config and cannot be deleted; make another config the default "
                "first.", messages.ERROR,
            )
            return HttpResponseRedirect(reverse("admin:llmconfigs_llmconfig_change", args=[obj.pk]))
        return super().delete_view(request, object_id, extra_context)

    def delete_model(self, request, obj):
        llm_config_delete(config=obj, **self._audit(request))

    # ----- actions -----

    @admin.action(description="Set as default", permissions=["change"])
    def set_as_default(self, request, queryset):
        selected = list(queryset[:2])
        if len(selected) != 1:
            self.message_user(request, "Select exactly one configuration to make it the default.", messages.WARNING)
            return
        self._each(request, selected, llm_config_set_default, "{name} is now the default.")

    @admin.action(description="Activate", permissions=["change"])
    def activate(self, request, queryset):
        self._each(request, queryset, llm_config_activate, "{name} is active.")

    @admin.action(description="Deactivate", permissions=["change"])
    def deactivate(self, request, queryset):
        self._each(request, queryset, llm_config_deactivate, "{name} is inactive.")

    @admin.action(description="Test connection", permissions=["change"])
    def test_connection(self, request, queryset):
        for config in queryset:
            self._report_test(request, config)

    def _each(self, request, configs, service, success: str) -> None:
        for config in configs:
            try:
                service(config=config, **self._audit(request))
            except LLMConfigError as exc:
                self.message_user(request, f"{config.name}: {exc.message}", messages.ERROR)
            except ValidationError as exc:
                self.message_user(request, f"{config.name}: {' '.join(exc.messages)}", messages.ERROR)
            else:
                self.message_user(request, success.format(name=config.name), messages.SUCCESS)

    def _report_test(self, request, config: LLMConfig) -> None:
        result = llm_config_test_connection(config=config, **self._audit(request))
        if result.ok:
            self.message_user(request, f"{config.name}: connection OK ({result.latency_ms:.0f} ms).", messages.SUCCESS)
        else:
            self.message_user(
                request, f"{config.name}: connection failed ({result.category}): {result.message}", messages.ERROR
            )

    # ----- the "Test connection" button on the change form -----

    def get_urls(self):
        return [
            path(
                "<path:object_id>/test-connection/",
                self.admin_site.admin_view(self.test_connection_view),
                name="llmconfigs_llmconfig_test_connection",
            ),
            path(
                "<path:object_id>/versions/",
                self.admin_site.admin_view(self.versions_view),
                name="llmconfigs_llmconfig_versions",
            ),
            path(
                "<path:object_id>/rollback/<int:version>/",
                self.admin_site.admin_view(self.rollback_view),
                name="llmconfigs_llmconfig_rollback",
            ),
            *super().get_urls(),
        ]

    # ----- config history: the versions page and its "Roll back to this version" buttons -----

    def versions_view(self, request, object_id):
        config = self.get_object(request, unquote(object_id))
        if config is None:
            raise Http404("No such LLM configuration.")
        if not self.has_view_or_change_permission(request, config):
            raise PermissionDenied
        versions = llm_config_versions(config=config)
        for version in versions:
            version["diff_rows"] = [(name, _shown(change["old"]), _shown(change["new"]))
                                    for name, change in version["diff"].items()]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts, "original": config, "title": f"Versions of {config.name}", "versions": versions,
            "can_rollback": self.has_change_permission(request, config),
        }
        return TemplateResponse(request, "admin/llmconfigs/llmconfig/versions.html", context)

    def rollback_view(self, request, object_id, version):
        config = self.get_object(request, unquote(object_id))
        if config is None:
            raise Http404("No such LLM configuration.")
        if request.method != "POST" or not self.has_change_permission(request, config):
            raise PermissionDenied
        try:
            llm_config_rollback(config=config, version=version, **self._audit(request))
        except LLMConfigError as exc:
            self.message_user(request, f"{config.name}: {exc.message}", messages.ERROR)
        except ValidationError as exc:
            self.message_user(request, f"{config.name}: {' '.join(exc.messages)}", messages.ERROR)
        else:
            self.message_user(request, f"{config.name} is back to version {version}.", messages.SUCCESS)
            return HttpResponseRedirect(reverse("admin:llmconfigs_llmconfig_change", args=[config.pk]))
        return HttpResponseRedirect(reverse("admin:llmconfigs_llmconfig_versions", args=[config.pk]))

    def test_connection_view(self, request, object_id):
        config = self.get_object(request, unquote(object_id))
        if config is None:
            raise Http404("No such LLM configuration.")
        if request.method != "POST" or not self.has_change_permission(request, config):
            raise PermissionDenied
        self._report_test(request, config)
        return HttpResponseRedirect(reverse("admin:llmconfigs_llmconfig_change", args=[config.pk]))


@admin.register(AuditLog)
class AuditLogAdmin(admin.ModelAdmin):
    list_display = ["created_at", "actor_repr", "action", "target_type", "target_repr", "source", "ip_address"]
    list_filter = ["action", "source", "target_type"]
    search_fields = ["target_repr", "actor_repr", "target_id"]
    date_hierarchy = "created_at"
    fields = ["created_at", "actor", "actor_repr", "action", "target_type", "target_id", "target_repr", "source",
              "ip_address", "user_agent", "changes_pretty"]
    readonly_fields = fields

    @admin.display(description="Changes")
    def changes_pretty(self, obj: AuditLog) -> str:
        return format_html("<pre>{}</pre>", json.dumps(obj.changes, indent=2, ensure_ascii=False, sort_keys=True))

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
