"""Channels HTTP routes of /v1: the Dify API's chat-messages, completion-messages and their stops, the Human Input
form and the workflow events stream, and the OpenAI-compatible chat completions; everything else goes to Django."""
from django.urls import path, re_path

from difyapi.consumers import ChatMessagesConsumer, ChatStopConsumer, CompletionMessagesConsumer, CompletionStopConsumer
from difyapi.openai.consumers import ChatCompletionsConsumer
from difyapi.workflow_events import HumanInputFormConsumer, WorkflowEventsConsumer

http_urlpatterns = [
    path("v1/chat-messages", ChatMessagesConsumer.as_asgi()),
    path("v1/chat/completions", ChatCompletionsConsumer.as_asgi()),
    re_path(r"^v1/chat-messages/(?P<task_id>[^/]+)/stop$", ChatStopConsumer.as_asgi()),
    path("v1/completion-messages", CompletionMessagesConsumer.as_asgi()),
    re_path(r"^v1/completion-messages/(?P<task_id>[^/]+)/stop$", CompletionStopConsumer.as_asgi()),
    re_path(r"^v1/form/human_input/(?P<form_token>[^/]+)$", HumanInputFormConsumer.as_asgi()),
    re_path(r"^v1/workflow/(?P<workflow_run_id>[^/]+)/events$", WorkflowEventsConsumer.as_asgi()),
]
