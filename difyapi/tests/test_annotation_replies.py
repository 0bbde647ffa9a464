"""Annotation replies in POST /v1/chat-messages: a query close enough to an annotation's question is answered with
the stored answer and no chat model call (blocking and streaming, in Dify's shapes), the message and the annotation
record the hit; a miss, or an embedding provider that fails, goes on to the model."""
from __future__ import annotations

import json
import logging
import time

import pytest
from asgiref.sync import sync_to_async

from agentcore.models import Message
from difyapi.annotations import annotation_create, annotation_reply_job_run, annotation_reply_job_start
from difyapi.models import Annotation, AnnotationHit
from difyapi.tests.factories import make_app_with_key
from difyapi.tests.openapi import assert_schema
from tests.e2e.dify_servers import data_events, dify_post
from tests.fakes.upstream import Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_worker_connections")]

QUESTION = "How do I restart nginx?"
ANSWER = "Run `systemctl restart nginx`, then check `systemctl status nginx`."
# cosine(QUESTION, CLOSE) = 0.96, cosine(QUESTION, FAR) = 0.6
VECTORS = {QUESTION: [1.0, 0.0, 0.0], "nginx restart please": [0.96, 0.28, 0.0], "what is the weather": [0.6, 0.8, 0.0]}
CLOSE, FAR = "nginx restart please", "what is the weather"


def body(query: str, **fields):
    return {"inputs": {}, "query": query, "user": "alice", "auto_generate_name": False, **fields}


def _replying_app(mode: str, threshold: float) -> tuple:
    app, key = make_app_with_key(name=f"ops-{mode}", mode=mode)
    job, _ = annotation_reply_job_start(app=app, action="enable", score_threshold=threshold,
                                        embedding_provider_name="openai", embedding_model_name="embed-small",
                                        background=False)
    assert annotation_reply_job_run(job_id=job.pk).status == "completed"
    annotation = annotation_create(app=app, question=QUESTION, answer=ANSWER)
    return app, key, annotation


@pytest.fixture
def replying(default_llm_config, make_llm_config, fake_upstream):
    """make(mode, threshold): an app whose replies are on, with one annotation (embedded)."""
    make_llm_config(name="vectors", is_embedding=True, provider="openai", model_name="embed-small")
    fake_upstream.embedding_vectors.update(VECTORS)

    async def make(mode: str = "chat", threshold: float = 0.9):
        made = await sync_to_async(_replying_app)(mode, threshold)
        fake_upstream.requests.clear()
        return made

    return make


async def post(key: str, payload: dict) -> tuple[int, bytes]:
    status, _, raw = await dify_post(key, "/v1/chat-messages", payload)
    return status, raw


async def test_a_close_query_is_answered_by_the_annotation_without_the_model(replying, fake_upstream):
    app, key, annotation = await replying()
    status, raw = await post(key, body(CLOSE, response_mode="blocking"))
    assert status == 200, raw
    data = assert_schema(json.loads(raw), "ChatCompletionResponse")
    assert data["answer"] == ANSWER and data["event"] == "message" and data["mode"] == "chat"
    assert data["metadata"]["annotation_reply"] == {"id": str(annotation.pk),
                                                    "account": {"id": str(app.pk), "name": app.name}}
    assert data["metadata"]["usage"]["total_tokens"] == 0 and data["metadata"]["retriever_resources"] == []
    assert not fake_upstream.chat_requests
    assert [r.body["input"] for r in fake_upstream.embedding_requests] == [[CLOSE]]  # the query, once

    message = await Message.objects.aget(pk=data["message_id"])
    assert (message.status, message.answer, message.query) == ("normal", ANSWER, CLOSE)
    hit = await AnnotationHit.objects.aget(message=message)
    assert hit.annotation_id == annotation.pk and hit.question == CLOSE and hit.score == pytest.approx(0.96, abs=2e-3)
    assert (await Annotation.objects.aget(pk=annotation.pk)).hit_count == 1


async def test_a_streamed_hit_is_message_events_then_message_end_with_the_annotation(replying, fake_upstream):
    for mode in ("chat", "agent-chat"):
        app, key, annotation = await replying(mode)
        status, raw = await post(key, body(CLOSE, response_mode="streaming"))
        assert status == 200
        events = data_events(raw)  # strict SSE framing
        *messages, end = events
        assert {e["event"] for e in messages} == {"message"}, mode  # Dify's direct output, in agent-chat too
        assert "".join(e["answer"] for e in messages) == ANSWER and len(messages) == len(ANSWER)
        for event in messages:
            assert_schema(event, "StreamEventChatMessage")
        assert end["event"] == "message_end"
        assert_schema(end, "StreamEventChatMessageEnd")
        assert end["metadata"]["annotation_reply"]["id"] == str(annotation.pk)
        assert len({(e["conversation_id"], e["message_id"], e["task_id"], e["created_at"]) for e in events}) == 1
        assert not fake_upstream.chat_requests
        message = await Message.objects.aget(pk=end["message_id"])
        assert (message.status, message.answer) == ("normal", ANSWER)


async def test_a_query_under_the_threshold_goes_to_the_model(replying, fake_upstream):
    _, key, annotation = await replying(threshold=0.9)
    fake_upstream.script(Reply(text="It is sunny."))
    status, raw = await post(key, body(FAR, response_mode="blocking"))
    data = json.loads(raw)
    assert status == 200 and data["answer"] == "It is sunny." and data["metadata"]["annotation_reply"] is None
    assert len(fake_upstream.chat_requests) == 1
    assert (await Annotation.objects.aget(pk=annotation.pk)).hit_count == 0
    assert not await AnnotationHit.objects.aexists()


async def test_the_threshold_is_the_apps(replying, fake_upstream):
    _, key, _ = await replying(threshold=0.5)
    status, raw = await post(key, body(FAR, response_mode="blocking"))
    assert json.loads(raw)["answer"] == ANSWER and not fake_upstream.chat_requests


async def test_an_embedding_failure_lets_the_model_answer(replying, fake_upstream, caplog):
    _, key, _ = await replying()
    fake_upstream.script_embeddings(Reply(status=500, error_message="embedding backend down"))
    fake_upstream.script(Reply(text="From the model."))
    with caplog.at_level(logging.WARNING, logger="difyapi.annotations"):
        status, raw = await post(key, body(CLOSE, response_mode="blocking"))
    data = json.loads(raw)
    assert status == 200 and data["answer"] == "From the model." and data["metadata"]["annotation_reply"] is None
    assert any("annotation reply skipped" in r.getMessage() for r in caplog.records)
    assert not any("sk-test" in r.getMessage() for r in caplog.records)


async def test_replies_off_embed_nothing(default_llm_config, fake_upstream):
    app, key = await sync_to_async(make_app_with_key)(name="plain", mode="chat")
    await sync_to_async(annotation_create)(app=app, question=QUESTION, answer=ANSWER)
    status, raw = await post(key, body(QUESTION, response_mode="blocking"))
    assert status == 200 and json.loads(raw)["answer"] == "Hello from the fake upstream."
    assert not fake_upstream.embedding_requests


async def test_questions_are_embedded_once_and_each_query_once(replying, fake_upstream):
    _, key, _ = await replying()
    for _ in range(3):
        status, raw = await post(key, body(CLOSE, response_mode="blocking"))
        assert json.loads(raw)["answer"] == ANSWER
    assert [r.body["input"] for r in fake_upstream.embedding_requests] == [[CLOSE]] * 3


async def test_a_deleted_annotation_stops_answering(replying, fake_upstream):
    _, key, annotation = await replying()
    await post(key, body(CLOSE, response_mode="blocking"))  # the worker's index now holds the annotation
    from difyapi.annotations import annotation_delete

    await sync_to_async(annotation_delete)(annotation=annotation)
    status, raw = await post(key, body(CLOSE, response_mode="blocking"))
    assert json.loads(raw)["answer"] == "Hello from the fake upstream."
    assert len(fake_upstream.chat_requests) == 1


async def test_the_model_remembers_an_annotated_exchange(replying, fake_upstream):
    _, key, _ = await replying()
    status, raw = await post(key, body(CLOSE, response_mode="blocking"))
    conversation_id = json.loads(raw)["conversation_id"]
    fake_upstream.script(Reply(text="You asked about nginx."))
    status, raw = await post(key, body(FAR, response_mode="blocking", conversation_id=conversation_id))
    assert json.loads(raw)["answer"] == "You asked about nginx."
    sent = [(m["role"], m["content"]) for m in fake_upstream.chat_requests[-1].messages if m["role"] != "system"]
    assert sent == [("user", CLOSE), ("assistant", ANSWER), ("user", FAR)]


async def test_a_hanging_embedding_provider_times_out_and_the_model_answers(replying, fake_upstream, settings):
    _, key, _ = await replying()
    settings.ANNOTATION_EMBEDDING_TIMEOUT = 0.5
    fake_upstream.script_embeddings(Reply(hang=5))
    fake_upstream.script(Reply(text="From the model."))
    started = time.monotonic()
    status, raw = await post(key, body(CLOSE, response_mode="blocking"))
    assert status == 200 and json.loads(raw)["answer"] == "From the model."
    assert time.monotonic() - started < 4


# The app's reply setting is cached for the turns (difyapi.annotations.annotation_reply_plan): every change of it
# reaches the next turn.

async def test_replies_turned_on_after_a_turn_answer_the_next_one(default_llm_config, make_llm_config, fake_upstream):
    make_config = sync_to_async(make_llm_config)
    await make_config(name="vectors", is_embedding=True, provider="openai", model_name="embed-small")
    fake_upstream.embedding_vectors.update(VECTORS)
    app, key = await sync_to_async(make_app_with_key)(name="later", mode="chat")
    await sync_to_async(annotation_create)(app=app, question=QUESTION, answer=ANSWER)
    status, raw = await post(key, body(CLOSE, response_mode="blocking"))  # replies off: the model answers
    assert json.loads(raw)["answer"] == "Hello from the fake upstream."

    job, _ = await sync_to_async(annotation_reply_job_start)(
        app=app, action="enable", score_threshold=0.9, embedding_provider_name="openai",
        embedding_model_name="embed-small", background=False)
    assert (await sync_to_async(annotation_reply_job_run)(job_id=job.pk)).status == "completed"
    status, raw = await post(key, body(CLOSE, response_mode="blocking"))
    assert json.loads(raw)["answer"] == ANSWER
    assert len(fake_upstream.chat_requests) == 1


async def test_replies_turned_off_stop_answering_at_once(replying, fake_upstream):
    app, key, _ = await replying()
    status, raw = await post(key, body(CLOSE, response_mode="blocking"))
    assert json.loads(raw)["answer"] == ANSWER
    job, _ = await sync_to_async(annotation_reply_job_start)(
        app=app, action="disable", score_threshold=0.9, embedding_provider_name="", embedding_model_name="",
        background=False)
    assert (await sync_to_async(annotation_reply_job_run)(job_id=job.pk)).status == "completed"
    status, raw = await post(key, body(CLOSE, response_mode="blocking"))
    assert json.loads(raw)["answer"] == "Hello from the fake upstream."
    assert len(fake_upstream.chat_requests) == 1


async def test_an_embedding_config_turned_off_or_a_setting_deleted_ends_the_replies(replying, fake_upstream):
    from difyapi.models import AnnotationSetting
    from llmconfigs.models import LLMConfig
    from llmconfigs.services import llm_config_activate, llm_config_deactivate

    app, key, _ = await replying()
    assert json.loads((await post(key, body(CLOSE, response_mode="blocking")))[1])["answer"] == ANSWER
    config = await LLMConfig.objects.aget(name="vectors")
    await sync_to_async(llm_config_deactivate)(config=config)
    assert json.loads((await post(key, body(CLOSE, response_mode="blocking")))[1])["answer"] != ANSWER

    await sync_to_async(llm_config_activate)(config=config)
    assert json.loads((await post(key, body(CLOSE, response_mode="blocking")))[1])["answer"] == ANSWER
    setting = await AnnotationSetting.objects.aget(app=app)
    await sync_to_async(setting.delete)()  # as the admin deletes it
    assert json.loads((await post(key, body(CLOSE, response_mode="blocking")))[1])["answer"] != ANSWER
