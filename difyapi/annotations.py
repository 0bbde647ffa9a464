"""Annotation replies (Dify's annotations): stock answers an app gives, without calling its chat model, to a query
whose embedding is close enough to an annotation's question. Owns their reads and writes, the enable/disable job
that embeds every question with the app's embedding config, each worker's in-memory index, and the match and its
record at chat time."""
from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections, transaction
from django.db.models import F, Q
from django.utils import timezone

from agentcore.models import AgentApp, Message
from difyapi.errors import DifyError, invalid_param
from difyapi.models import Annotation, AnnotationHit, AnnotationJob, AnnotationSetting
from difyapi.vectors import VectorIndex, vector_from_bytes, vector_to_bytes
from llmconfigs import factory
from llmconfigs.models import LLMConfig
from llmconfigs.selectors import llm_config_get
from llmconfigs.services import llm_config_record_usage
from opsagent.common.cache import cache_forget, cache_get

logger = logging.getLogger(__name__)

# Bounds of what a client may store: a question is a query (the same bound), an answer a long reply; an app holds
# at most ANNOTATIONS_PER_APP, so that matching stays in milliseconds.
ANSWER_MAX_LENGTH = 100_000
ANNOTATIONS_PER_APP = 5_000
NOT_FOUND = DifyError("not_found", "Annotation not found", 404)
JOB_NOT_FOUND = invalid_param("The job does not exist.")


# ----- reads -----

def annotation_list(*, app: AgentApp, page: int, limit: int, keyword: str = "") -> tuple[list[Annotation], int]:
    """One page of the app's annotations, newest first, filtered by a keyword in the question or the answer; and how
    many match in all."""
    annotations = Annotation.objects.filter(app=app).defer("embedding")
    if keyword:
        annotations = annotations.filter(Q(question__icontains=keyword) | Q(answer__icontains=keyword))
    total = annotations.count()
    start = (page - 1) * limit
    return list(annotations.order_by("-created_at", "-id")[start:start + limit]), total


def annotation_get(*, app: AgentApp, annotation_id: uuid.UUID | str) -> Annotation:
    annotation = Annotation.objects.filter(app=app, pk=annotation_id).defer("embedding").first()
    if annotation is None:
        raise NOT_FOUND
    return annotation


def annotation_setting_get(*, app: AgentApp) -> AnnotationSetting | None:
    return AnnotationSetting.objects.select_related("embedding_config").filter(app=app).first()


def annotation_job_get(*, app: AgentApp, action: str, job_id: uuid.UUID | str) -> AnnotationJob:
    job = AnnotationJob.objects.filter(app=app, action=action, pk=job_id).first()
    if job is None:
        raise JOB_NOT_FOUND
    return job


# ----- writes -----

def _text(value: Any, *, field: str, max_length: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise invalid_param(f"{field} is required")
    if len(value) > max_length:
        raise invalid_param(f"{field} must be at most {max_length} characters")
    return value


def annotation_create(*, app: AgentApp, question: Any, answer: Any, created_by=None) -> Annotation:
    """A new annotation, its question embedded when the app's replies are on (a provider failure leaves it without
    an embedding: it matches once the next enable job has embedded it)."""
    question = _text(question, field="question", max_length=settings.QUERY_MAX_LENGTH)
    answer = _text(answer, field="answer", max_length=ANSWER_MAX_LENGTH)
    embedding, config = _embedding_for(app=app, question=question)
    with transaction.atomic():
        AgentApp.objects.select_for_update().filter(pk=app.pk).first()  # the per-app bound holds under concurrency
        if Annotation.objects.filter(app=app).count() >= ANNOTATIONS_PER_APP:
            raise invalid_param(f"The app has reached its limit of {ANNOTATIONS_PER_APP} annotations.")
        annotation = Annotation.objects.create(app=app, question=question, answer=answer, embedding=embedding,
                                               embedding_config=config, created_by=created_by)
        _index_changed(app=app)
    return annotation


def annotation_update(*, annotation: Annotation, question: Any, answer: Any) -> Annotation:
    """New question and answer; the question re-embedded when it changed (or has no embedding yet)."""
    question = _text(question, field="question", max_length=settings.QUERY_MAX_LENGTH)
    answer = _text(answer, field="answer", max_length=ANSWER_MAX_LENGTH)
    fields = {"question": question, "answer": answer, "updated_at": timezone.now()}
    stored = Annotation.objects.filter(pk=annotation.pk).values("question", "embedding_config_id").first()
    if stored is None:
        raise NOT_FOUND
    setting = annotation_setting_get(app=annotation.app)
    current_config = setting.embedding_config_id if setting and setting.enabled else None
    if stored["question"] != question or (current_config and stored["embedding_config_id"] != current_config):
        embedding, config = _embedding_for(app=annotation.app, question=question)
        fields.update(embedding=embedding, embedding_config=config)
    with transaction.atomic():
        if not Annotation.objects.filter(pk=annotation.pk).update(**fields):
            raise NOT_FOUND
        _index_changed(app=annotation.app)
    annotation.refresh_from_db(fields=["question", "answer", "hit_count", "created_at", "updated_at"])
    return annotation


def annotation_delete(*, annotation: Annotation) -> None:
    """The annotation and its hit history."""
    with transaction.atomic():
        Annotation.objects.filter(pk=annotation.pk).delete()
        _index_changed(app=annotation.app)


def _index_changed(*, app: AgentApp) -> None:
    """Every worker's index of the app is stale from now on (they compare versions at each query)."""
    AnnotationSetting.objects.get_or_create(app=app)
    AnnotationSetting.objects.filter(app=app).update(index_version=F("index_version") + 1)
    annotation_plan_forget(app_id=app.pk)


def _embedding_for(*, app: AgentApp, question: str) -> tuple[bytes | None, LLMConfig | None]:
    setting = annotation_setting_get(app=app)
    if setting is None or not setting.enabled or setting.embedding_config is None:
        return None, None
    config = setting.embedding_config
    try:
        vectors = _embed(config, [question])
    except Exception as exc:  # noqa: BLE001 - any provider fault: the annotation is kept, to be embedded later
        logger.warning("annotation question not embedded with config %s: %s", config.name, _fault(exc))
        return None, None
    return vector_to_bytes(vectors[0]), config


def _embed(config: LLMConfig, texts: Sequence[str]) -> list[list[float]]:
    try:
        vectors = factory.embeddings(config, timeout=settings.ANNOTATION_EMBEDDING_TIMEOUT).embed_documents(
            list(texts))
    except Exception as exc:
        llm_config_record_usage(config_id=config.pk, failed=True, last_error=_fault(exc))
        raise
    llm_config_record_usage(config_id=config.pk)
    return vectors


def _fault(exc: BaseException) -> str:
    """What may be said of a provider failure: its type and HTTP status, never its text (which may echo a key)."""
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__}{f' (HTTP {status})' if status else ''}"


# ----- the enable / disable job -----

def annotation_embedding_config_find(*, provider_name: str, model_name: str) -> LLMConfig | None:
    """The active embedding config Dify's (`embedding_provider_name`, `embedding_model_name`) name: its provider
    (Dify's plugin form `langgenius/openai/openai` is read by its last part) and model name; or, when no config
    matches both, the one config whose name is the model name."""
    provider = provider_name.rsplit("/", 1)[-1].strip().lower()
    configs = LLMConfig.objects.filter(is_embedding=True, is_active=True)
    exact = list(configs.filter(provider=provider, model_name=model_name).order_by("-is_default", "name")[:1])
    if exact:
        return exact[0]
    return configs.filter(name=model_name).first()


def annotation_reply_job_start(*, app: AgentApp, action: str, score_threshold: float, embedding_provider_name: str,
                               embedding_model_name: str, embedding_config: LLMConfig | None = None,
                               background: bool = True) -> tuple[AnnotationJob, bool]:
    """Start enabling or disabling the app's annotation replies, as Dify does: a job that runs in the background and
    reports its status. While one of the same action is still running for the app, that one is returned (and True:
    Dify then says `processing`)."""
    with transaction.atomic():
        AgentApp.objects.select_for_update().filter(pk=app.pk).first()
        unfinished = AnnotationJob.objects.filter(
            app=app, action=action, status__in=[AnnotationJob.Status.WAITING, AnnotationJob.Status.PROCESSING]
        )
        # A job whose process died says nothing for a while: it is over, and must not hold the app's next one.
        unfinished.filter(updated_at__lt=timezone.now() - timedelta(seconds=JOB_STALE_SECONDS)).update(
            status=AnnotationJob.Status.ERROR, error_msg="The job was interrupted.", updated_at=timezone.now())
        running = unfinished.first()
        if running is not None:
            return running, True
        job = AnnotationJob.objects.create(
            app=app, action=action, score_threshold=score_threshold,
            embedding_provider_name=embedding_provider_name[:255], embedding_model_name=embedding_model_name[:255],
            embedding_config=embedding_config,
        )
    if background:
        transaction.on_commit(lambda: _in_thread(job.pk))
    return job, False


def _in_thread(job_id: uuid.UUID) -> None:
    def work() -> None:
        try:
            annotation_reply_job_run(job_id=job_id)
        finally:
            close_old_connections()

    threading.Thread(target=work, name=f"annotation-job-{job_id}", daemon=True).start()


def annotation_reply_job_run(*, job_id: uuid.UUID | str) -> AnnotationJob:
    """Run a waiting job: enabling embeds every question not yet embedded with the chosen config, then switches the
    replies on with its threshold; disabling switches them off. A failure ends the job as `error` with a message
    that names no secret, and changes nothing."""
    if not AnnotationJob.objects.filter(pk=job_id, status=AnnotationJob.Status.WAITING).update(
            status=AnnotationJob.Status.PROCESSING):
        return AnnotationJob.objects.get(pk=job_id)
    job = AnnotationJob.objects.select_related("app", "embedding_config").get(pk=job_id)
    try:
        if job.action == AnnotationJob.Action.ENABLE:
            _enable(job)
        else:
            with transaction.atomic():
                AnnotationSetting.objects.get_or_create(app=job.app)
                AnnotationSetting.objects.filter(app=job.app).update(enabled=False,
                                                                     index_version=F("index_version") + 1)
                annotation_plan_forget(app_id=job.app_id)
    except JobFailed as exc:
        job.status, job.error_msg = AnnotationJob.Status.ERROR, str(exc)
    except Exception as exc:  # noqa: BLE001 - reported in the job's status, as Dify does
        logger.warning("annotation %s job %s failed: %s", job.action, job.pk, _fault(exc))
        job.status, job.error_msg = AnnotationJob.Status.ERROR, f"Annotation {job.action} failed: {_fault(exc)}"
    else:
        job.status = AnnotationJob.Status.COMPLETED
    job.save(update_fields=["status", "error_msg", "updated_at"])
    return job


class JobFailed(Exception):
    """A job that cannot be done, with the reason to report."""


EMBED_BATCH = 100
# A running job touches its row after every batch; one silent for this long was interrupted (its process died).
JOB_STALE_SECONDS = 600


def _enable(job: AnnotationJob) -> None:
    config = job.embedding_config or annotation_embedding_config_find(provider_name=job.embedding_provider_name,
                                                                      model_name=job.embedding_model_name)
    if config is None or not config.is_embedding or not config.is_active:
        raise JobFailed(f"No active embedding config for provider {job.embedding_provider_name!r} and model "
                        f"{job.embedding_model_name!r}.")
    if not 0 <= job.score_threshold <= 1:
        raise JobFailed("score_threshold must be between 0 and 1.")
    pending = Annotation.objects.filter(app=job.app).exclude(embedding_config=config, embedding__isnull=False)
    ids = list(pending.values_list("pk", flat=True))
    for start in range(0, len(ids), EMBED_BATCH):
        rows = list(Annotation.objects.filter(pk__in=ids[start:start + EMBED_BATCH]).values_list("pk", "question"))
        try:
            vectors = _embed(config, [question for _, question in rows])
        except Exception as exc:
            logger.warning("annotation enable job %s: embedding failed: %s", job.pk, _fault(exc))
            raise JobFailed(f"Embedding with config {config.name!r} failed: {_fault(exc)}") from None
        for (pk, question), vector in zip(rows, vectors, strict=True):
            # Only if the question is still the one embedded (an update meanwhile embedded its own).
            Annotation.objects.filter(pk=pk, question=question).update(embedding=vector_to_bytes(vector),
                                                                       embedding_config=config)
        AnnotationJob.objects.filter(pk=job.pk).update(updated_at=timezone.now())
    with transaction.atomic():
        AnnotationSetting.objects.get_or_create(app=job.app)
        AnnotationSetting.objects.filter(app=job.app).update(
            enabled=True, score_threshold=job.score_threshold, embedding_config=config,
            index_version=F("index_version") + 1, updated_at=timezone.now(),
        )
        annotation_plan_forget(app_id=job.app_id)


# ----- at chat time -----

@dataclass(frozen=True)
class ReplyPlan:
    """What a turn needs to look for an annotation: read with the turn's rows, so the match costs no extra hop
    unless the worker's index is stale."""

    app_id: uuid.UUID
    threshold: float
    config: LLMConfig
    version: int


@dataclass(frozen=True)
class AnnotationReply:
    """A query answered by an annotation: the answer, and Dify's `metadata.annotation_reply`."""

    annotation_id: str
    answer: str
    score: float
    metadata: dict[str, Any]


# What a turn needs of the app's reply setting, cached per app: every turn asks, nearly every app has replies off, and
# the setting's query was the largest single cost of a chat turn's preparation. Each write of the setting drops the
# entry (`annotation_plan_forget`: its queryset updates send no signal; the model's signals cover the rest); the TTL
# bounds what another process without a shared cache (Redis) may still hold, as for the app's own cached row.
PLAN_CACHE_TTL = 60
_REPLIES_OFF = "off"


def annotation_plan_cache_key(app_id: uuid.UUID | str) -> str:
    return f"annotation-plan:{app_id}"


def annotation_plan_forget(*, app_id: uuid.UUID | str) -> None:
    """Drop the app's cached reply setting, now and when the transaction commits."""
    cache_forget(annotation_plan_cache_key(app_id))


def annotation_setting_cache_forget(sender, instance: AnnotationSetting, **kwargs) -> None:
    """Receiver of post_save and post_delete of AnnotationSetting (connected in DifyApiConfig.ready)."""
    annotation_plan_forget(app_id=instance.app_id)


def annotation_reply_plan(*, app: AgentApp) -> ReplyPlan | None:
    """The app's reply setting when its replies are on with a usable embedding config (sync)."""
    key = annotation_plan_cache_key(app.pk)
    entry = cache_get(key)
    if entry is None:
        row = AnnotationSetting.objects.filter(app_id=app.pk).values_list(
            "enabled", "score_threshold", "embedding_config_id", "index_version").first()
        on = row is not None and row[0] and row[2] is not None
        entry = (row[1], str(row[2]), row[3]) if on else _REPLIES_OFF
        cache.set(key, entry, PLAN_CACHE_TTL)
    if entry == _REPLIES_OFF:
        return None
    threshold, config_id, version = entry
    # The config from its own cache, whose entries follow every change of a config (an embedding config turned off
    # ends the replies at once).
    config = llm_config_get(config_id=config_id)
    if config is None or not config.is_active:
        return None
    return ReplyPlan(app_id=app.pk, threshold=threshold, config=config, version=version)


# Each worker's index per app: (index version, embedding config id, the index). Replaced whole, never mutated.
_indexes: dict[uuid.UUID, tuple[int, uuid.UUID, VectorIndex]] = {}


def annotation_index(*, plan: ReplyPlan) -> VectorIndex:
    """The app's index for `plan`, built from the database when this worker's copy is stale (sync)."""
    cached = _indexes.get(plan.app_id)
    if cached is not None and cached[0] == plan.version and cached[1] == plan.config.pk:
        return cached[2]
    rows = Annotation.objects.filter(app_id=plan.app_id, embedding_config=plan.config,
                                     embedding__isnull=False).values_list("pk", "embedding")
    index = VectorIndex([(pk, vector_from_bytes(bytes(data))) for pk, data in rows])
    _indexes[plan.app_id] = (plan.version, plan.config.pk, index)
    return index


async def annotation_reply_find(*, plan: ReplyPlan, query: str) -> tuple[uuid.UUID, float] | None:
    """The annotation whose question is closest to `query` when its cosine score reaches the threshold. The query is
    embedded once; if the provider fails, the turn goes on to the model (a warning is logged)."""
    cached = _indexes.get(plan.app_id)
    if cached is not None and cached[0] == plan.version and cached[1] == plan.config.pk and not len(cached[2]):
        return None  # nothing to match: no embedding call
    try:
        embedder = factory.embeddings(plan.config, timeout=settings.ANNOTATION_EMBEDDING_TIMEOUT, max_retries=0)
        vector = await embedder.aembed_query(query)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - an embedding fault never fails the turn
        logger.warning("annotation reply skipped: query not embedded with config %s: %s", plan.config.name,
                       _fault(exc))
        await database_sync_to_async(llm_config_record_usage)(config_id=plan.config.pk, failed=True,
                                                              last_error=_fault(exc))
        return None
    index = await database_sync_to_async(_index_with_usage)(plan)
    match = index.best(vector)
    if match is None or match.score < plan.threshold:
        return None
    return match.key, match.score


def _index_with_usage(plan: ReplyPlan) -> VectorIndex:
    """The query's embedding call counted on its config, and the index: one hop."""
    llm_config_record_usage(config_id=plan.config.pk)
    return annotation_index(plan=plan)


def annotation_reply_record(*, message: Message, annotation_id: uuid.UUID, score: float
                            ) -> AnnotationReply | None:
    """Answer the turn's running message with the annotation: the message ends with its answer, the annotation
    counts a hit, the hit history gets a row; in one transaction. None when the annotation was deleted meanwhile
    (the turn then goes on to the model)."""
    with transaction.atomic():
        annotation = (Annotation.objects.select_for_update(of=("self",)).select_related("created_by", "app")
                      .defer("embedding").filter(pk=annotation_id).first())
        if annotation is None:
            return None
        Annotation.objects.filter(pk=annotation.pk).update(hit_count=F("hit_count") + 1)
        AnnotationHit.objects.create(app_id=annotation.app_id, annotation=annotation, message=message,
                                     question=message.query, score=score)
        Message.objects.filter(pk=message.pk, status=Message.Status.RUNNING).update(
            answer=annotation.answer, status=Message.Status.NORMAL, heartbeat_at=None, latency=0.0,
        )
    return AnnotationReply(annotation_id=str(annotation.pk), answer=annotation.answer, score=score,
                           metadata=annotation_reply_metadata(annotation))


def annotation_reply_metadata(annotation: Annotation) -> dict[str, Any]:
    """Dify's `metadata.annotation_reply`: the annotation and who wrote it. An annotation written through the API
    key has no account: the app stands for it (Dify's key acts for the app's workspace)."""
    user = annotation.created_by
    if user is not None:
        account = {"id": str(user.pk), "name": user.get_username()}
    else:
        account = {"id": str(annotation.app_id), "name": annotation.app.name}
    return {"id": str(annotation.pk), "account": account}


async def annotation_reply_for(*, plan: ReplyPlan | None, message: Message) -> AnnotationReply | None:
    """The annotation reply of a prepared turn, recorded, or None (the model answers)."""
    if plan is None:
        return None
    found = await annotation_reply_find(plan=plan, query=message.query)
    if found is None:
        return None
    annotation_id, score = found
    return await database_sync_to_async(annotation_reply_record)(message=message, annotation_id=annotation_id,
                                                                 score=score)
