"""The history window: which part of a conversation the model is given and the checkpoint keeps."""
from __future__ import annotations

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from agentcore.graph import history_window, message_chars


def _exchange(n: int, size: int = 10) -> list:
    return [HumanMessage(f"q{n}".ljust(size, "."), id=f"h{n}"), AIMessage(f"a{n}".ljust(size, "."), id=f"a{n}")]


def _tool_turn(n: int) -> list:
    call = {"name": "current_time", "args": {}, "id": f"call-{n}"}
    return [HumanMessage(f"q{n}", id=f"h{n}"), AIMessage("", tool_calls=[call], id=f"c{n}"),
            ToolMessage("12:00", tool_call_id=f"call-{n}", id=f"t{n}"), AIMessage(f"a{n}", id=f"a{n}")]


def test_the_latest_whole_turns_within_the_message_limit_are_kept():
    history = [m for n in range(10) for m in _exchange(n)] + [HumanMessage("now", id="now")]
    window = history_window(history, max_messages=6, max_chars=10_000)
    assert [m.id for m in window] == ["h8", "a8", "h9", "a9", "now"]  # 7 would not fit: whole turns only


def test_the_character_budget_counts_the_current_turn_too():
    history = [m for n in range(10) for m in _exchange(n, size=100)] + [HumanMessage("x" * 250, id="now")]
    window = history_window(history, max_messages=100, max_chars=700)
    assert [m.id for m in window] == ["h8", "a8", "h9", "a9", "now"]  # 650 characters; one more turn is 850


def test_the_current_turn_is_kept_whole_even_over_both_limits():
    history = _exchange(0) + _tool_turn(1) + _tool_turn(2)[:3]
    window = history_window(history, max_messages=1, max_chars=1)
    assert [m.id for m in window] == ["h2", "c2", "t2"]


def test_a_tool_call_is_never_separated_from_its_result():
    history = _tool_turn(0) + _tool_turn(1) + [HumanMessage("now", id="now")]
    for limit in range(1, 10):
        window = history_window(history, max_messages=limit, max_chars=10_000)
        assert isinstance(window[0], HumanMessage)
        calls = {c["id"] for m in window if isinstance(m, AIMessage) for c in m.tool_calls}
        assert calls == {m.tool_call_id for m in window if isinstance(m, ToolMessage)}


def test_a_short_conversation_is_given_whole():
    history = _exchange(0) + _tool_turn(1) + [HumanMessage("now", id="now")]
    assert history_window(history, max_messages=100, max_chars=10_000) == history


def test_images_and_tool_arguments_count_by_what_they_store():
    image = HumanMessage([{"type": "text", "text": "see"},
                          {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 5000}}])
    assert message_chars(image) > 5000
    call = AIMessage("", tool_calls=[{"name": "run_shell", "args": {"command": "x" * 300}, "id": "c"}])
    assert message_chars(call) > 300
