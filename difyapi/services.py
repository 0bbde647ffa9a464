"""Writes of the Dify adapter: end users, conversation renames and deletes, feedback, uploaded files, app keys."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.db import IntegrityError, transaction
from django.db.models import Count, Sum
from django.utils import timezone

from agentcore.errors import InvalidInput
from agentcore.generation import session_generate_name
from agentcore.limits import Meter
from agentcore.models import AgentApp, Message, Session
from agentcore.services import agent_app_created_record
from difyapi import filetypes
from difyapi.auth import api_key_create
from difyapi.errors import DifyError, invalid_param
from difyapi.models import ApiKey, EndUser, Feedback, UploadFile
from opsagent.common.client_input import text_problem


def end_user_get_or_create(*, app: AgentApp, user: str) -> EndUser:
    """The EndUser for the `user` string a client sent, scoped to `app` (race-safe: the unique constraint decides)."""
    existing = EndUser.objects.filter(app=app, session_id=user).first()
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            return EndUser.objects.create(app=app, session_id=user)
    except IntegrityError:
        return EndUser.objects.get(app=app, session_id=user)


# ----- conversations -----

def conversation_rename(*, session: Session, name: str) -> Session:
    session.name = name
    session.save(update_fields=["name", "updated_at"])
    return session


def conversation_generate_name(*, session: Session, meter: Meter | None = None) -> Session:
    """Rename from the first message with the conversation's model. Dify answers a conversation without messages
    with an uncaught service error: 400 invalid_param with an empty message."""
    try:
        name = session_generate_name(session=session, meter=meter)
    except InvalidInput:
        raise invalid_param("") from None
    return conversation_rename(session=session, name=name)


def conversation_delete(*, session: Session) -> None:
    """Soft delete: the conversation disappears from every /v1 read; its rows stay for the admin."""
    Session.objects.filter(pk=session.pk, is_deleted=False).update(is_deleted=True, deleted_at=timezone.now())


# ----- feedback -----

def message_feedback_submit(
    *, message: Message, end_user: EndUser, rating: str | None, content: str = ""
) -> Feedback | None:
    """Dify's like/dislike/null semantics: a rating creates or replaces the end user's feedback on the message,
    null removes it (400 when there is none to remove). One user feedback per message is a DB constraint."""
    for attempt in range(2):
        try:
            with transaction.atomic():
                return _feedback_write(message=message, end_user=end_user, rating=rating, content=content)
        except IntegrityError:
            # A concurrent request created the row between our read and insert: the retry updates it.
            if attempt:
                raise
    return None


def _feedback_write(*, message: Message, end_user: EndUser, rating: str | None, content: str) -> Feedback | None:
    existing = (
        Feedback.objects.select_for_update().filter(message=message, from_source=Feedback.FromSource.USER).first()
    )
    if rating is None:
        if existing is None:
            raise invalid_param("rating cannot be None when feedback not exists")
        existing.delete()
        return None
    if existing is not None:
        existing.rating, existing.content, existing.end_user = rating, content, end_user
        existing.save(update_fields=["rating", "content", "end_user", "updated_at"])
        return existing
    return Feedback.objects.create(
        app_id=message.session.app_id,
        session_id=message.session_id,
        message=message,
        rating=rating,
        content=content,
        from_source=Feedback.FromSource.USER,
        end_user=end_user,
    )


# ----- files -----

MB = 1024 * 1024


@dataclass(frozen=True)
class FileKind:
    type: str
    size_limit_mb: int


def file_kind(extension: str) -> FileKind | None:
    """The Dify file type of an extension and its size limit; None for types OpsAgent does not accept."""
    if extension in filetypes.IMAGE_EXTENSIONS:
        return FileKind("image", settings.UPLOAD_IMAGE_FILE_SIZE_LIMIT_MB)
    if extension in filetypes.DOCUMENT_EXTENSIONS:
        return FileKind("document", settings.UPLOAD_FILE_SIZE_LIMIT_MB)
    return None


def file_extension(filename: str) -> str:
    return filename.rsplit(".", 1)[-1].lower() if "." in filename else ""


def _file_head(uploaded: UploadedFile) -> bytes:
    uploaded.seek(0)
    head = uploaded.read(filetypes.SNIFF_BYTES)
    uploaded.seek(0)
    return head


def upload_file_create(*, app: AgentApp, end_user: EndUser, uploaded: UploadedFile) -> UploadFile:
    """Validate and store one uploaded file under MEDIA_ROOT with Dify's checks and error codes (SPEC.md §8), within
    the end user's and the app's upload quotas. Its type is sniffed from its bytes: the client's declared type
    (required, as in Dify) and its name never decide how the file is served."""
    filename = uploaded.name or ""
    if not uploaded.content_type:
        raise DifyError("unsupported_file_type", "File type not allowed.", 415)
    if not filename:
        raise DifyError("filename_not_exists_error", "The specified filename does not exist.", 400)
    if "/" in filename or "\\" in filename or text_problem(filename) is not None:
        raise invalid_param("Filename contains invalid characters")
    extension = file_extension(filename)
    kind = file_kind(extension)
    if kind is None:
        raise DifyError("unsupported_file_type", "File type not allowed.", 415)
    if uploaded.size > kind.size_limit_mb * MB:
        message = f"File size exceeded. {kind.type.capitalize()} files may be at most {kind.size_limit_mb} MB."
        raise DifyError("file_too_large", message, 413)
    mime_type = filetypes.sniff_mime_type(_file_head(uploaded), extension=extension)
    if mime_type is None:
        raise DifyError("unsupported_file_type", "File type not allowed.", 415)
    upload = UploadFile(
        app=app, end_user=end_user, name=filename[:255], size=uploaded.size, extension=extension, mime_type=mime_type,
    )
    upload.file.save(filename, uploaded, save=False)
    try:
        with transaction.atomic():
            upload.save()
            _upload_quota_check(upload)
    except Exception:
        upload.file.delete(save=False)  # no orphaned bytes when the row could not be written or was over quota
        raise
    return upload


def _upload_quota_check(upload: UploadFile) -> None:
    """Refuse (rolling back the new row) an upload that takes its end user or its app over a quota in the window.

    Race-free on both databases: the row is written first, so SQLite (one writer at a time) holds its write lock
    while counting; on PostgreSQL the app row lock orders concurrent uploads of the app, and each counts after the
    ones before it committed. So of two uploads racing for the last slot, the second always sees the first."""
    AgentApp.objects.select_for_update().filter(pk=upload.app_id).first()
    since = timezone.now() - timedelta(seconds=settings.UPLOAD_QUOTA_WINDOW_SECONDS)
    recent = UploadFile.objects.filter(app_id=upload.app_id, created_at__gte=since)
    for scope, rows, max_files, max_mb in (
        ("end user", recent.filter(end_user_id=upload.end_user_id), settings.UPLOAD_QUOTA_USER_FILES,
         settings.UPLOAD_QUOTA_USER_MB),
        ("app", recent, settings.UPLOAD_QUOTA_APP_FILES, settings.UPLOAD_QUOTA_APP_MB),
    ):
        used = rows.aggregate(files=Count("pk"), size=Sum("size"))
        if (max_files and used["files"] > max_files) or (max_mb and (used["size"] or 0) > max_mb * MB):
            bounds = " and ".join(bound for bound in (max_files and f"{max_files} files", max_mb and f"{max_mb} MB")
                                  if bound)
            raise DifyError(
                "rate_limit_error",
                f"Upload quota exceeded: this {scope} may upload at most {bounds} per "
                f"{settings.UPLOAD_QUOTA_WINDOW_SECONDS} seconds.",
                429,
            )


# ----- apps and keys -----

def app_get_or_create_with_key(*, name: str, mode: str, raw_key: str | None = None) -> tuple[AgentApp, str, bool]:
    """The app named `name` (created with `mode` if missing) and a key for it: `raw_key` exactly and idempotently,
    else a new one. Returns (app, plaintext key, app_created). Raises ValueError for a mode mismatch or a bad key."""
    if mode not in AgentApp.Mode.values:
        raise ValueError(f"mode must be one of {', '.join(AgentApp.Mode.values)}.")
    with transaction.atomic():
        app, created = AgentApp.objects.get_or_create(name=name, defaults={"mode": mode})
        if created:
            agent_app_created_record(app=app, source="command")
        if app.mode != mode:
            raise ValueError(f"App {name!r} already exists with mode {app.mode!r}.")
        _, raw = api_key_create(app=app, raw_key=raw_key, name="create_app", source="command")
    return app, raw, created


def dify_seed_demo_key(*, app: AgentApp) -> str | None:
    """Give the demo app its first API key and return the plaintext (shown once); None when it already has one."""
    with transaction.atomic():
        AgentApp.objects.select_for_update().filter(pk=app.pk).first()  # serialises concurrent seeds of this app
        if ApiKey.objects.filter(app=app, revoked_at__isnull=True).exists():
            return None
        _, raw = api_key_create(app=app, name="seed", source="command")
    return raw
