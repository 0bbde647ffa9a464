"""Small one-shot generations with an app's model: conversation names and suggested follow-up questions."""
from __future__ import annotations

import json
import logging
import time

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from agentcore.errors import InvalidInput
from agentcore.limits import Meter, usage_record
from agentcore.models import Message, Session
from agentcore.selectors import app_pool_resolve
from llmconfigs.errors import LLMConfigError, ProviderCallError
from llmconfigs.factory import chat_model, provider_error
from llmconfigs.models import CallKind, LLMConfig
from llmconfigs.pricing import usage_cost
from llmconfigs.routing import FAILOVER_CATEGORIES, provider_failure_record
from llmconfigs.services import llm_config_record_usage
from llmconfigs.usage import CallOrigin, CallRecord, provider_calls_record

logger = logging.getLogger(__name__)

# One-shot helpers must not hold a request for the full agent timeout.
GENERATION_TIMEOUT = 30.0
NAME_MAX_LENGTH = 75
FALLBACK_NAME_LENGTH = 47
SUGGESTED_QUESTIONS_COUNT = 3
HISTORY_TURNS = 3

NAME_PROMPT = (
    "You give conversations short titles. Read the user's first message and reply with a title of at most ten "
    "words, in the same language as the message. Reply with the title only: no quotes, no trailing punctuation."
)
SUGGEST_PROMPT = (
    "Predict the three questions the user is most likely to ask next, each under 20 words and in the same language "
    "as the assistant's latest answer. Reply with a JSON array of three strings and nothing else, for example "
    '["question 1", "question 2", "question 3"].'
)


def session_fallback_name(query: str) -> str:
    """The one shortened-query name of a conversation: a new session's name until its model names it, and the name
    when the model cannot. Dify's rule (SPEC.md §2, `auto_generate_name`): a query longer than 47 characters becomes
    its first 47 characters + "..."; whitespace runs are folded first, so the name stays on one line."""
    query = " ".join(query.split())
    return query if len(query) <= FALLBACK_NAME_LENGTH else query[:FALLBACK_NAME_LENGTH] + "..."


def _session_pool(session: Session) -> list[LLMConfig]:
    return app_pool_resolve(app=session.app, session_config_id=session.llm_config_id)


def _complete(pool: list[LLMConfig], messages: list[BaseMessage], *, meter: Meter, kind: str,
              session: Session) -> str:
    """One non-streaming call, by the first member of the pool that answers; every call is counted on its config,
    charged to `meter` (the app's and the key's usage) and recorded as a `kind` call (llmconfigs.usage). Provider
    failures come back as ProviderCallError with the key scrubbed."""
    error = ProviderCallError("unavailable", "No model is available.")
    origin = CallOrigin(app_id=str(session.app_id), app_name=session.app.name, key_id=meter.key_id,
                        user_id=session.owner_id)
    for index, config in enumerate(pool):
        call = CallRecord(config=config, kind=kind)
        error = _complete_with(config, messages, meter=meter, retries=index == len(pool) - 1, call=call)
        provider_calls_record(calls=[call], origin=origin)
        if isinstance(error, str):
            return error
        if error.category not in FAILOVER_CATEGORIES:
            break
    raise error


def _complete_with(config: LLMConfig, messages: list[BaseMessage], *, meter: Meter, retries: bool,
                   call: CallRecord) -> str | ProviderCallError:
    """The answer of `config`, or its failure (recorded on the config, as the run records its own), measured into
    `call`. Without `retries` the SDK does not retry: the next member is the retry."""
    model = chat_model(config, streaming=False, timeout=GENERATION_TIMEOUT, max_retries=None if retries else 0)
    started = time.monotonic()
    try:
        reply = model.invoke(messages)
    except Exception as exc:  # any provider/transport failure: classify it, never leak the key
        error = provider_error(exc, api_key=config.api_key)
        call.error_category = error.category
    else:
        usage = reply.usage_metadata or {}
        prompt, completion = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
        call.prompt_tokens, call.completion_tokens = prompt, completion
        cost = usage_cost(input_price_per_million=config.input_price_per_million,
                          output_price_per_million=config.output_price_per_million, currency=config.currency,
                          prompt_tokens=prompt, completion_tokens=completion)
        llm_config_record_usage(config_id=config.pk, prompt_tokens=prompt, completion_tokens=completion,
                                cost=cost.total_price)
        usage_record(meter=meter, tokens=prompt + completion, cost=cost.total_price)
        call.latency_ms = round((time.monotonic() - started) * 1000, 1)
        return reply.content if isinstance(reply.content, str) else str(reply.content)
    call.latency_ms = round((time.monotonic() - started) * 1000, 1)
    provider_failure_record(config=config, error=error)
    return error


def _clean_name(text: str) -> str:
    line = next((part for part in text.strip().splitlines() if part.strip()), "")
    name = line.strip().strip("\"'“”‘’「」`").strip().rstrip(".。")
    return name if len(name) <= NAME_MAX_LENGTH else name[:NAME_MAX_LENGTH] + "..."


def session_generate_name(*, session: Session, meter: Meter | None = None) -> str:
    """A title for `session` generated by its model from its first query; the shortened query if the model fails.
    The call is charged to `meter` (default: the session's app). Raises InvalidInput when the session has no message
    to name it from."""
    first = session.messages.order_by("created_at", "id").only("query").first()
    if first is None:
        raise InvalidInput("The conversation has no messages to name it from.")
    try:
        name = _clean_name(_complete(_session_pool(session), [SystemMessage(NAME_PROMPT), HumanMessage(first.query)],
                                     meter=meter or Meter.of_app(session.app), kind=CallKind.TITLE, session=session))
    except (LLMConfigError, ProviderCallError) as exc:
        logger.warning("conversation name generation failed for session %s: %s", session.pk, exc)
        name = ""
    return name or session_fallback_name(first.query)


def _parse_questions(text: str) -> list[str]:
    start, end = text.find("["), text.rfind("]")
    if start == -1 or end <= start:
        return []
    try:
        items = json.loads(text[start : end + 1])
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    questions = [item.strip() for item in items if isinstance(item, str) and item.strip()]
    return questions[:SUGGESTED_QUESTIONS_COUNT]


def message_suggested_questions(*, message: Message, meter: Meter | None = None) -> list[str]:
    """Follow-up questions after `message`, generated by its conversation's model from the latest turns and charged
    to `meter` (default: the conversation's app); [] when the model fails or answers with something that is not a
    JSON list of strings."""
    session = message.session
    turns = list(
        session.messages.filter(created_at__lte=message.created_at)
        .order_by("-created_at", "-id")
        .only("query", "answer")[:HISTORY_TURNS]
    )
    history: list[BaseMessage] = [SystemMessage(SUGGEST_PROMPT)]
    for turn in reversed(turns):
        history.append(HumanMessage(turn.query))
        if turn.answer:
            history.append(AIMessage(turn.answer))
    history.append(HumanMessage("Now list the three likely follow-up questions as a JSON array."))
    try:
        return _parse_questions(_complete(_session_pool(session), history, meter=meter or Meter.of_app(session.app),
                                          kind=CallKind.SUGGESTION, session=session))
    except (LLMConfigError, ProviderCallError) as exc:
        logger.warning("suggested questions failed for message %s: %s", message.pk, exc)
        return []
