"""The annotation endpoints of the Dify Service API (SPEC.md §12, Dify's `annotation.py`): list, create, update and
delete an app's annotations; enable or disable its annotation replies (a job) and read the job's status."""
from __future__ import annotations

import math
from typing import Any

from django.http import HttpRequest, HttpResponse

from agentcore.models import AgentApp
from difyapi import annotations
from difyapi.errors import invalid_param
from difyapi.models import Annotation, AnnotationJob
from difyapi.presenters import dify_json_response
from difyapi.validation import int_from, query_dict, request_json, str_from
from difyapi.views import dify_endpoint

# Dify caps `limit` at 100 rather than refusing more (its document: "Requests above 100 are capped at 100").
LIMIT_CAP = 100
PAGE_MAX = 99_999
KEYWORD_MAX_LENGTH = 255
NAME_MAX_LENGTH = 255


def annotation_to_dify(annotation: Annotation) -> dict[str, Any]:
    """Dify's annotation fields."""
    return {
        "id": str(annotation.pk),
        "question": annotation.question,
        "answer": annotation.answer,
        "hit_count": annotation.hit_count,
        "created_at": int(annotation.created_at.timestamp()),
    }


@dify_endpoint("GET", "POST")
def annotation_list(request: HttpRequest, app: AgentApp) -> HttpResponse:
    if request.method == "POST":
        body = request_json(request)
        annotation = annotations.annotation_create(app=app, question=body.get("question"),
                                                   answer=body.get("answer"))
        return dify_json_response(annotation_to_dify(annotation), status=201)
    query = query_dict(request)
    page = int_from(query.get("page"), field="page", default=1, minimum=1, maximum=PAGE_MAX)
    limit = min(int_from(query.get("limit"), field="limit", default=20, minimum=1), LIMIT_CAP)
    keyword = str_from(query.get("keyword"), field="keyword", max_length=KEYWORD_MAX_LENGTH)
    items, total = annotations.annotation_list(app=app, page=page, limit=limit, keyword=keyword)
    return dify_json_response({
        "data": [annotation_to_dify(annotation) for annotation in items],
        "has_more": len(items) == limit,
        "limit": limit,
        "total": total,
        "page": page,
    })


@dify_endpoint("PUT", "DELETE")
def annotation_detail(request: HttpRequest, app: AgentApp, annotation_id) -> HttpResponse:
    annotation = annotations.annotation_get(app=app, annotation_id=annotation_id)
    if request.method == "DELETE":
        annotations.annotation_delete(annotation=annotation)
        return HttpResponse(status=204)
    body = request_json(request)
    annotation = annotations.annotation_update(annotation=annotation, question=body.get("question"),
                                               answer=body.get("answer"))
    return dify_json_response(annotation_to_dify(annotation))


def _required_text(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if value is None:
        raise invalid_param(f"{field} is required")
    return str_from(value, field=field, max_length=NAME_MAX_LENGTH)


def _score_threshold(value: Any) -> float:
    if value is None:
        raise invalid_param("score_threshold is required")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise invalid_param("score_threshold must be a number")
    try:
        number = float(value)
    except ValueError:
        raise invalid_param("score_threshold must be a number") from None
    if not math.isfinite(number) or not 0 <= number <= 1:
        raise invalid_param("score_threshold must be between 0 and 1")
    return number


@dify_endpoint("POST")
def annotation_reply_action(request: HttpRequest, app: AgentApp, action: str) -> HttpResponse:
    # As Dify: the body is checked first, and for `disable` too.
    body = request_json(request)
    score_threshold = _score_threshold(body.get("score_threshold"))
    provider_name = _required_text(body, "embedding_provider_name")
    model_name = _required_text(body, "embedding_model_name")
    if action not in AnnotationJob.Action.values:
        raise invalid_param("Unsupported annotation reply action")
    job, running = annotations.annotation_reply_job_start(
        app=app, action=action, score_threshold=score_threshold, embedding_provider_name=provider_name,
        embedding_model_name=model_name,
    )
    return dify_json_response({"job_id": str(job.pk), "job_status": "processing" if running else job.status})


@dify_endpoint("GET")
def annotation_reply_status(request: HttpRequest, app: AgentApp, action: str, job_id) -> HttpResponse:
    job = annotations.annotation_job_get(app=app, action=action, job_id=job_id)
    return dify_json_response({"job_id": str(job.pk), "job_status": job.status,
                               "error_msg": job.error_msg if job.status == AnnotationJob.Status.ERROR else ""})
