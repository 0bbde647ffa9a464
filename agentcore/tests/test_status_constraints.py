"""Every status column holds one of its model's choices: the database refuses anything else, even from a write that
bypasses Python (a bulk update, raw SQL, another client)."""
import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from agentcore.models import AgentApp, Approval, Message, Session, Task, Thought

pytestmark = pytest.mark.django_db


def _refused(write) -> bool:
    try:
        with transaction.atomic():
            write()
    except IntegrityError:
        return True
    return False


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
    assert _refused(lambda: model.objects.filter(pk=row.pk).update(status="bogus", **extra))
    assert model.objects.get(pk=row.pk).status == row.status
    for value in model.Status.values:
        extra = {"decided_at": None if value == "pending" else timezone.now()} if model is Approval else {}
        assert not _refused(lambda value=value, extra=extra: model.objects.filter(pk=row.pk).update(status=value,
                                                                                                    **extra))
