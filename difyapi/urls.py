"""URLs of the Dify Service API under /v1 (mounted by opsagent.urls); chat-messages and stop are routed to Channels
consumers by difyapi.routing before Django sees them. Anything else under /v1 gets the Dify 404 envelope."""
from django.urls import path, re_path

from difyapi import annotation_views, views

urlpatterns = [
    path("", views.index, name="dify-index"),
    path("info", views.app_info, name="dify-info"),
    path("parameters", views.app_parameters, name="dify-parameters"),
    path("meta", views.app_meta, name="dify-meta"),
    path("site", views.app_site, name="dify-site"),
    path("models", views.app_models, name="dify-models"),
    path("messages", views.message_list, name="dify-messages"),
    path("messages/<uuid:message_id>/feedbacks", views.message_feedback, name="dify-message-feedback"),
    path("messages/<uuid:message_id>/suggested", views.message_suggested, name="dify-message-suggested"),
    path("app/feedbacks", views.app_feedbacks, name="dify-app-feedbacks"),
    path("conversations", views.conversation_list, name="dify-conversations"),
    path("conversations/<uuid:conversation_id>", views.conversation_detail, name="dify-conversation"),
    path("conversations/<uuid:conversation_id>/name", views.conversation_rename, name="dify-conversation-name"),
    path(
        "conversations/<uuid:conversation_id>/variables",
        views.conversation_variables,
        name="dify-conversation-variables",
    ),
    path(
        "conversations/<uuid:conversation_id>/variables/<uuid:variable_id>",
        views.conversation_variable_update,
        name="dify-conversation-variable",
    ),
    path("end-users/<uuid:end_user_id>", views.end_user_detail, name="dify-end-user"),
    path("files/upload", views.file_upload, name="dify-file-upload"),
    path("files/<uuid:file_id>/preview", views.file_preview, name="dify-file-preview"),
    path("files/<uuid:file_id>/file-preview", views.file_signed_preview, name="dify-file-signed-preview"),
    path("audio-to-text", views.audio_to_text, name="dify-audio-to-text"),
    path("text-to-audio", views.text_to_audio, name="dify-text-to-audio"),
    path("apps/annotations", annotation_views.annotation_list, name="dify-annotations"),
    path("apps/annotations/<uuid:annotation_id>", annotation_views.annotation_detail, name="dify-annotation"),
    path("apps/annotation-reply/<str:action>", annotation_views.annotation_reply_action,
         name="dify-annotation-reply"),
    path("apps/annotation-reply/<str:action>/status/<uuid:job_id>", annotation_views.annotation_reply_status,
         name="dify-annotation-reply-status"),
    re_path(r"^(?P<path>.*)$", views.not_found_view, name="dify-not-found"),
]
