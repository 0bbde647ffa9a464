"""Admin for the agent: apps, sessions with their messages and thoughts (read-only), approvals (approve/reject resumes
the run), MCP servers (with a connection test; secrets never rendered) and tool policies."""
from __future__ import annotations

import json

from django import forms
from django.contrib import admin, messages
from django.db.models import Prefetch
from django.utils.html import format_html, format_html_join

from agentcore.api.turns import turn_drain
from agentcore.limits import LIMIT_FIELDS, LIMITS, Limits, usage_current
from agentcore.models import AgentApp, Approval, MCPServer, Message, Session, Task, Thought, ToolPolicy
from agentcore.permissions import (
    DECIDE_APPROVALS,
    MANAGE_MCP_STDIO,
    has_perms,
    may_see_mcp_secrets,
    mcp_server_is_command,
)
from agentcore.runs import ApprovalDecision, TurnRequest, turn_prepare
from agentcore.selectors import tool_list
from agentcore.services import (
    agent_app_delete,
    agent_app_save,
    mcp_server_create,
    mcp_server_delete,
    mcp_server_headers_refusal,
    mcp_server_run_test,
    mcp_server_update,
)
from agentcore.tools.policies import SHELL_TOOL, tool_policy_delete, tool_policy_update
from llmconfigs.models import LLMConfig
from llmconfigs.providers import parameter_errors
from llmconfigs.secrets import mask_secret
from llmconfigs.selectors import llm_config_default, llm_route_names
from llmconfigs.usage_admin import usage_page_url
from opsagent.common.clients import audit_context
from opsagent.common.errors import ServiceError


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


def usage_beside_limits(*, scope: str, limits: Limits) -> str:
    """A table of each limit and the usage of the current period (UTC minute, day or month) beside it."""
    used = usage_current(scope=scope)
    return format_html(
        "<table><tr><th>limit</th><th>set to</th><th>used this period</th></tr>{}</table>",
        format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", (
            (label, getattr(limits, name) or "no limit", used[name]) for name, _, _, label in LIMITS
        )),
    )


# The model parameters an app may set, edited as fields (the rest of model_parameters is kept as it is).
APP_PARAMETERS = ("temperature", "max_tokens", "top_p")


def _tool_label(tool: dict) -> str:
    notes = [note for note, applies in (("needs approval", tool["requires_approval"]),
                                        ("switched off in Tool policies", not tool["enabled"])) if applies]
    description = tool["description"].splitlines()[0] if tool["description"] else ""
    return f"{tool['name']}: {description}" + (f" ({', '.join(notes)})" if notes else "")


# Dify's input form item kinds (the key of each item of user_input_form).
INPUT_FORM_KINDS = ("text-input", "paragraph", "select", "number", "checkbox", "file", "file-list")


class LinesField(forms.Field):
    """A JSON list of strings (or of whole numbers) edited as one item per line."""

    widget = forms.Textarea(attrs={"rows": 3, "cols": 60})

    def __init__(self, *, numbers: bool = False, **kwargs):
        self.numbers = numbers
        kwargs.setdefault("required", False)
        super().__init__(**kwargs)

    def prepare_value(self, value):
        if isinstance(value, list):
            return "\n".join(str(item) for item in value)
        return value

    def to_python(self, value):
        if isinstance(value, list):
            return value
        text = str(value or "").strip()
        if text.startswith("["):  # a JSON list pasted as it is stored
            try:
                parsed = json.loads(text)
            except ValueError:
                raise forms.ValidationError("One item per line (or a JSON list).", code="invalid") from None
            if isinstance(parsed, list):
                return parsed
        lines = [line.strip() for line in str(value or "").splitlines() if line.strip()]
        if not self.numbers:
            return lines
        try:
            return [int(line) for line in lines]
        except ValueError:
            raise forms.ValidationError("One whole number per line.", code="invalid") from None


def input_form_problem(form) -> str | None:
    """What is wrong with a Dify user_input_form, as a sentence; None when it is well formed."""
    if not isinstance(form, list):
        return 'A list of items such as [{"text-input": {"variable": "host", "label": "Host", "required": true}}].'
    seen = set()
    for number, item in enumerate(form, 1):
        if not isinstance(item, dict) or len(item) != 1:
            return f"Item {number}: an object with one key, the kind ({', '.join(INPUT_FORM_KINDS)})."
        kind, spec = next(iter(item.items()))
        if kind not in INPUT_FORM_KINDS:
            return f"Item {number}: unknown kind {kind!r}; one of {', '.join(INPUT_FORM_KINDS)}."
        if not isinstance(spec, dict) or not isinstance(spec.get("variable"), str) or not spec["variable"].strip():
            return f'Item {number}: needs "variable", a non-empty string.'
        if spec["variable"] in seen:
            return f"Item {number}: the variable {spec['variable']!r} is already used."
        seen.add(spec["variable"])
        options = spec.get("options")
        if kind == "select" and not (isinstance(options, list) and options
                                     and all(isinstance(option, str) for option in options)):
            return f'Item {number}: a select needs "options", a list of strings.'
    return None


class AgentAppForm(forms.ModelForm):
    """The app with its tools as checkboxes (each with its description and whether it needs approval), its model
    parameters as fields checked against the provider of the app's model (or of the default model), and its lists as
    one item per line. JSON only where Dify's format is JSON (the user input form and file upload settings)."""

    enabled_tools = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple,
        help_text="Tools this app may use. None ticked: every tool switched on in Tool policies.",
    )
    temperature = forms.FloatField(required=False, help_text="Empty: the model's own setting.")
    max_tokens = forms.IntegerField(required=False, min_value=1, label="max_tokens",
                                    help_text="Empty: the model's own setting.")
    top_p = forms.FloatField(required=False, label="top_p", help_text="Empty: the model's own setting.")
    suggested_questions = LinesField(help_text="One question per line.")
    network_allow_hosts = LinesField(help_text=AgentApp._meta.get_field("network_allow_hosts").help_text.replace(
        'e.g. ["grafana.internal"]', "one per line, e.g. grafana.internal"))
    network_allow_networks = LinesField(help_text=AgentApp._meta.get_field("network_allow_networks").help_text.replace(
        'e.g. ["10.20.0.0/16", "127.0.0.1/32"]', "one per line, e.g. 10.20.0.0/16"))
    network_allow_ports = LinesField(numbers=True, help_text="Ports on which the listed hosts and networks may be "
                                     "reached, one per line, e.g. 443; empty: any port.")
    allowed_routes = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple, label="Allowed models",
        help_text="The models (routes) this app may use; none ticked: every active chat model.",
    )

    class Meta:
        model = AgentApp
        fields = ["name", "mode", "is_active", "description", "system_prompt", "opening_statement",
                  "suggested_questions", "suggested_questions_after_answer", "llm_config", "enabled_tools",
                  "max_iterations", "max_active_requests", "user_input_form", "file_upload", "network_allow_hosts",
                  "network_allow_networks", "network_allow_ports", "allowed_routes", *LIMIT_FIELDS]
        labels = {"llm_config": "LLM config"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        tools = tool_list()
        known = {tool["name"] for tool in tools}
        current = list(self.instance.enabled_tools or [])
        # A tool the app lists that no longer exists stays visible, so that saving does not drop it silently.
        self.fields["enabled_tools"].choices = [(tool["name"], _tool_label(tool)) for tool in tools] + [
            (name, f"{name} (unknown tool)") for name in current if name not in known]
        self.initial.setdefault("enabled_tools", current)
        for name in APP_PARAMETERS:
            self.initial.setdefault(name, (self.instance.model_parameters or {}).get(name))
        routes = set(llm_route_names()) | set(self.instance.allowed_routes or [])
        self.fields["allowed_routes"].choices = [(route, route) for route in sorted(routes)]
        if "llm_config" in self.fields:
            self.fields["llm_config"].queryset = LLMConfig.objects.defer("api_key").filter(is_embedding=False)

    def clean_user_input_form(self):
        form = self.cleaned_data.get("user_input_form")
        problem = input_form_problem(form if form is not None else [])
        if problem:
            raise forms.ValidationError(problem, code="invalid")
        return form if form is not None else []

    def clean(self):
        cleaned = super().clean()
        config = cleaned.get("llm_config") or llm_config_default()
        values = {name: cleaned.get(name) for name in APP_PARAMETERS}
        if config is not None:
            for field, message in parameter_errors(config.provider, **values).items():
                self.add_error(field, f"{message} (model: {config.name})")
        own, routes = cleaned.get("llm_config"), cleaned.get("allowed_routes")
        if own is not None and routes and own.route_name not in routes:
            self.add_error("allowed_routes", f"The app's own model {own.route_name!r} must be allowed.")
        return cleaned

    def save(self, commit=True):
        app = super().save(commit=False)
        parameters = {key: value for key, value in (app.model_parameters or {}).items() if key not in APP_PARAMETERS}
        parameters.update({name: self.cleaned_data[name] for name in APP_PARAMETERS
                           if self.cleaned_data.get(name) is not None})
        app.model_parameters = parameters
        app.enabled_tools = list(self.cleaned_data.get("enabled_tools") or [])
        if commit:
            app.save()
            self.save_m2m()
        return app


@admin.register(AgentApp)
class AgentAppAdmin(admin.ModelAdmin):
    form = AgentAppForm
    list_display = ["name", "mode", "llm_config", "max_iterations", "max_active_requests", "is_active", "updated_at"]
    list_filter = ["mode", "is_active"]
    list_select_related = ["llm_config"]
    search_fields = ["name", "description"]
    readonly_fields = ["usage"]

    @admin.display(description="usage")
    def usage(self, app: AgentApp) -> str:
        if app._state.adding:
            return "-"
        return format_html('{} <a href="{}">Usage report</a>',
                           usage_beside_limits(scope=f"app:{app.pk}", limits=Limits.of(app)),
                           usage_page_url(app=str(app.pk)))
    fieldsets = [
        (None, {"fields": ["name", "mode", "is_active", "description", "system_prompt", "opening_statement",
                           "suggested_questions", "suggested_questions_after_answer"]}),
        ("Model", {"fields": ["llm_config", "temperature", "max_tokens", "top_p"]}),
        ("Tools", {"fields": ["enabled_tools", "max_iterations", "max_active_requests"]}),
        ("Dify settings", {"fields": ["user_input_form", "file_upload"], "classes": ["collapse"]}),
        ("Network", {"fields": ["network_allow_hosts", "network_allow_networks", "network_allow_ports"],
                     "classes": ["collapse"]}),
        ("Models and limits", {"fields": ["allowed_routes", *LIMIT_FIELDS, "usage"]}),
    ]

    class Media:
        css = {"all": ["agentcore/admin.css"]}

    # Writes through the services, which write the audit rows.
    def save_model(self, request, obj, form, change):
        agent_app_save(app=obj, **audit_context(request, source="admin"))

    def delete_model(self, request, obj):
        agent_app_delete(app=obj, **audit_context(request, source="admin"))

    def delete_queryset(self, request, queryset):
        for app in queryset:
            agent_app_delete(app=app, **audit_context(request, source="admin"))


class MessageInline(ReadOnlyInline):
    model = Message
    fields = ["created_at", "query", "answer", "status", "error", "model_name", "total_tokens", "thought_summary"]
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related(
            Prefetch("thoughts", queryset=Thought.objects.order_by("position", "created_at"))
        )

    @admin.display(description="thoughts")
    def thought_summary(self, message: Message) -> str:
        return format_html_join(
            "",
            "<div>#{} {} <code>{}</code> → {} <em>{}</em></div>",
            (
                (t.position, t.tool or "answer", json.dumps(t.tool_input)[:200] if t.tool else "",
                 (t.observation or t.thought)[:300], t.status)
                for t in message.thoughts.all()
            ),
        )


class TaskInline(ReadOnlyInline):
    model = Task
    fields = ["order", "title", "status", "updated_at"]
    readonly_fields = fields
    show_change_link = False


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = ["__str__", "app", "owner", "end_user", "source", "is_deleted", "updated_at"]
    list_filter = ["source", "is_deleted", "app"]
    list_select_related = ["app", "owner"]
    search_fields = ["name", "end_user", "owner__username"]
    inlines = [MessageInline, TaskInline]

    # Conversations are a record: changed only by the run service and the API's session endpoints.
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class ThoughtInline(ReadOnlyInline):
    model = Thought
    fields = ["position", "thought", "tool", "tool_input", "observation", "status", "created_at"]
    readonly_fields = fields
    show_change_link = False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["__str__", "session", "status", "model_name", "llm_config", "total_tokens", "total_price",
                    "created_at"]
    list_filter = ["status"]
    list_select_related = ["session", "llm_config"]
    search_fields = ["query", "answer"]
    inlines = [ThoughtInline]
    exclude = ["attempts"]
    readonly_fields = ["model_calls"]

    @admin.display(description="Model calls")
    def model_calls(self, obj: Message) -> str:
        """Every provider call of the turn: which config, how it ended, how long it took (failovers included)."""
        if not obj.attempts:
            return "-"
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{} ms</td></tr>",
            ((a.get("config_name", ""), a.get("category") or "answered", a.get("latency_ms", ""))
             for a in obj.attempts),
        )
        return format_html("<table><thead><tr><th>Config</th><th>Outcome</th><th>Latency</th></tr></thead>"
                           "<tbody>{}</tbody></table>", rows)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Approval)
class ApprovalAdmin(admin.ModelAdmin):
    """Approving or rejecting here resumes the paused run and runs it to its end inside the action, so the admin
    sees the outcome at once (the tool's result and the answer are on the session's page). The actions need the
    permission to change approvals; run_shell needs agentcore.approve_shell too (the run service checks it)."""

    list_display = ["tool", "status", "approver", "session", "decided_by", "decided_at", "created_at"]
    list_filter = ["status", "approver", "tool"]
    list_select_related = ["session", "decided_by"]
    readonly_fields = ["id", "session", "message", "tool", "tool_input", "approver", "status", "comment",
                       "decided_by", "decided_by_end_user", "decided_at", "created_at"]
    exclude = ["thought", "tool_call_id"]
    actions = ["approve", "reject"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_decide_permission(self, request) -> bool:
        return has_perms(request.user, DECIDE_APPROVALS)

    @admin.action(description="Approve selected tool calls (runs them and resumes the answer)", permissions=["decide"])
    def approve(self, request, queryset):
        self._decide(request, queryset, "approve")

    @admin.action(description="Reject selected tool calls (the agent is told and continues)", permissions=["decide"])
    def reject(self, request, queryset):
        self._decide(request, queryset, "reject")

    def _decide(self, request, queryset, decision: str) -> None:
        for approval in queryset.select_related("session__app"):
            session = approval.session
            try:
                turn = turn_prepare(TurnRequest(
                    app=session.app, session_id=str(session.id), owner=request.user, source=session.source,
                    end_user=session.end_user,
                    approval=ApprovalDecision(approval_id=str(approval.id), decision=decision,
                                              audit=audit_context(request, source="admin")),
                ))
            except ServiceError as exc:
                self.message_user(request, f"{approval.tool}: {exc.message}", messages.ERROR)
                continue
            result = turn_drain(turn)
            level = messages.ERROR if result.status == "error" else messages.SUCCESS
            self.message_user(request, f"{approval.tool}: {decision}d; the answer ended {result.status}.", level)


class SecretMapField(forms.CharField):
    """A JSON object of secrets: the form never shows the stored values (blank keeps them)."""

    widget = forms.Textarea(attrs={"rows": 3, "placeholder": '{"NAME": "value"}  (blank keeps the stored values)'})

    def prepare_value(self, value):
        return ""

    def to_python(self, value):
        value = super().to_python(value).strip()
        if not value:
            return None
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise forms.ValidationError("Enter a JSON object.") from exc
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise forms.ValidationError('Enter a JSON object of strings, e.g. {"TOKEN": "..."}.')
        return parsed


class MCPServerForm(forms.ModelForm):
    env = SecretMapField(required=False, help_text="Environment of a stdio server. Stored encrypted; never shown.")
    headers = SecretMapField(required=False, help_text="HTTP headers of a streamable_http server. Stored encrypted; "
                                                       "never shown.")

    class Meta:
        model = MCPServer
        fields = ["name", "transport", "command", "args", "env", "url", "headers", "enabled", "allowed_tools",
                  "requires_approval_default"]

    # Set by MCPServerAdmin.get_form: whether the user may add or change stdio servers.
    may_manage_stdio = False

    def clean_env(self):
        return self._kept("env")

    def clean_headers(self):
        return self._kept("headers")

    def _kept(self, name: str) -> dict:
        value = self.cleaned_data.get(name)
        if value is not None:
            return value
        return (getattr(self.instance, name) or {}) if self.instance.pk else {}

    def entered(self, name: str) -> bool:
        """Whether the user typed new env/headers (blank keeps the stored ones)."""
        return bool((self.data.get(self.add_prefix(name)) or "").strip())

    def clean(self):
        cleaned = super().clean()
        if self.instance.pk and not self.entered("headers") and "url" in cleaned:
            refusal = mcp_server_headers_refusal(stored_url=self.instance.url, stored_headers=self.instance.headers,
                                                 url=cleaned["url"])
            if refusal:
                self.add_error("headers", refusal)
        return cleaned

    def clean_transport(self):
        transport = self.cleaned_data.get("transport")
        if transport == MCPServer.Transport.STDIO and not self.may_manage_stdio:
            raise forms.ValidationError(f"A stdio server is a command run on the host: adding one, or changing a "
                                        f"server into one, needs the permission {MANAGE_MCP_STDIO}.")
        return transport


@admin.register(MCPServer)
class MCPServerAdmin(admin.ModelAdmin):
    """Writes go through the services (audited; a stdio server needs agentcore.manage_mcp_stdio). Without that
    permission a stdio server is read-only here and its args are shown masked; env and headers always are."""

    form = MCPServerForm
    list_display = ["name", "transport", "enabled", "requires_approval_default", "updated_at"]
    list_filter = ["transport", "enabled"]
    readonly_fields = ["masked_env", "masked_headers"]
    actions = ["test_connection"]

    def has_change_permission(self, request, obj=None):
        if mcp_server_is_command(obj) and not has_perms(request.user, MANAGE_MCP_STDIO):
            return False
        return super().has_change_permission(request, obj)

    def get_fields(self, request, obj=None):
        fields = super().get_fields(request, obj)
        if may_see_mcp_secrets(request.user):
            return fields
        return ["masked_args" if name == "args" else name for name in fields]

    def get_readonly_fields(self, request, obj=None):
        if may_see_mcp_secrets(request.user):
            return self.readonly_fields
        return [*self.readonly_fields, "masked_args"]

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        form.may_manage_stdio = has_perms(request.user, MANAGE_MCP_STDIO)
        return form

    @admin.display(description="args")
    def masked_args(self, server: MCPServer) -> str:
        return ", ".join(mask_secret(str(arg)) for arg in server.args or []) or "-"

    @admin.display(description="stored env")
    def masked_env(self, server: MCPServer) -> str:
        return _masked(server.env)

    @admin.display(description="stored headers")
    def masked_headers(self, server: MCPServer) -> str:
        return _masked(server.headers)

    def save_model(self, request, obj, form, change):
        fields = {name: value for name, value in form.cleaned_data.items()
                  if name not in ("env", "headers") or form.entered(name) or not change}
        context = audit_context(request, source="admin")
        saved = (mcp_server_update(server=obj, **fields, **context) if change
                 else mcp_server_create(**fields, **context))
        obj.pk, obj.updated_at = saved.pk, saved.updated_at

    def delete_model(self, request, obj):
        mcp_server_delete(server=obj, **audit_context(request, source="admin"))

    @admin.action(description="Test: connect and list the server's tools", permissions=["change"])
    def test_connection(self, request, queryset):
        for server in queryset:
            try:
                result = mcp_server_run_test(server=server, **audit_context(request, source="admin"))
            except ServiceError as exc:
                self.message_user(request, f"{server.name}: {exc.message}", messages.ERROR)
                continue
            if result.get("ok"):
                names = ", ".join(_tool_names(result.get("tools") or [])) or "no tools"
                self.message_user(request, f"{server.name}: connected; tools: {names}", messages.SUCCESS)
            else:
                self.message_user(request, f"{server.name}: {result.get('error')}", messages.ERROR)


def _masked(values: dict | None) -> str:
    return format_html_join(", ", "{}={}", ((key, mask_secret(str(v))) for key, v in (values or {}).items())) or "-"


def _tool_names(tools: list) -> list[str]:
    return [tool["name"] if isinstance(tool, dict) else str(tool) for tool in tools]


@admin.register(ToolPolicy)
class ToolPolicyAdmin(admin.ModelAdmin):
    list_display = ["name", "source", "mcp_server", "enabled", "requires_approval", "approver", "updated_at"]
    list_filter = ["source", "enabled", "requires_approval", "approver"]
    list_select_related = ["mcp_server"]
    search_fields = ["name", "description"]
    fields = ["name", "source", "mcp_server", "description", "enabled", "requires_approval", "approver"]
    readonly_fields = ["name", "source", "mcp_server", "description"]

    def has_add_permission(self, request):
        return False

    def get_readonly_fields(self, request, obj=None):
        if obj is not None and obj.name == SHELL_TOOL:
            # The engine enforces these for run_shell whatever the row says; offering them would only mislead.
            return [*self.readonly_fields, "requires_approval", "approver"]
        return self.readonly_fields

    def save_model(self, request, obj, form, change):
        # Through the service, which owns the rules of what a policy may say.
        changes = {name: form.cleaned_data[name] for name in form.changed_data}
        if changes:
            tool_policy_update(name=obj.name, **changes, **audit_context(request, source="admin"))

    def delete_model(self, request, obj):
        tool_policy_delete(policy=obj, **audit_context(request, source="admin"))

    def delete_queryset(self, request, queryset):
        for policy in queryset:
            tool_policy_delete(policy=policy, **audit_context(request, source="admin"))

