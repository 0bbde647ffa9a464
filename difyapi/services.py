"""Writes of the Dify adapter: end users, files, feedback, keys."""
from __future__ import annotations

from django.db import IntegrityError, transaction

from agentcore.models import AgentApp
from difyapi.models import EndUser


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
