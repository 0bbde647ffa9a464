"""Django admin of the Dify adapter: app API keys (created here, the plaintext shown once on the page that follows,
then only `app-…last4`; revoked, never deleted) and read-only end users, uploaded files and feedback."""
from __future__ import annotations

import base64
import binascii

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.core.signing import BadSignature
from django.http import Http404, HttpResponseRedirect
from django.template import engines
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from agentcore.admin import usage_beside_limits
from agentcore.limits import LIMIT_FIELDS, Limits
from difyapi.auth import api_key_create, api_key_revoke, api_key_update
from difyapi.models import ApiKey, EndUser, Feedback, UploadFile
from llmconfigs.encryption import cipher_for
from llmconfigs.usage_admin import usage_page_url
from opsagent.common.clients import audit_context

# Extends the admin's own base template, so no template file has to be shipped.
_KEY_CREATED_TEMPLATE = engines["django"].from_string(
    """{% extends "admin/base_site.html" %}
{% load static %}
{% block extrastyle %}{{ block.super }}<link rel="stylesheet" href="{% static 'difyapi/admin.css' %}">{% endblock %}
{% block content %}
<h1>API key created for {{ key.app }}</h1>
{% if raw_key %}
<p>Copy this key now. It is stored hashed and will never be shown again.</p>
<p><code class="api-key-once">{{ raw_key }}</code></p>
{% else %}
<p>The key <code>{{ key }}</code> was shown once, when it was created, and cannot be shown again. If it was not
copied, revoke it and add a new one.</p>
{% endif %}
<p>Clients send it as <code>Authorization: Bearer &lt;key&gt;</code> to <code>/v1/…</code>.</p>
<p><a href="{{ changelist_url }}">Back to API keys</a></p>
{% endblock %}"""
)


# The new key's way from the add form to the page that shows it (post/redirect/get, so that reloading that page
# cannot post the form again and create a second key): encrypted with the field key in the admin's session, taken
# out when shown, and readable for a few minutes only.
_CREATED_SESSION_KEY = "difyapi:created-key:{}"
CREATED_KEY_TTL_SECONDS = 300


def _created_key_seal(raw_key: str) -> str:
    return base64.b64encode(cipher_for(settings.FIELD_ENCRYPTION_KEY).encrypt(raw_key.encode())).decode("ascii")


def _created_key_open(sealed: str | None) -> str | None:
    if not sealed:
        return None
    try:
        data = cipher_for(settings.FIELD_ENCRYPTION_KEY).decrypt(base64.b64decode(sealed),
                                                                  ttl=CREATED_KEY_TTL_SECONDS)
    except (BadSignature, binascii.Error, ValueError):  # expired, or sealed under another field key
        return None
    return data.decode()


class ApiKeyAddForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ["app", "name"]


class ApiKeyChangeForm(forms.ModelForm):
    """A key's limits apply on top of its app's: one above the app's would never be reached, so it is refused."""

    class Meta:
        model = ApiKey
        fields = ["name", *LIMIT_FIELDS]

    def clean(self):
        data = super().clean()
        for name in LIMIT_FIELDS:
            app_limit = getattr(self.instance.app, name)
            if app_limit and (data.get(name) or 0) > app_limit:
                self.add_error(name, f"At most the app's limit ({app_limit}): a key's limits only narrow its app's.")
        return data


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["masked", "name", "app", "created_at", "last_used_at", "status"]
    list_filter = ["app", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "last4", "app__name"]
    actions = ["revoke"]
    readonly_fields = ["masked", "app", "created_by", "created_at", "last_used_at", "revoked_at", "usage"]
    fields = ["masked", "name", "app", "created_by", "created_at", "last_used_at", "revoked_at", *LIMIT_FIELDS,
              "usage"]

    @admin.display(description="usage")
    def usage(self, obj: ApiKey) -> str:
        return format_html('{} <a href="{}">Usage report</a>',
                           usage_beside_limits(scope=f"key:{obj.pk}", limits=Limits.of(obj)),
                           usage_page_url(key=str(obj.pk)))

    @admin.display(description="key")
    def masked(self, obj: ApiKey) -> str:
        return str(obj)

    @admin.display(description="status")
    def status(self, obj: ApiKey) -> str:
        return "revoked" if obj.revoked_at else "active"

    def get_form(self, request, obj=None, change=False, **kwargs):
        kwargs["form"] = ApiKeyAddForm if obj is None else ApiKeyChangeForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request, obj=None):
        return ["app", "name"] if obj is None else self.fields

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.readonly_fields

    def has_delete_permission(self, request, obj=None) -> bool:
        # Revoke instead: revocation also evicts the cached key, deletion would leave it valid until the cache expires.
        return False

    def save_model(self, request, obj: ApiKey, form, change: bool) -> None:
        if change:
            api_key_update(key=obj, **audit_context(request, source="admin"))
            return
        context = audit_context(request, source="admin")
        key, raw_key = api_key_create(app=obj.app, name=obj.name, created_by=context.pop("actor"), **context)
        for field in ApiKey._meta.concrete_fields:
            setattr(obj, field.attname, getattr(key, field.attname))
        obj._state = key._state
        request._dify_raw_key = raw_key

    def response_add(self, request, obj: ApiKey, post_url_continue=None):
        raw_key = getattr(request, "_dify_raw_key", None)
        if raw_key is None:
            return super().response_add(request, obj, post_url_continue)
        request.session[_CREATED_SESSION_KEY.format(obj.pk)] = _created_key_seal(raw_key)
        return HttpResponseRedirect(reverse("admin:difyapi_apikey_created", args=[obj.pk]))

    def get_urls(self):
        return [
            path("<path:object_id>/created/", self.admin_site.admin_view(self.created_view),
                 name="difyapi_apikey_created"),
            *super().get_urls(),
        ]

    def created_view(self, request, object_id):
        """The page after adding a key: the plaintext on the first visit only."""
        key = self.get_object(request, unquote(object_id))
        if key is None:
            raise Http404("No such API key.")
        if not self.has_add_permission(request):
            raise PermissionDenied
        raw_key = _created_key_open(request.session.pop(_CREATED_SESSION_KEY.format(key.pk), None))
        context = {
            **self.admin_site.each_context(request),
            "title": "API key created",
            "key": key,
            "raw_key": raw_key,
            "changelist_url": reverse("admin:difyapi_apikey_changelist"),
        }
        response = TemplateResponse(request, _KEY_CREATED_TEMPLATE, context)
        # The page carries a secret: never cache it.
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description="Revoke selected API keys", permissions=["change"])
    def revoke(self, request, queryset) -> None:
        live = list(queryset.filter(revoked_at__isnull=True))
        for key in live:
            api_key_revoke(key=key, **audit_context(request, source="admin"))
        self.message_user(request, f"Revoked {len(live)} API key(s).", messages.SUCCESS)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by the Service API: visible to admins, changed only through the API."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(EndUser)
class EndUserAdmin(ReadOnlyAdmin):
    list_display = ["session_id", "app", "type", "created_at"]
    list_filter = ["app"]
    search_fields = ["session_id"]


@admin.register(UploadFile)
class UploadFileAdmin(ReadOnlyAdmin):
    list_display = ["name", "app", "end_user", "size", "mime_type", "created_at"]
    list_filter = ["app", "extension"]
    search_fields = ["name"]


@admin.register(Feedback)
class FeedbackAdmin(ReadOnlyAdmin):
    list_display = ["message", "rating", "from_source", "end_user", "app", "created_at"]
    list_filter = ["app", "rating", "from_source"]
    search_fields = ["content"]


# The annotation admins (their own module) build on ReadOnlyAdmin above; importing them here registers them.
from difyapi import annotation_admin  # noqa: E402, F401
