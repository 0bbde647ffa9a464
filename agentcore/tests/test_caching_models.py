"""Chat models and checkpointers reused or opened ahead by the run service never hide a change from the next run."""
from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from agentcore.events import RunEnd
from agentcore.runs import SaverOpening, TurnRequest, aturn_prepare, turn_run
from agentcore.tests.factories import run_all
from llmconfigs.models import LLMConfig
from llmconfigs.services import llm_config_update
from tests.fakes.upstream import Reply

pytestmark = pytest.mark.django_db(transaction=True)


async def test_an_edited_config_applies_to_the_next_run(chat_app, plain_user, default_llm_config,
                                                         fake_upstream):
    fake_upstream.script(Reply(text="one"), Reply(text="two"), Reply(text="three"))
    await run_all(TurnRequest(app=chat_app, query="first", owner=plain_user))
    first = fake_upstream.chat_requests[-1]
    assert first.body["model"] == "fake-default" and first.api_key == default_llm_config.api_key

    config = await LLMConfig.objects.aget(pk=default_llm_config.pk)
    await database_sync_to_async(llm_config_update)(config=config, api_key="sk-rotated-0000-secretvalue-rotated")
    await run_all(TurnRequest(app=chat_app, query="second", owner=plain_user))
    assert fake_upstream.chat_requests[-1].api_key == "sk-rotated-0000-secretvalue-rotated"

    config = await LLMConfig.objects.aget(pk=default_llm_config.pk)
    await database_sync_to_async(llm_config_update)(config=config, model_name="fake-renamed", temperature=0.1)
    await run_all(TurnRequest(app=chat_app, query="third", owner=plain_user))
    third = fake_upstream.chat_requests[-1]
    assert third.body["model"] == "fake-renamed" and third.body["temperature"] == 0.1


async def test_a_checkpointer_opened_ahead_keeps_the_conversation(chat_app, plain_user, fake_upstream):
    fake_upstream.script(Reply(text="First answer."), Reply(text="Second answer."))
    saver = SaverOpening()
    turn = await aturn_prepare(TurnRequest(app=chat_app, query="one", owner=plain_user))
    events = [e async for e in turn_run(turn, saver=saver)]
    assert isinstance(events[-1], RunEnd) and events[-1].answer == "First answer."
    await saver.aclose()  # already released by the run; closing again is harmless

    saver = SaverOpening()
    turn = await aturn_prepare(TurnRequest(app=chat_app, query="two", owner=plain_user,
                                          session_id=str(turn.session.pk)))
    events = [e async for e in turn_run(turn, saver=saver)]
    assert events[-1].answer == "Second answer."
    contents = [m["content"] for m in fake_upstream.chat_requests[-1].messages]
    assert contents[-3:] == ["one", "First answer.", "two"]


async def test_checkpointers_opened_for_failed_requests_are_released():
    openings = [SaverOpening() for _ in range(SaverOpening.EARLY_LIMIT + 2)]
    for opening in openings:
        await opening.aclose()
    assert SaverOpening._early == 0
    again = SaverOpening()
    assert again._counted  # the next request may open ahead again
    await again.aclose()
