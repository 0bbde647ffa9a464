"""Channels HTTP routes of the Dify API (chat-messages and its stop); everything else goes to Django."""
from django.urls import path, re_path

from difyapi.consumers import ChatMessagesConsumer, ChatStopConsumer

http_urlpatterns = [
    path("v1/chat-messages", ChatMessagesConsumer.as_asgi()),
    re_path(r"^v1/chat-messages/(?P<task_id>[^/]+)/stop$", ChatStopConsumer.as_asgi()),
]
