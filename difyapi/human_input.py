"""Approvals offered through Dify's Human Input protocol (SPEC.md "choices and extensions"): a run paused on tools
that need approval gets one form per approval (`human_input_required`, then `workflow_paused`), read with
GET /v1/form/human_input/{token} and answered with POST, which decides the approval through the run service exactly
as the `approval` extension does. The resumed run's events are streamed by difyapi.workflow_events."""
from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agentcore.events import RunEnd
from agentcore.models import AgentApp, Approval, Message, Session, ToolPolicy
from agentcore.permissions import approval_decision_permissions
from agentcore.runs import ApprovalDecision, Turn, TurnRequest, turn_prepare
from difyapi.chat import dify_error_from
from difyapi.errors import DifyError, bad_request, invalid_param, not_found
from difyapi.events import DifyTurn
from difyapi.models import HumanInputForm
from difyapi.validation import user_from

COMMENT_INPUT = "comment"
COMMENT_MAX_LENGTH = 2000
TOKEN_MAX_LENGTH = 128
ACTIONS = (
    {"id": "approve", "title": "Approve", "button_style": "primary"},
    {"id": "reject", "title": "Reject", "button_style": "default"},
)
# The comment is a paragraph input with no default (Dify's FormInput).
INPUTS = ({"type": "paragraph", "output_variable_name": COMMENT_INPUT, "default": None},)
STAFF_NOTE = ("Only an approver can decide this tool call: it waits in the OpsAgent admin (Approvals). This form "
              "cannot approve or reject it; follow the run to see it resume.")
FORM_NOT_FOUND = not_found("Form not found")
# Where a tool acts, for tools whose arguments name it.
TARGET_ARGUMENTS = ("url", "host", "hostname", "domain", "target")


def _form_submitted(form_id: Any) -> DifyError:
    return DifyError("human_input_form_submitted",
                     f"This form has already been submitted by another user, form_id={form_id}", 412)


def _form_expired(form_id: Any) -> DifyError:
    return DifyError("human_input_form_expired", f"This form has expired, form_id={form_id}", 412)


def _invalid_form_data(message: str) -> DifyError:
    return DifyError("invalid_form_data", message, 400)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def form_decidable_by_end_user(approval: Approval) -> bool:
    """The same rule as the `approval` extension: an end user holds no permission, so a tool whose decision needs
    one (staff approvers, commands on the host) is decided in the admin or REST only."""
    return not approval_decision_permissions(tool=approval.tool, approver=approval.approver)


# ----- what a form shows -----

def _target(approval: Approval, policy: ToolPolicy | None) -> str:
    if policy is not None and policy.mcp_server_id is not None:
        return f"MCP server {policy.mcp_server.name!r}"
    for name in TARGET_ARGUMENTS:
        value = (approval.tool_input or {}).get(name)
        if isinstance(value, str) and value:
            return value
    return "the OpsAgent server"


def form_content(approval: Approval, policy: ToolPolicy | None) -> str:
    """What will run, in Markdown: the tool, where it acts, its arguments (and, for a staff-only tool, who decides)."""
    arguments = json.dumps(approval.tool_input or {}, ensure_ascii=False, indent=2, sort_keys=True)
    lines = [f"The assistant wants to run the tool `{approval.tool}`.", "",
             f"Target: {_target(approval, policy)}", "", "Arguments:", "```json", arguments, "```"]
    if not form_decidable_by_end_user(approval):
        lines += ["", STAFF_NOTE]
    return "\n".join(lines)


def form_actions(approval: Approval) -> list[dict[str, str]]:
    return [dict(action) for action in ACTIONS] if form_decidable_by_end_user(approval) else []


def node_title(approval: Approval) -> str:
    return f"Approve {approval.tool}"[:100]


@dataclass(frozen=True)
class OpenForm:
    """A form just opened: the only moment its token exists in clear."""

    form: HumanInputForm
    approval: Approval
    policy: ToolPolicy | None
    token: str

    def definition(self) -> dict[str, Any]:
        """`data` of `human_input_required` (Dify's HumanInputFormDefinition)."""
        return {
            "form_id": str(self.form.id),
            "node_id": str(self.approval.id),
            "node_title": node_title(self.approval),
            "form_content": form_content(self.approval, self.policy),
            "inputs": [dict(item) for item in INPUTS],
            "actions": form_actions(self.approval),
            "display_in_ui": True,
            "form_token": self.token,
            "resolved_default_values": {},
            "expiration_time": int(self.form.expires_at.timestamp()),
        }


def human_input_forms_open(*, app: AgentApp, end_user: str, approval_ids: list[str]) -> list[OpenForm]:
    """One form per pending approval of a paused run. The form ends with its approval, or after
    DIFY_HUMAN_INPUT_FORM_TTL."""
    approvals = {str(a.pk): a for a in Approval.objects.filter(pk__in=approval_ids, status=Approval.Status.PENDING)}
    policies = {p.name: p for p in ToolPolicy.objects.select_related("mcp_server")
                .filter(name__in={a.tool for a in approvals.values()})}
    expires_at = timezone.now() + timedelta(seconds=settings.DIFY_HUMAN_INPUT_FORM_TTL)
    opened = []
    for approval_id in approval_ids:
        approval = approvals.get(str(approval_id))
        if approval is None:
            continue
        token = secrets.token_urlsafe(32)
        form = HumanInputForm.objects.create(app=app, approval=approval, end_user=end_user,
                                             token_hash=token_hash(token), expires_at=expires_at)
        opened.append(OpenForm(form=form, approval=approval, policy=policies.get(approval.tool), token=token))
    return opened


async def human_input_pause_events(*, dify: DifyTurn, end: RunEnd, app: AgentApp,
                                   end_user: str) -> list[dict[str, Any]]:
    """The events a paused run sends before its `message_end`: `human_input_required` for each approval it waits
    for, then `workflow_paused` (SPEC.md "choices and extensions")."""
    if not end.pending_approvals:
        return []
    forms = await database_sync_to_async(human_input_forms_open)(
        app=app, end_user=end_user, approval_ids=[str(p.get("id")) for p in end.pending_approvals])
    head = {**dify.head, "task_id": dify.task_id, "workflow_run_id": dify.task_id}
    events: list[dict[str, Any]] = [{"event": "human_input_required", **head, "data": open_form.definition()}
                                    for open_form in forms]
    usage = dify.usage
    events.append({"event": "workflow_paused", **head, "data": {
        "workflow_run_id": dify.task_id,
        "paused_nodes": [str(open_form.approval.id) for open_form in forms],
        "outputs": {"answer": end.answer},
        "reasons": [{"type": "human_input_required", "form_id": str(open_form.form.id),
                     "node_id": str(open_form.approval.id)} for open_form in forms],
        "status": "paused",
        "created_at": dify.created_at,
        "elapsed_time": float(usage.latency) if usage is not None else 0.0,
        "total_tokens": usage.total_tokens if usage is not None else 0,
        "total_steps": len(end.pending_approvals),
    }})
    return events


# ----- reading and answering a form -----

def _form_for(*, app: AgentApp, token: str, lock: bool = False) -> HumanInputForm:
    if not isinstance(token, str) or not token or len(token) > TOKEN_MAX_LENGTH:
        raise FORM_NOT_FOUND
    forms = HumanInputForm.objects.select_related("approval__message", "approval__session")
    if lock:
        forms = forms.select_for_update(of=("self",))
    form = forms.filter(token_hash=token_hash(token), app=app).first()
    if form is None:
        raise FORM_NOT_FOUND
    return form


def _check_open(form: HumanInputForm) -> None:
    """A form answers once, while its approval waits and its run is paused, and until it expires."""
    approval = form.approval
    if form.submitted_at is not None:
        raise _form_submitted(form.id)
    if approval.status != Approval.Status.PENDING:
        if approval.decided_by_id is not None or approval.decided_by_end_user:
            raise _form_submitted(form.id)  # decided elsewhere (admin, REST, the `approval` extension)
        raise _form_expired(form.id)  # superseded by a new message in the conversation
    if approval.message.status != Message.Status.PAUSED or form.expires_at <= timezone.now():
        raise _form_expired(form.id)


def human_input_form_get(*, app: AgentApp, token: str) -> dict[str, Any]:
    """The body of GET /v1/form/human_input/{form_token}."""
    form = _form_for(app=app, token=token)
    _check_open(form)
    approval = form.approval
    policy = ToolPolicy.objects.select_related("mcp_server").filter(name=approval.tool).first()
    return {
        "form_content": form_content(approval, policy),
        "inputs": [dict(item) for item in INPUTS],
        "resolved_default_values": {},
        "user_actions": form_actions(approval),
        "expiration_time": int(form.expires_at.timestamp()),
    }


@dataclass(frozen=True)
class FormAnswer:
    """A validated POST /v1/form/human_input/{form_token} body."""

    user: str
    action: str
    comment: str


def form_answer_from(payload: dict[str, Any]) -> FormAnswer:
    """Dify's body schema first (`inputs`, `action` and `user` required); the form's own rules come later."""
    inputs = payload.get("inputs")
    if not isinstance(inputs, dict):
        raise invalid_param("inputs is required" if inputs is None else "inputs must be an object")
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise invalid_param("action is required" if action is None else "action must be a string")
    user = user_from(payload.get("user"))
    comment = inputs.get(COMMENT_INPUT, "")
    if comment is None:
        comment = ""
    if not isinstance(comment, str):
        raise _invalid_form_data(f"{COMMENT_INPUT} must be a string")
    if len(comment) > COMMENT_MAX_LENGTH:
        raise _invalid_form_data(f"{COMMENT_INPUT} must be at most {COMMENT_MAX_LENGTH} characters")
    unknown = sorted(set(inputs) - {COMMENT_INPUT})
    if unknown:
        raise _invalid_form_data(f"Unknown inputs: {', '.join(map(str, unknown))[:200]}")
    return FormAnswer(user=user, action=action, comment=comment)


@dataclass(frozen=True)
class FormSubmission:
    """An accepted answer: the resumed turn (its rows written) and the `human_input_form_filled` data."""

    turn: Turn
    filled: dict[str, Any]


def human_input_form_submit(*, app: AgentApp, token: str, answer: FormAnswer,
                            audit: dict[str, Any]) -> FormSubmission:
    """Decide the form's approval and resume its run, in one transaction with the form's single use: a refusal at
    any step leaves the form, the approval and the message as they were."""
    with transaction.atomic():
        form = _form_for(app=app, token=token, lock=True)
        if form.end_user != answer.user:
            raise FORM_NOT_FOUND  # another end user of the app: the form is not theirs to see
        _check_open(form)
        approval = form.approval
        if not form_decidable_by_end_user(approval):
            raise bad_request("Form recipient type is invalid: only an approver can decide this tool call, in the "
                              "OpsAgent admin.")
        actions = {action["id"]: action for action in form_actions(approval)}
        if answer.action not in actions:
            raise _invalid_form_data(f"Invalid action: {answer.action[:40]!r}; expected one of {sorted(actions)}")
        request = TurnRequest(
            app=app, session_id=str(approval.session_id), end_user=answer.user, source=Session.Source.API,
            approval=ApprovalDecision(approval_id=str(approval.pk), decision=answer.action, comment=answer.comment,
                                      audit=audit),
        )
        try:
            turn = turn_prepare(request)
        except Exception as exc:
            raise dify_error_from(exc, app=app) from exc
        form.submitted_at = timezone.now()
        form.action = answer.action
        form.save(update_fields=["submitted_at", "action"])
    policy = ToolPolicy.objects.select_related("mcp_server").filter(name=approval.tool).first()
    rendered = form_content(approval, policy) + f"\n\nDecision: {actions[answer.action]['title']}"
    if answer.comment:
        rendered += f"\n\nComment: {answer.comment}"
    filled = {
        "node_id": str(approval.pk),
        "node_title": node_title(approval),
        "rendered_content": rendered,
        "action_id": answer.action,
        "action_text": actions[answer.action]["title"],
        "submitted_data": {COMMENT_INPUT: answer.comment},
    }
    return FormSubmission(turn=turn, filled=filled)
