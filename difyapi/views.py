"""Django views of the Dify Service API except chat-messages and stop (those are Channels consumers): history,
feedback, suggestions, conversations, files, app metadata, models, audio stubs, and the /v1 404 fallback."""
from __future__ import annotations

import functools
import html
import logging
from collections.abc import AsyncIterator, Callable

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFilesSent
from django.core.handlers.asgi import ASGIRequest
from django.http import FileResponse, HttpRequest, HttpResponse
from django.http.multipartparser import MultiPartParser, MultiPartParserError
from django.views.decorators.csrf import csrf_exempt

from agentcore.generation import message_suggested_questions
from agentcore.limits import OverLimit, usage_check
from agentcore.models import AgentApp
from difyapi import filetypes, presenters, selectors, services
from difyapi.annotations import annotation_reply_plan
from difyapi.auth import authenticate
from difyapi.chat import app_mode_check
from difyapi.errors import (
    INTERNAL,
    DifyError,
    bad_request,
    invalid_param,
    not_found,
    over_limit,
    request_too_large,
    unexpected_error,
)
from difyapi.presenters import dify_json_response
from difyapi.validation import (
    DEFAULT_USER,
    bool_from,
    choice_from,
    int_from,
    limit_from,
    optional_user_from,
    query_dict,
    request_json,
    str_from,
    user_from,
    uuid_from,
)
from opsagent.common.clients import client_ip

logger = logging.getLogger(__name__)

# What GET /v1/ reports: the Dify release whose Service API wire format OpsAgent speaks.
SERVER_VERSION = "1.9.1"
NOT_FOUND_MESSAGE = (
    "The requested URL was not found on the server. If you entered the URL manually please check your spelling "
    "and try again."
)
FILE_NOT_FOUND = DifyError("file_not_found", "The requested file was not found.", 404)
RATINGS = ("like", "dislike")
# The last page of /app/feedbacks anyone may ask for (Dify's own bound on paged logs): the offset stays far inside
# what a database integer holds.
FEEDBACK_PAGE_MAX = 99_999


def dify_endpoint(*methods: str, authenticated: bool = True) -> Callable:
    """A /v1 view: CSRF-exempt (Bearer API), 405 envelope for other methods, the app key checked (the view gets the
    app as its second argument), every error in the Dify envelope and never a traceback."""
    allowed = set(methods) | ({"HEAD"} if "GET" in methods else set())

    def decorate(view: Callable) -> Callable:
        @csrf_exempt
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            try:
                if request.method not in allowed:
                    raise DifyError(
                        "method_not_allowed", "The method is not allowed for the requested URL.", 405,
                        headers={"Allow": ", ".join(sorted(allowed))},
                    )
                if authenticated:
                    context = authenticate(request.META.get("HTTP_AUTHORIZATION"), client_ip=client_ip(request))
                    request.dify_context = context
                    return view(request, context.app, *args, **kwargs)
                return view(request, *args, **kwargs)
            except DifyError as exc:
                return exc.response()
            except RequestDataTooBig:
                # Form fields beside an upload's file over DATA_UPLOAD_MAX_MEMORY_SIZE (opsagent.common.limits refuses
                # larger bodies before they get here).
                return request_too_large(settings.DATA_UPLOAD_MAX_MEMORY_SIZE).response()
            except Exception as exc:
                error = unexpected_error(exc)
                if error is INTERNAL:
                    logger.exception("unhandled error in %s", view.__name__)
                return error.response()

        return wrapper

    return decorate


def _base_url(request: HttpRequest) -> str:
    return request.build_absolute_uri("/").rstrip("/")


@csrf_exempt
def not_found_view(request: HttpRequest, path: str = "") -> HttpResponse:
    """Any /v1 path OpsAgent does not serve: Werkzeug's 404 in the Dify envelope."""
    return not_found(NOT_FOUND_MESSAGE).response()


@dify_endpoint("GET", authenticated=False)
def index(request: HttpRequest) -> HttpResponse:
    return dify_json_response({"welcome": "Dify OpenAPI", "api_version": "v1", "server_version": SERVER_VERSION})


# ----- app metadata -----

@dify_endpoint("GET")
def app_info(request: HttpRequest, app: AgentApp) -> HttpResponse:
    return dify_json_response(presenters.app_info_to_dify(app))


@dify_endpoint("GET")
def app_parameters(request: HttpRequest, app: AgentApp) -> HttpResponse:
    parameters = presenters.app_parameters_to_dify(app, upload=selectors.app_file_upload(app=app))
    parameters["annotation_reply"] = {"enabled": annotation_reply_plan(app=app) is not None}
    return dify_json_response(parameters)


@dify_endpoint("GET")
def app_meta(request: HttpRequest, app: AgentApp) -> HttpResponse:
    return dify_json_response(presenters.app_meta_to_dify(selectors.app_tool_names(app=app)))


@dify_endpoint("GET")
def app_site(request: HttpRequest, app: AgentApp) -> HttpResponse:
    return dify_json_response(presenters.app_site_to_dify(app))


@dify_endpoint("GET")
def app_models(request: HttpRequest, app: AgentApp) -> HttpResponse:
    models = selectors.app_models(app=app)
    # "object": "list" makes the body OpenAI's model list too (the items carry OpenAI's fields beside their own).
    return dify_json_response({"object": "list",
                               "data": [presenters.model_to_dify(config, is_default) for config, is_default in models]})


# ----- messages, feedback, suggestions -----

@dify_endpoint("GET")
def message_list(request: HttpRequest, app: AgentApp) -> HttpResponse:
    query = query_dict(request)
    user = optional_user_from(query.get("user"))
    app_mode_check(app)
    if "conversation_id" not in query:
        raise invalid_param("conversation_id is required")
    limit = limit_from(query.get("limit"))
    first_id = uuid_from(query.get("first_id"), field="first_id")
    conversation_id = uuid_from(query.get("conversation_id"), field="conversation_id")
    if conversation_id is None:
        # Dify's quirk: an empty conversation_id lists nothing rather than failing.
        return dify_json_response({"limit": limit, "has_more": False, "data": []})
    session = selectors.conversation_get(app=app, user=user, conversation_id=conversation_id)
    page = selectors.message_list(session=session, first_id=first_id, limit=limit)
    base_url = _base_url(request)
    data = [
        presenters.message_to_dify(
            message,
            feedback=message.user_feedbacks[0] if message.user_feedbacks else None,
            base_url=base_url,
        )
        for message in page.items
    ]
    return dify_json_response({"limit": limit, "has_more": page.has_more, "data": data})


@dify_endpoint("POST")
def message_feedback(request: HttpRequest, app: AgentApp, message_id) -> HttpResponse:
    body = request_json(request)
    user = user_from(body.get("user"))
    rating = body.get("rating")
    if rating is not None and rating not in RATINGS:
        raise invalid_param("rating must be one of the following: ['like', 'dislike', null]")
    content = str_from(body.get("content"), field="content", max_length=settings.FEEDBACK_CONTENT_MAX_LENGTH)
    message = selectors.message_get(app=app, user=user, message_id=message_id)
    end_user = services.end_user_get_or_create(app=app, user=user)
    services.message_feedback_submit(message=message, end_user=end_user, rating=rating, content=content)
    return dify_json_response({"result": "success"})


@dify_endpoint("GET")
def app_feedbacks(request: HttpRequest, app: AgentApp) -> HttpResponse:
    query = query_dict(request)
    page = int_from(query.get("page"), field="page", default=1, minimum=1, maximum=FEEDBACK_PAGE_MAX)
    limit = limit_from(query.get("limit"), maximum=101)
    feedbacks = selectors.feedback_list(app=app, page=page, limit=limit)
    return dify_json_response({"data": [presenters.feedback_to_dify(feedback) for feedback in feedbacks]})


@dify_endpoint("GET")
def message_suggested(request: HttpRequest, app: AgentApp, message_id) -> HttpResponse:
    user = user_from(query_dict(request).get("user"))
    app_mode_check(app)
    message = selectors.message_get(app=app, user=user, message_id=message_id)
    if not app.suggested_questions_after_answer:
        raise bad_request("Suggested Questions Is Disabled.")
    meter = request.dify_context.meter
    try:
        usage_check(meter=meter)
    except OverLimit as exc:
        raise over_limit(exc) from None
    return dify_json_response({"result": "success",
                               "data": message_suggested_questions(message=message, meter=meter)})


# ----- conversations -----

@dify_endpoint("GET")
def conversation_list(request: HttpRequest, app: AgentApp) -> HttpResponse:
    query = query_dict(request)
    user = optional_user_from(query.get("user"))
    app_mode_check(app)
    last_id = uuid_from(query.get("last_id"), field="last_id")
    limit = limit_from(query.get("limit"))
    sort_by = choice_from(query.get("sort_by"), field="sort_by", choices=selectors.CONVERSATION_SORTS,
                          default="-updated_at")
    page = selectors.conversation_list(app=app, user=user, last_id=last_id, limit=limit, sort_by=sort_by)
    data = [presenters.conversation_to_dify(session) for session in page.items]
    return dify_json_response({"limit": limit, "has_more": page.has_more, "data": data})


@dify_endpoint("GET", "DELETE")
def conversation_detail(request: HttpRequest, app: AgentApp, conversation_id) -> HttpResponse:
    """GET (the previous OpsAgent API's read, kept for its clients: an item of GET /v1/conversations) and DELETE."""
    if request.method == "DELETE":
        return _conversation_delete(request, app, conversation_id)
    user = optional_user_from(query_dict(request).get("user"))
    app_mode_check(app)
    session = selectors.conversation_get(app=app, user=user, conversation_id=conversation_id)
    return dify_json_response(presenters.conversation_to_dify(session))


def _conversation_delete(request: HttpRequest, app: AgentApp, conversation_id) -> HttpResponse:
    user = optional_user_from(request_json(request).get("user"))
    app_mode_check(app)
    session = selectors.conversation_get(app=app, user=user, conversation_id=conversation_id)
    services.conversation_delete(session=session)
    return HttpResponse(status=204)


@dify_endpoint("POST")
def conversation_rename(request: HttpRequest, app: AgentApp, conversation_id) -> HttpResponse:
    body = request_json(request)
    user = optional_user_from(body.get("user"))
    app_mode_check(app)
    auto_generate = bool_from(body.get("auto_generate"), field="auto_generate", default=False)
    name = str_from(body.get("name"), field="name", max_length=255).strip()
    if not auto_generate and not name:
        raise invalid_param("name is required when auto_generate is false")
    session = selectors.conversation_get(app=app, user=user, conversation_id=conversation_id)
    if auto_generate:
        try:
            usage_check(meter=request.dify_context.meter)
        except OverLimit as exc:
            raise over_limit(exc) from None
        session = services.conversation_generate_name(session=session, meter=request.dify_context.meter)
    else:
        session = services.conversation_rename(session=session, name=name)
    return dify_json_response(presenters.conversation_to_dify(session))


VARIABLE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dify_endpoint("GET")
def conversation_variables(request: HttpRequest, app: AgentApp, conversation_id) -> HttpResponse:
    query = query_dict(request)
    user = optional_user_from(query.get("user"))
    app_mode_check(app)
    last_id = uuid_from(query.get("last_id"), field="last_id")
    limit = limit_from(query.get("limit"))
    variable_name = query.get("variable_name")
    if variable_name is not None and not (
        1 <= len(variable_name) <= 255 and set(variable_name) <= VARIABLE_NAME_CHARS
    ):
        raise invalid_param("variable_name must be 1-255 characters of letters, digits, '_', '.' or '-'")
    selectors.conversation_get(app=app, user=user, conversation_id=conversation_id)
    if last_id is not None:
        # Conversation variables exist only in Chatflow apps: no id can name one here (Dify: 400, empty message).
        raise invalid_param("")
    return dify_json_response({"limit": limit, "has_more": False, "data": []})


@dify_endpoint("PUT")
def conversation_variable_update(request: HttpRequest, app: AgentApp, conversation_id, variable_id) -> HttpResponse:
    body = request_json(request)
    user = optional_user_from(body.get("user"))
    app_mode_check(app)
    if "value" not in body:
        raise invalid_param("value is required")
    selectors.conversation_get(app=app, user=user, conversation_id=conversation_id)
    # Conversation variables exist only in Chatflow apps, which OpsAgent does not serve: no id names one here.
    raise not_found(selectors.CONVERSATION_VARIABLE_NOT_FOUND)


# ----- end users -----

@dify_endpoint("GET")
def end_user_detail(request: HttpRequest, app: AgentApp, end_user_id) -> HttpResponse:
    end_user = selectors.end_user_get(app=app, end_user_id=end_user_id)
    return dify_json_response(presenters.end_user_to_dify(end_user, default_user=DEFAULT_USER))


# ----- files -----

class UploadParser(MultiPartParser):
    """Django silently strips path separators from upload names; Dify refuses such names (400 invalid_param), so
    this parser remembers whether any name had one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.had_path_separator = False

    def sanitize_file_name(self, file_name):
        unescaped = html.unescape(file_name)
        if "/" in unescaped or "\\" in unescaped:
            self.had_path_separator = True
        return super().sanitize_file_name(file_name)


def _multipart(request: HttpRequest):
    """(form fields, files) of a multipart request; empty for any other content type (Dify: no file uploaded)."""
    if request.content_type != "multipart/form-data":
        return request.POST, request.FILES
    parser = UploadParser(request.META, request, request.upload_handlers, request.encoding)
    try:
        form, files = parser.parse()
    except TooManyFilesSent:
        raise DifyError("too_many_files", "Only one file is allowed.", 400) from None
    except MultiPartParserError:
        raise bad_request("The browser (or proxy) sent a request that this server could not understand.") from None
    if parser.had_path_separator:
        raise invalid_param("Filename contains invalid characters")
    return form, files


@dify_endpoint("POST")
def file_upload(request: HttpRequest, app: AgentApp) -> HttpResponse:
    form, files = _multipart(request)
    if "file" not in files:
        raise DifyError("no_file_uploaded", "Please upload your file.", 400)
    if sum(len(files.getlist(key)) for key in files) > 1:
        raise DifyError("too_many_files", "Only one file is allowed.", 400)
    user = optional_user_from(form.get("user"))
    end_user = services.end_user_get_or_create(app=app, user=user)
    upload = services.upload_file_create(app=app, end_user=end_user, uploaded=files["file"])
    return dify_json_response(presenters.upload_file_to_dify(upload, base_url=_base_url(request)), status=201)


# Clients' files are served from the service's own origin: should a browser ever treat one as a document, it gets
# no script, no plugin, no requests and no same-origin access to the admin.
FILE_CONTENT_SECURITY_POLICY = "sandbox; default-src 'none'; frame-ancestors 'none'"


def _file_response(request: HttpRequest, upload, *, as_attachment: bool) -> HttpResponse:
    """The bytes of an upload: inline only for a safe raster image (unless a download is asked for), an attachment
    otherwise, never with a type the upload's sniffing did not produce."""
    content_type, may_be_inline = filetypes.served_type(upload.mime_type)
    try:
        handle = upload.file.open("rb")
    except FileNotFoundError:
        raise FILE_NOT_FOUND from None
    response = FileResponse(handle, as_attachment=as_attachment or not may_be_inline, filename=upload.name,
                            content_type=content_type)
    if isinstance(request, ASGIRequest):
        # Under ASGI Django reads a synchronous file iterator whole into memory before sending it: stream it instead
        # (the headers stay those FileResponse derived from the file, which it still closes).
        response.streaming_content = _file_chunks(handle, FileResponse.block_size * 16)
    response["Content-Length"] = str(upload.size)
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = FILE_CONTENT_SECURITY_POLICY
    return response


async def _file_chunks(handle, size: int) -> AsyncIterator[bytes]:
    read = sync_to_async(handle.read, thread_sensitive=False)
    while chunk := await read(size):
        yield chunk


@dify_endpoint("GET")
def file_preview(request: HttpRequest, app: AgentApp, file_id) -> HttpResponse:
    query = query_dict(request)
    as_attachment = bool_from(query.get("as_attachment"), field="as_attachment", default=False)
    upload = selectors.upload_file_get(app=app, file_id=file_id)
    if upload is None:
        raise FILE_NOT_FOUND
    return _file_response(request, upload, as_attachment=as_attachment)


@dify_endpoint("GET", authenticated=False)
def file_signed_preview(request: HttpRequest, file_id) -> HttpResponse:
    """The signed URL given in upload answers and message_files: no key, but a fresh valid signature."""
    query = query_dict(request)
    valid = presenters.file_signature_valid(
        file_id=str(file_id), timestamp=query.get("timestamp", ""), nonce=query.get("nonce", ""),
        sign=query.get("sign", ""),
    )
    if not valid:
        raise DifyError("forbidden", "Invalid request.", 403)
    upload = selectors.upload_file_get(file_id=file_id)
    if upload is None:
        raise FILE_NOT_FOUND
    as_attachment = bool_from(query.get("as_attachment"), field="as_attachment", default=False)
    return _file_response(request, upload, as_attachment=as_attachment)


# ----- audio: Dify's own "not supported" answers -----

@dify_endpoint("POST")
def audio_to_text(request: HttpRequest, app: AgentApp) -> HttpResponse:
    if "file" not in request.FILES:
        raise DifyError("no_audio_uploaded", "Please upload your audio.", 400)
    raise DifyError("provider_not_support_speech_to_text", "Provider not support speech to text.", 400)


@dify_endpoint("POST")
def text_to_audio(request: HttpRequest, app: AgentApp) -> HttpResponse:
    request_json(request)
    raise invalid_param("TTS is not enabled")

