"""opsagent.common.db.statements: the hot-path UPDATE and INSERT written once per shape store what the ORM would."""
from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from agentcore.models import AgentApp, Message
from llmconfigs.models import ProviderCall
from opsagent.common.db.statements import row_update, rows_insert

pytestmark = pytest.mark.django_db


def test_row_update_sets_values_and_adds_increments_in_the_database(plain_user):
    from agentcore.models import Session

    session = Session.objects.create(app=AgentApp.objects.create(name="app"), owner=plain_user, name="s")
    message = Message.objects.create(session=session, query="q", prompt_tokens=5, total_price=Decimal("0.5"),
                                     attempts=[])
    other = Message.objects.create(session=session, query="other", prompt_tokens=5)
    changed = row_update(Message, message.pk,
                         values={"answer": "done", "status": "normal", "attempts": [{"category": ""}],
                                 "heartbeat_at": None, "latency": 1.25},
                         increments={"prompt_tokens": 7, "total_price": Decimal("0.0000125")})
    assert changed == 1
    message.refresh_from_db()
    assert (message.answer, message.status, message.attempts, message.latency) == (
        "done", "normal", [{"category": ""}], 1.25)
    assert message.prompt_tokens == 12 and message.total_price == Decimal("0.5000125")
    other.refresh_from_db()
    assert other.prompt_tokens == 5 and other.answer == ""  # only the row named
    assert row_update(Message, "00000000-0000-0000-0000-000000000000", values={"answer": "x"}) == 0


def test_rows_insert_writes_every_row_as_the_orm_reads_it():
    moment = datetime(2026, 12, 1, 23, 59, 59, 250000, tzinfo=UTC)
    base = dict(created_at=moment, config_id=None, config_name="c", model_name="m", route="r", app_id="",
                app_name="", key_id="", user_id=None, kind="chat", status="ok", error_category="", latency_ms=12.5,
                ttft_ms=None, prompt_tokens=3, completion_tokens=4, cost=Decimal("0.0000031"), currency="USD",
                rollup_batch=None)
    rows_insert(ProviderCall, [base, {**base, "status": "error", "error_category": "timeout", "ttft_ms": 3.5}])
    rows_insert(ProviderCall, [])
    stored = list(ProviderCall.objects.order_by("pk").values(
        "created_at", "status", "error_category", "ttft_ms", "cost", "latency_ms", "prompt_tokens"))
    assert stored == [
        {"created_at": moment, "status": "ok", "error_category": "", "ttft_ms": None, "cost": Decimal("0.0000031"),
         "latency_ms": 12.5, "prompt_tokens": 3},
        {"created_at": moment, "status": "error", "error_category": "timeout", "ttft_ms": 3.5,
         "cost": Decimal("0.0000031"), "latency_ms": 12.5, "prompt_tokens": 3},
    ]


def test_instance_insert_saves_a_new_instance_as_save_would(plain_user):
    from agentcore.models import Session
    from opsagent.common.db.statements import instance_insert

    app = AgentApp.objects.create(name="app")
    session = Session(app=app, owner=plain_user, name="s", inputs={"a": 1})
    instance_insert(session)
    assert not session._state.adding and session.created_at is not None  # auto_now_add applied
    stored = Session.objects.get(pk=session.pk)
    assert (stored.app_id, stored.owner_id, stored.name, stored.inputs, stored.created_at) == (
        app.pk, plain_user.pk, "s", {"a": 1}, session.created_at)
    message = Message(session=session, query="q")
    instance_insert(message)
    assert Message.objects.get(pk=message.pk).task_id == message.task_id
    with pytest.raises(ValueError):
        instance_insert(Session(id=None, app=app, name="x"))
