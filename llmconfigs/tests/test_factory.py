"""The factory against the real fake upstream: what reaches the provider, per provider and per override, and what
its errors carry (never the key)."""
import openai
import pytest

from llmconfigs.errors import InvalidParameter, ProviderCallError
from llmconfigs.factory import chat_model, provider_error, provider_exception_scrubbed
from tests.fakes.upstream import Reply

pytestmark = pytest.mark.django_db


def test_chat_model_sends_model_key_and_parameters_to_base_url(make_llm_config, fake_upstream):
    config = make_llm_config(model_name="gpt-fake", temperature=0.3, top_p=0.9, max_tokens=123)
    fake_upstream.script(Reply(text="pong"))

    answer = chat_model(config, streaming=False).invoke("ping")

    assert answer.content == "pong"
    sent = fake_upstream.chat_requests[-1]
    assert sent.body["model"] == "gpt-fake"
    assert sent.api_key == config.api_key
    assert sent.body["temperature"] == 0.3
    assert sent.body["top_p"] == 0.9
    assert sent.body["max_completion_tokens"] == 123


def test_compatible_providers_get_max_tokens_under_its_classic_name(make_llm_config, fake_upstream):
    config = make_llm_config(provider="deepseek", max_tokens=55)
    chat_model(config, streaming=False).invoke("ping")
    sent = fake_upstream.chat_requests[-1].body
    assert sent["max_tokens"] == 55
    assert "max_completion_tokens" not in sent


def test_overrides_win_and_streaming_asks_for_usage(make_llm_config, fake_upstream):
    config = make_llm_config(provider="deepseek", temperature=0.3)
    fake_upstream.script(Reply(text="a b c"))

    chunks = list(chat_model(config, temperature=1.5, max_tokens=7, top_p=0.5).stream("hi"))

    assert "".join(c.content for c in chunks) == "a b c"
    sent = fake_upstream.chat_requests[-1].body
    assert (sent["temperature"], sent["max_tokens"], sent["top_p"]) == (1.5, 7, 0.5)
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert any(c.usage_metadata for c in chunks)


def test_provider_without_stream_usage_and_penalties_does_not_send_them(make_llm_config, fake_upstream):
    config = make_llm_config(provider="zhipu", temperature=0.5, top_p=0.7)
    list(chat_model(config).stream("hi"))
    sent = fake_upstream.chat_requests[-1].body
    assert "stream_options" not in sent
    assert "frequency_penalty" not in sent and "presence_penalty" not in sent


@pytest.mark.parametrize(
    ("provider", "field", "value"),
    [("zhipu", "top_p", 1.0), ("zhipu", "temperature", 0.0), ("moonshot", "temperature", 1.5),
     ("openai", "temperature", 2.5), ("openai", "max_tokens", 0), ("openai", "top_p", "high")],
)
def test_override_outside_provider_range_is_refused_with_field(make_llm_config, provider, field, value):
    config = make_llm_config(provider=provider, temperature=0.5, top_p=0.5)
    with pytest.raises(InvalidParameter) as excinfo:
        chat_model(config, **{field: value})
    assert excinfo.value.field == field


def test_upstream_401_is_classified_and_key_scrubbed(make_llm_config, fake_upstream):
    config = make_llm_config()
    fake_upstream.script(Reply(status=401, error_message="Incorrect API key provided: {api_key}"))
    with pytest.raises(openai.AuthenticationError) as excinfo:
        chat_model(config, streaming=False).invoke("hi")
    error = provider_error(excinfo.value, api_key=config.api_key)
    assert (error.category, error.status_code) == ("auth", 401)
    assert config.api_key not in error.message
    assert "Incorrect API key provided" in error.message


@pytest.mark.django_db(transaction=True)
async def test_a_streaming_call_sends_exactly_what_the_sdks_own_create_would(make_llm_config, fake_upstream):
    # The factory's models post LangChain's payload as it is (ProviderCompletions). The same conversation through
    # the SDK's own `create` must reach the provider as the same request: body and headers.
    from asgiref.sync import sync_to_async
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai.chat_models._client_utils import _cached_async_httpx_client

    from llmconfigs.factory import ProviderCompletions

    _cached_async_httpx_client.cache_clear()  # pooled connections belong to an earlier test's event loop

    @tool
    def disk_usage(path: str) -> str:
        """How full the disk holding `path` is."""
        return "93%"

    config = await sync_to_async(make_llm_config)(
        provider="deepseek", max_tokens=77, extra_config={"extra_body": {"enable_thinking": False}})
    conversation = [
        SystemMessage("You are terse."),
        HumanMessage([{"type": "text", "text": "and this?"},
                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]),
        AIMessage("", tool_calls=[{"id": "call_1", "name": "disk_usage", "args": {"path": "/var"}}]),
        ToolMessage("93%", tool_call_id="call_1"),
        HumanMessage("ünïcode ✓ and \"quotes\""),
    ]
    requests = []
    for as_is in (True, False):
        model = chat_model(config, temperature=0.2, top_p=0.5)
        assert isinstance(model.async_client, ProviderCompletions)
        if not as_is:
            model.async_client = model.async_client._completions
        fake_upstream.script(Reply(text="fine"))
        chunks = [c async for c in model.bind_tools([disk_usage]).astream(conversation)]
        assert "".join(c.content for c in chunks) == "fine"
        requests.append(fake_upstream.chat_requests[-1])
    ours, sdks = requests
    assert ours.body == sdks.body
    assert ours.body["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png")
    assert (ours.body["max_tokens"], ours.body["enable_thinking"], ours.body["tools"][0]["function"]["name"]) == (
        77, False, "disk_usage")
    skip = {"x-stainless-retry-count", "x-stainless-read-timeout", "content-length"}
    assert {k: v for k, v in ours.headers.items() if k.lower() not in skip} == {
        k: v for k, v in sdks.headers.items() if k.lower() not in skip}


def _key_holders(exc: BaseException) -> list[str]:
    """Every text an exception carries (its chain included): message, repr, body, response text, request headers."""
    texts = []
    while exc is not None:
        texts += [str(exc), repr(exc), repr(getattr(exc, "body", None))]
        response = getattr(exc, "response", None)
        if response is not None:
            texts += [response.text, repr(dict(response.request.headers))]
        request = getattr(exc, "request", None)
        if request is not None:
            texts.append(repr(dict(request.headers)))
        exc = exc.__cause__ or exc.__context__
    return texts


ECHO = "Incorrect API key provided: {api_key}. You sent: {authorization}."


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("reply", "error_class", "status"), [
    (Reply(status=401, error_message=ECHO), openai.AuthenticationError, 401),
    (Reply(status=429, error_message=ECHO, error_type="rate_limit_exceeded"), openai.RateLimitError, 429),
    (Reply(status=500, error_message=ECHO, error_type="server_error"), openai.InternalServerError, 500),
    (Reply(text="partial answer", stream_error=ECHO, error_type="server_error"), openai.APIError, None),
], ids=["401", "429", "500", "mid-stream"])
async def test_a_streaming_calls_errors_leave_the_client_without_the_key(make_llm_config, fake_upstream, reply,
                                                                       error_class, status):
    from asgiref.sync import sync_to_async
    from langchain_openai.chat_models._client_utils import _cached_async_httpx_client

    _cached_async_httpx_client.cache_clear()  # pooled connections belong to an earlier test's event loop
    config = await sync_to_async(make_llm_config)()
    fake_upstream.script(reply)
    with pytest.raises(error_class) as excinfo:
        await chat_model(config, streaming=True).ainvoke("hi")
    error = excinfo.value
    assert fake_upstream.chat_requests[-1].api_key == config.api_key  # the upstream did echo the real key
    # The same category as before, so every mapping of it still holds; the text says what the provider said.
    assert getattr(error, "status_code", None) == status and error.type == reply.error_type
    assert provider_error(error, api_key="").category == {401: "auth", 429: "rate_limit"}.get(status, "upstream_error")
    assert "Incorrect API key provided: sk-…" in str(error) and "You sent: Bearer sk-…" in str(error)
    middle = config.api_key[8:-6]
    assert not [text for text in _key_holders(error) if config.api_key in text or middle in text]


def test_provider_exception_scrubbed_leaves_keyless_errors_alone_and_wraps_foreign_ones():
    plain = ValueError("nothing secret here")
    assert provider_exception_scrubbed(plain, api_key="sk-abcdefghijklmnop") is plain
    foreign = provider_exception_scrubbed(RuntimeError("proxy said sk-abcdefghijklmnop is wrong"),
                                          api_key="sk-abcdefghijklmnop")
    assert isinstance(foreign, ProviderCallError) and foreign.category == "upstream_error"
    assert "sk-abcdefghijklmnop" not in str(foreign) and "proxy said sk-…mnop is wrong" == str(foreign)


# Chat turns stream through `chat_deltas`: LangChain's request, the provider's chunks read as plain dicts.

@pytest.mark.django_db(transaction=True)
async def test_chat_deltas_send_what_langchain_sends_and_read_text_usage_and_finish(make_llm_config, fake_upstream):
    from asgiref.sync import sync_to_async
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_openai.chat_models._client_utils import _cached_async_httpx_client

    from llmconfigs.factory import chat_deltas

    _cached_async_httpx_client.cache_clear()  # pooled connections belong to an earlier test's event loop
    config = await sync_to_async(make_llm_config)(provider="deepseek", model_name="deep-fake", temperature=0.4,
                                                  max_tokens=64)
    model = chat_model(config, streaming=True)
    messages = [SystemMessage("Be brief."), HumanMessage("hi"), AIMessage("hello"), HumanMessage("and now?")]
    fake_upstream.script(Reply(text="one two three", prompt_tokens=11, completion_tokens=3),
                         Reply(text="one two three", prompt_tokens=11, completion_tokens=3))

    [_ async for _ in model.astream(messages)]
    deltas = [d async for d in chat_deltas(model, messages)]

    through_langchain, direct = (r.body for r in fake_upstream.chat_requests[-2:])
    assert direct == through_langchain and direct["stream_options"] == {"include_usage": True}
    assert "".join(d.text for d in deltas) == "one two three"
    assert (sum(d.prompt_tokens for d in deltas), sum(d.completion_tokens for d in deltas)) == (11, 3)
    assert [(d.finish_reason, d.model_name) for d in deltas if d.finish_reason] == [("stop", "deep-fake")]
    assert [d.opens for d in deltas][:2] == [False, True]  # the role chunk holds no token; the first word does


def test_a_delta_opens_on_text_tool_calls_or_reasoning_and_reads_what_providers_leave_out():
    from llmconfigs.factory import Delta

    assert not Delta.of_chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}).opens
    assert not Delta.of_chunk({"choices": [{"index": 0, "delta": {"content": None}}]}).opens
    assert Delta.of_chunk({"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}).opens
    tool = Delta.of_chunk({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1"}]}}]})
    assert tool.opens and tool.text == ""
    last = Delta.of_chunk({"model": "m", "choices": [{"index": 0, "finish_reason": "length"}]})  # no delta at all
    assert (last.text, last.opens, last.finish_reason, last.model_name) == ("", False, "length", "m")
    usage = Delta.of_chunk({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": None}})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.opens) == (5, 0, False)


# Agent steps stream through `chat_deltas(merged=True)` too: the message `StreamedAnswer` merges from the Deltas must
# be the one LangChain's `ainvoke` gives for the same stream (it is checkpointed, and the next call is built from it).

def _answers():
    from tests.fakes.upstream import ToolCall

    return {
        "text": Reply(text="The disk is fine today.", prompt_tokens=21, completion_tokens=5),
        "one call": Reply(text="Let me look.", tool_calls=[ToolCall("disk_usage", {"path": "/"}, id="call_1")]),
        "several calls in fragments": Reply(tool_calls=[
            ToolCall("disk_usage", {"path": "/var", "human": True}, id="call_a", fragments=4),
            ToolCall("dns_lookup", {"name": "example.com"}, id="call_b", fragments=3),
        ]),
        "invalid arguments": Reply(tool_calls=[ToolCall("disk_usage", "path=/, oops", id="call_x", fragments=2),
                                               ToolCall("dns_lookup", "[1, 2]", id="call_y")]),
        "no usage chunk": Reply(text="short", role_chunk=False),
    }


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("case", list(_answers()))
async def test_streamed_answer_is_the_message_langchain_merges_from_the_same_stream(make_llm_config, fake_upstream,
                                                                                   case):
    from asgiref.sync import sync_to_async
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from langchain_openai.chat_models._client_utils import _cached_async_httpx_client

    from llmconfigs.factory import StreamedAnswer
    from llmconfigs.routing import PoolChatModel

    _cached_async_httpx_client.cache_clear()  # pooled connections belong to an earlier test's event loop
    @tool
    def disk_usage(path: str, human: bool = False) -> str:
        """How full the disk holding `path` is."""
        return "93%"

    provider = "moonshot" if case == "no usage chunk" else "deepseek"  # moonshot's streams carry no usage
    config = await sync_to_async(make_llm_config)(provider=provider, model_name="deep-fake")
    pool = PoolChatModel(members=[config], build=lambda member, last: chat_model(member, streaming=True))
    tools = [convert_to_openai_tool(disk_usage)]
    messages = [SystemMessage("Be brief."), HumanMessage("how is the disk?")]
    reply = _answers()[case]
    fake_upstream.script(reply, reply)

    through_langchain = await pool.bind_tools(tools).ainvoke(messages)
    answer = StreamedAnswer()
    async for delta in pool.astream_deltas(messages, merged=True, tools=tools):
        answer.add(delta)
    merged = answer.message()

    sent_by_langchain, sent = (r.body for r in fake_upstream.chat_requests[-2:])
    assert sent == sent_by_langchain
    assert merged.model_dump(exclude={"id"}) == through_langchain.model_dump(exclude={"id"})
    assert merged.id.startswith("lc_run--") and through_langchain.id.startswith("lc_run--")
    assert merged.id != through_langchain.id
    if case == "invalid arguments":
        assert [c["id"] for c in merged.invalid_tool_calls] == ["call_x", "call_y"] and not merged.tool_calls
    if case == "several calls in fragments":
        assert [c["args"] for c in merged.tool_calls] == [{"path": "/var", "human": True}, {"name": "example.com"}]


# Chat turns stream plain Deltas (no tools bound, nothing for LangChain to read): `StreamedAnswer(merged=False)`
# builds their message from what the Deltas read.

def test_a_streamed_answer_of_plain_deltas_holds_their_text_usage_finish_and_model():
    from llmconfigs.factory import Delta, StreamedAnswer

    def chunk(delta=None, finish=None, **extra):
        return Delta.of_chunk({"model": "deep-fake", "choices": [{"index": 0, "delta": delta or {},
                                                                  "finish_reason": finish}], **extra})

    answer = StreamedAnswer(merged=False)
    for delta in (chunk({"role": "assistant", "content": ""}), chunk({"content": "one "}), chunk({"content": "two"}),
                  chunk(finish="length"), Delta.of_chunk({"choices": [], "usage": {"prompt_tokens": 7,
                                                                                   "completion_tokens": 2}})):
        answer.add(delta)
    message = answer.message()
    assert (message.content, message.tool_calls) == ("one two", [])
    assert message.response_metadata == {"finish_reason": "length", "model_name": "deep-fake"}
    assert message.usage_metadata == {"input_tokens": 7, "output_tokens": 2, "total_tokens": 9}

    unreported = StreamedAnswer(merged=False)  # a provider that sends no usage, and a stream cut before its finish
    unreported.add(chunk({"content": "cut"}))
    message = unreported.message()
    assert (message.content, message.response_metadata, message.usage_metadata) == ("cut", {}, None)
    assert StreamedAnswer(merged=False).message().content == ""
