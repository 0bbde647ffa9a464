"""The agent's REST endpoints: thin views over the run service (agentcore.runs) and the agent's services/selectors."""
from __future__ import annotations

from asgiref.sync import async_to_sync
from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from agentcore import selectors, services
from agentcore.api import serializers
from agentcore.api.turns import turn_drain, turn_sse
from agentcore.models import AgentApp, Approval, MCPServer, Session
from agentcore.permissions import CHANGE_SESSIONS, DELETE_SESSIONS, VIEW_SESSIONS
from agentcore.runs import ApprovalDecision, TurnRequest, run_stop, turn_prepare
from agentcore.tools.policies import tool_policy_update
from opsagent.common.clients import audit_context
from opsagent.common.permissions import ActionPermissions


def _validated(serializer_class, data) -> dict:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def _app(app_id) -> AgentApp:
    """The app a request names, or without one the default the chat page offers first; never a disabled app."""
    if app_id is None:
        app = selectors.agent_app_default()
        if app is None and not AgentApp.objects.exists():
            app = services.agent_app_seed_demo()  # a first run: the demo app
    else:
        app = AgentApp.objects.filter(pk=app_id, is_active=True).first()
    if app is None:
        raise NotFound("Agent app not found.", code="app_not_found")
    return app


class ChatView(APIView):
    # Chatting in someone else's session needs agentcore.change_session (the run service checks it).
    permission_classes = [ActionPermissions]
    action_permissions = {"post": ()}

    @extend_schema(
        request=serializers.ChatRequestSerializer,
        responses={
            200: OpenApiResponse(
                serializers.ChatResponseSerializer,
                description="Blocking: the answer. Streaming (`text/event-stream`): one JSON event per `data:` line "
                "(run_started, delta, thought, approval_required, usage, error) ending with an `end` event.",
            ),
            400: OpenApiResponse(description="Field errors, e.g. {\"model_config_id\": [\"...\"]}"),
            404: OpenApiResponse(description="Unknown session or app"),
            429: OpenApiResponse(description="Too many active runs for the app"),
        },
    )
    def post(self, request):
        serializer = serializers.ChatRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        session_id = data.get("session_id")
        # A continued session talks to its own app; the engine checks again that the caller may use the session.
        app = self._session(session_id).app if session_id else _app(data.get("app_id"))
        turn = turn_prepare(
            TurnRequest(
                app=app,
                query=data["message"],
                session_id=str(session_id) if session_id else None,
                owner=request.user,
                source=Session.Source.CONSOLE,
                inputs=data["inputs"],
                overrides=serializer.overrides(),
            )
        )
        if data["response_mode"] == "streaming":
            response = StreamingHttpResponse(turn_sse(turn), content_type="text/event-stream")
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"
            return response
        return Response(turn_drain(turn).as_dict())

    def _session(self, session_id) -> Session:
        return selectors.session_get_for(session_id=session_id, owner=self.request.user)


@extend_schema_view(
    list=extend_schema(summary="Your sessions (staff: every session)"),
    create=extend_schema(request=serializers.SessionSerializer),
    partial_update=extend_schema(request=serializers.SessionUpdateSerializer),
    update=extend_schema(request=serializers.SessionUpdateSerializer),
)
class SessionViewSet(viewsets.ModelViewSet):
    """Every user manages their own sessions; other people's need the session model's view, change or delete
    permission (the queryset narrows, so a session out of reach is a 404)."""

    serializer_class = serializers.SessionSerializer
    permission_classes = [ActionPermissions]
    action_permissions = {name: () for name in (
        "list", "retrieve", "create", "update", "partial_update", "destroy", "messages", "tasks")}
    _reach = {"update": CHANGE_SESSIONS, "partial_update": CHANGE_SESSIONS, "destroy": DELETE_SESSIONS}

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return Session.objects.none()
        return selectors.session_list_for(user=self.request.user,
                                          permission=self._reach.get(self.action, VIEW_SESSIONS))

    def get_serializer_class(self):
        if self.action in ("update", "partial_update"):
            return serializers.SessionUpdateSerializer
        return super().get_serializer_class()

    def perform_create(self, serializer):
        data = serializer.validated_data
        serializer.instance = services.session_create(
            app=_app(data.get("app_id")),
            owner=self.request.user,
            name=data.get("name", ""),
            inputs=data.get("inputs") or {},
            llm_config_id=data.get("llm_config_id"),
            model_parameters=data.get("model_parameters") or {},
        )

    def perform_update(self, serializer):
        serializer.instance = services.session_update(session=serializer.instance, **serializer.validated_data)

    def perform_destroy(self, instance):
        services.session_delete(session=instance)

    @extend_schema(responses=serializers.MessageSerializer(many=True))
    @action(detail=True, methods=["get"])
    def messages(self, request, pk=None):
        messages = selectors.message_list(session=self.get_object())
        page = self.paginate_queryset(messages)
        return self.get_paginated_response(serializers.MessageSerializer(page, many=True).data)

    @extend_schema(responses=serializers.TaskSerializer(many=True))
    @action(detail=True, methods=["get"], pagination_class=None)
    def tasks(self, request, pk=None):
        return Response(serializers.TaskSerializer(selectors.task_list(session=self.get_object()), many=True).data)


class ToolViewSet(viewsets.ViewSet):
    permission_classes = [ActionPermissions]
    action_permissions = {"list": (), "partial_update": ("agentcore.change_toolpolicy",)}
    lookup_field = "name"
    lookup_value_regex = r"[^/]+"

    @extend_schema(responses=serializers.ToolSerializer(many=True))
    def list(self, request):
        return Response(serializers.ToolSerializer(selectors.tool_list(), many=True).data)

    @extend_schema(request=serializers.ToolPolicyUpdateSerializer, responses=serializers.ToolSerializer)
    def partial_update(self, request, name=None):
        data = _validated(serializers.ToolPolicyUpdateSerializer, request.data)
        _tool(name)
        tool_policy_update(name=name, **data, **audit_context(request, source="api"))
        return Response(serializers.ToolSerializer(_tool(name)).data)


def _tool(name: str) -> dict:
    tool = next((tool for tool in selectors.tool_list() if tool["name"] == name), None)
    if tool is None:
        raise NotFound("Tool not found.", code="tool_not_found")
    return tool


@extend_schema_view(
    list=extend_schema(
        parameters=[OpenApiParameter("status", str, enum=[choice for choice, _ in Approval.Status.choices])]
    )
)
class ApprovalViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Tool calls waiting for (or given) a decision; deciding resumes the paused run and answers its outcome. Users
    see and decide the approvals of their own sessions; the rest (every session, tools whose approver is staff,
    run_shell) is the run service's permission check."""

    serializer_class = serializers.ApprovalSerializer
    permission_classes = [ActionPermissions]
    action_permissions = {"list": (), "retrieve": (), "approve": (), "reject": ()}

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation: no user
            return Approval.objects.none()
        status_filter = self.request.query_params.get("status") or None
        if status_filter is not None and status_filter not in Approval.Status.values:
            raise ValidationError({"status": [f"One of: {', '.join(Approval.Status.values)}."]})
        return selectors.approval_list(status=status_filter, user=self.request.user)

    @extend_schema(request=serializers.ApprovalDecisionSerializer,
                   responses=serializers.ApprovalDecisionResponseSerializer)
    @action(detail=True, methods=["post"])
    def approve(self, request, pk=None):
        return self._decide(request, "approve")

    @extend_schema(request=serializers.ApprovalDecisionSerializer,
                   responses=serializers.ApprovalDecisionResponseSerializer)
    @action(detail=True, methods=["post"])
    def reject(self, request, pk=None):
        return self._decide(request, "reject")

    def _decide(self, request, decision: str) -> Response:
        data = _validated(serializers.ApprovalDecisionSerializer, request.data)
        approval = self.get_object()
        session = Session.objects.select_related("app").get(id=approval.session_id)
        turn = turn_prepare(
            TurnRequest(
                app=session.app,
                session_id=str(session.id),
                owner=request.user,
                source=session.source,
                end_user=session.end_user,
                approval=ApprovalDecision(approval_id=str(approval.id), decision=decision, comment=data["comment"],
                                          audit=audit_context(request, source="api")),
            )
        )
        result = turn_drain(turn)
        approval = Approval.objects.select_related("decided_by").get(id=approval.id)
        return Response({
            "approval": serializers.ApprovalSerializer(approval).data,
            "message": {"id": result.message_id, "answer": result.text(), "status": result.status},
        })


class MCPServerViewSet(viewsets.ModelViewSet):
    """MCP servers the agent takes tools from, behind the MCP server model's permissions; a stdio server (a command
    line) also needs agentcore.manage_mcp_stdio to be added, changed or tested (the services check it). Env and
    headers are secrets: write-only, read back masked; stdio args are masked too for those who may not manage
    stdio servers."""

    serializer_class = serializers.MCPServerSerializer
    permission_classes = [ActionPermissions]
    action_permissions = {
        "list": ("agentcore.view_mcpserver",),
        "retrieve": ("agentcore.view_mcpserver",),
        "create": ("agentcore.add_mcpserver",),
        "update": ("agentcore.change_mcpserver",),
        "partial_update": ("agentcore.change_mcpserver",),
        "destroy": ("agentcore.delete_mcpserver",),
        "test": ("agentcore.change_mcpserver",),
    }
    queryset = MCPServer.objects.all()

    def perform_create(self, serializer):
        serializer.instance = services.mcp_server_create(**serializer.validated_data,
                                                         **audit_context(self.request, source="api"))

    def perform_update(self, serializer):
        serializer.instance = services.mcp_server_update(
            server=serializer.instance, **serializer.validated_data, **audit_context(self.request, source="api")
        )

    def perform_destroy(self, instance):
        services.mcp_server_delete(server=instance, **audit_context(self.request, source="api"))

    @extend_schema(request=None, responses=serializers.MCPServerTestSerializer)
    @action(detail=True, methods=["post"])
    def test(self, request, pk=None):
        result = services.mcp_server_run_test(server=self.get_object(), **audit_context(request, source="api"))
        return Response(serializers.MCPServerTestSerializer(result).data)


class RunStopView(APIView):
    # Stopping someone else's run needs agentcore.change_session (run_stop checks it).
    permission_classes = [ActionPermissions]
    action_permissions = {"post": ()}

    @extend_schema(request=None, responses=serializers.RunStopResponseSerializer)
    def post(self, request, task_id):
        stopped = async_to_sync(run_stop)(task_id=str(task_id), user=request.user)
        return Response({"result": "success", "stopped": stopped}, status=status.HTTP_200_OK)
