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


def _provider_call(**changes):
    row = dict(created_at=datetime(2026, 12, 1, tzinfo=UTC), config_id=None, config_name="c", model_name="m",
               route="r", app_id="", app_name="", key_id="", user_id=None, kind="chat", status="ok",
               error_category="", latency_ms=1.0, ttft_ms=None, prompt_tokens=1, completion_tokens=1,
               cost=Decimal("0"), currency="USD", rollup_batch=None)
    return {**row, **changes}


def test_writes_together_go_out_in_one_statement_on_postgresql_and_store_what_each_would(plain_user):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from agentcore.models import Session
    from opsagent.common.db.statements import statements_together

    session = Session.objects.create(app=AgentApp.objects.create(name="app"), owner=plain_user, name="s")
    message = Message.objects.create(session=session, query="q", prompt_tokens=5)
    with CaptureQueriesContext(connection) as sent:
        with statements_together():
            assert row_update(Message, message.pk, values={"answer": "done"}, increments={"prompt_tokens": 2}) is None
            rows_insert(ProviderCall, [_provider_call(config_name="first"), _provider_call(config_name="second")])
            assert not sent.captured_queries  # nothing before the block ends
    writes = [q["sql"] for q in sent.captured_queries if q["sql"].split()[0] in ("WITH", "UPDATE", "INSERT")]
    assert len(writes) == (1 if connection.vendor == "postgresql" else 2)
    message.refresh_from_db()
    assert (message.answer, message.prompt_tokens) == ("done", 7)
    assert sorted(ProviderCall.objects.values_list("config_name", flat=True)) == ["first", "second"]


@pytest.mark.django_db(transaction=True)
def test_writes_together_are_all_or_nothing(plain_user):
    from django.db import IntegrityError

    from agentcore.models import Session
    from opsagent.common.db.statements import statements_together

    session = Session.objects.create(app=AgentApp.objects.create(name="app"), owner=plain_user, name="s")
    message = Message.objects.create(session=session, query="q")
    with pytest.raises(IntegrityError), statements_together():
        row_update(Message, message.pk, values={"answer": "done"})
        rows_insert(ProviderCall, [_provider_call(config_name=None)])  # NOT NULL
    message.refresh_from_db()
    assert message.answer == ""
    assert not ProviderCall.objects.exists()
    with pytest.raises(ZeroDivisionError), statements_together():  # a block that raises sends nothing
        row_update(Message, message.pk, values={"answer": "never"})
        raise ZeroDivisionError
    message.refresh_from_db()
    assert message.answer == ""
