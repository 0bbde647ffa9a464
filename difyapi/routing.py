"""Channels HTTP routes of the Dify API (the streaming chat endpoint); everything else goes to Django."""

http_urlpatterns = []
