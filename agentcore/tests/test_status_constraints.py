"""Every status column holds one of its model's choices: the database refuses anything else, even from a write that
bypasses Python (a bulk update, raw SQL, another client)."""
import pytest
from django.utils import timezone

from agentcore.models import AgentApp, Approval, Message, Session, Task, Thought
from tests.fixtures import refused_by_database

pytestmark = pytest.mark.django_db


@pytest.fixture
def rows():
    session = Session.objects.create(app=AgentApp.objects.create(name="constraints"))
    message = Message.objects.create(session=session, query="q")
    thought = Thought.objects.create(message=message, position=1)
    approval = Approval.objects.create(session=session, message=message, thought=thought, tool="run_shell")
    task = Task.objects.create(session=session, title="look")
    return {Message: message, Thought: thought, Approval: approval, Task: task}


@pytest.mark.parametrize("model", [Message, Thought, Approval, Task], ids=lambda model: model.__name__)
def test_a_status_outside_the_choices_is_refused_by_the_database(rows, model):
    row = rows[model]
    extra = {"decided_at": timezone.now()} if model is Approval else {}  # its other constraint is not the one tested
    assert refused_by_database(lambda: model.objects.filter(pk=row.pk).update(status="bogus", **extra))
    assert model.objects.get(pk=row.pk).status == row.status
    for value in model.Status.values:
        extra = {"decided_at": None if value == "pending" else timezone.now()} if model is Approval else {}
        same_row = model.objects.filter(pk=row.pk)
        assert not refused_by_database(lambda rows=same_row, value=value, extra=extra: rows.update(status=value,
                                                                                                    **extra))
