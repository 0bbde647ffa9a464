"""The chat page (/chat/) in a real headless Chromium (Debian's, driven by Playwright) against a real daphne, with the
fake upstream as the model: log in, pick a model and parameters, a streamed answer, tool steps, an approval, stop,
an XSS payload, reload, speed budgets, both screen widths; the admin config form's test-connection button.

Every step saves a screenshot under var/browser/ when it fails (var/ is git-ignored); CHAT_SCREENSHOTS=1 saves the
390 px and 1440 px views of a conversation there on success too."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from agentcore.models import AgentApp, Message, Session, Thought
from agentcore.tools.policies import tool_policy_update
from tests.fakes.upstream import Reply, ToolCall

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SHOTS = Path(__file__).resolve().parents[2] / "var" / "browser"
PASSWORD = "pw-chat-browser-123"
WAIT = 30_000  # ms: a loaded 2-core machine answers slowly, not never


class Steps:
    """Names each step of a browser test; a failing step leaves a screenshot of the page as it was."""

    def __init__(self, page, test: str):
        self.page, self.test, self.errors = page, test, []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", self._console)
        page.on("response", self._response)

    def _console(self, message) -> None:
        # Failed loads are recorded with their address by _response.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def _response(self, response) -> None:
        # Chromium asks for /favicon.ico on its own; the project serves none.
        if response.status >= 400 and not response.url.endswith("/favicon.ico"):
            self.errors.append(f"{response.status} {response.url}")

    @contextlib.contextmanager
    def step(self, name: str):
        try:
            yield
        except BaseException:
            self.shot(f"FAILED-{name}")
            raise

    def shot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{self.test}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def _conversation(app, owner, count: int) -> Session:
    session = Session.objects.create(app=app, owner=owner, name="Fifty turns")
    messages = Message.objects.bulk_create([
        Message(session=session, query=f"Question {i}: is host-{i} up?", status="normal",
                answer=f"Answer {i}: **yes**, it answers.\n\n```\n$ ping host-{i}\n  64 bytes\n```\n- one\n- two")
        for i in range(count)
    ])
    Thought.objects.bulk_create([
        Thought(message=message, position=1, tool="http_check", tool_input={"url": f"https://host-{i}.example"},
                observation='{"status": 200}', status="done")
        for i, message in enumerate(messages)
    ])
    return session


def _login(page, base_url: str, username: str = "root") -> None:
    page.goto(base_url + "/")
    page.wait_for_url("**/login/**")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url("**/chat/")


def _send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def _last_answer(page):
    return page.locator(".bubble.assistant").last


def _wait_done(page) -> None:
    page.wait_for_function(
        "() => { const b = [...document.querySelectorAll('.bubble.assistant')].pop();"
        " return b && b.dataset.status && b.dataset.status !== 'running'; }", timeout=WAIT)


def test_chatting_in_the_browser(chromium, daphne_server, django_user_model, make_llm_config, fake_upstream):
    root = django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    make_llm_config(name="main", model_name="fake-main", default=True)
    second = make_llm_config(name="second", model_name="fake-second")
    app = AgentApp.objects.create(name="ops", mode=AgentApp.Mode.AGENT_CHAT, opening_statement="Ask me.",
                                  suggested_questions=["What is the load?"])
    tool_policy_update(name="current_time", requires_approval=True)
    long = _conversation(app, root, 50)
    base = daphne_server.base_url

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        steps = Steps(page, "chat")
        with steps.step("login"):
            _login(page, base)
            page.wait_for_selector(".opening .suggestion:has-text('What is the load?')")
            paint = page.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime")
            assert paint < 2000, f"first paint after {paint:.0f} ms"

        with steps.step("pick-model-and-stream"):
            page.select_option("#model", str(second.pk))
            page.click("#params summary")
            page.fill("#temperature", "0.3")
            fake_upstream.script(Reply(chunks=["Streaming ", "arrives ", "word ", "by ", "word ", "here."],
                                       delay=0.5))
            _send(page, "Say something slowly")
            # Text shows while the answer is still being generated (the stop button is there until the end).
            page.wait_for_function("() => document.querySelector('.bubble.assistant .answer')?.textContent"
                                   ".includes('Streaming')", timeout=WAIT)
            assert page.is_visible("#stop")
            assert "here." not in _last_answer(page).inner_text()
            _wait_done(page)
            assert _last_answer(page).locator(".answer").inner_text() == "Streaming arrives word by word here."
            assert page.is_hidden("#stop")
            # Under the answer: the model that gave it, its tokens and time.
            assert "fake-second · " in _last_answer(page).locator(".meta").inner_text()
            assert " tokens · " in _last_answer(page).locator(".meta").inner_text()
            request = fake_upstream.chat_requests[-1].body
            assert request["model"] == "fake-second" and request["temperature"] == 0.3
            # The new conversation is listed, named after its first message.
            assert page.locator(".conversations li .conversation").all_inner_texts() == [
                "Say something slowly", "Fifty turns"]

        with steps.step("out-of-range-parameter"):
            page.fill("#temperature", "7")
            _send(page, "too hot")
            page.wait_for_selector(".error >> text=temperature in [0, 2]")
            page.fill("#temperature", "")

        with steps.step("tool-step-and-approval"):
            fake_upstream.script(Reply(tool_calls=[ToolCall("system_status", {})]),
                                 Reply(tool_calls=[ToolCall("current_time", {"timezone": "UTC"})]),
                                 Reply(text="It is **now**."))
            _send(page, "How is the server, and what time is it?")
            approval = page.wait_for_selector(".approval:has-text('current_time')", timeout=WAIT)
            _wait_done(page)
            assert _last_answer(page).get_attribute("data-status") == "paused"
            if os.environ.get("CHAT_SCREENSHOTS"):
                steps.shot("1440px-approval")
            step = _last_answer(page).locator("details.step").first
            assert "system_status" in step.locator("summary").inner_text()
            step.locator("summary").click()  # collapsed until opened
            assert step.locator(".step-output").inner_text().strip().startswith("{")
            approval.query_selector("button[data-decision=approve]").click()
            page.wait_for_function(
                "() => document.querySelectorAll('.bubble.assistant')[1]?.dataset.status === 'normal'", timeout=WAIT)
            turn = _last_answer(page)
            assert turn.locator(".answer strong").inner_text() == "now"
            assert "UTC" in turn.locator("details.step").nth(1).locator(".step-output").text_content()

        with steps.step("stop"):
            fake_upstream.script(Reply(chunks=[f"word{i} " for i in range(300)], delay=0.05))
            _send(page, "Talk for a long time")
            page.wait_for_function("() => [...document.querySelectorAll('.bubble.assistant .answer')].pop()"
                                   "?.textContent.includes('word1')", timeout=WAIT)
            page.click("#stop")
            _wait_done(page)
            assert _last_answer(page).get_attribute("data-status") == "stopped"
            assert "Stopped" in _last_answer(page).locator(".meta").inner_text()
            assert "word299" not in _last_answer(page).inner_text()

        with steps.step("xss-inert-and-code-kept"):
            payload = ('<script>window.__xss = 1</script> <img src=x onerror="window.__xss=2"> '
                       '[click](javascript:alert(1))\n\n```\nif ok:\n    print("<b>kept</b>")\n```')
            fake_upstream.script(Reply(chunks=[payload]))
            _send(page, "Show me something nasty")
            _wait_done(page)
            answer = _last_answer(page).locator(".answer")
            assert page.evaluate("window.__xss") is None
            assert answer.locator("script, img, a").count() == 0
            assert "<script>window.__xss = 1</script>" in answer.inner_text()
            assert answer.locator("pre code").text_content() == 'if ok:\n    print("<b>kept</b>")'

        with steps.step("readable-error"):
            fake_upstream.script(Reply(status=500, error_message="the model is on fire"))
            _send(page, "Break, please")
            _wait_done(page)
            assert _last_answer(page).get_attribute("data-status") == "error"
            error = _last_answer(page).locator(".meta .error").inner_text()
            assert error and not error.lstrip().startswith("{"), error

        with steps.step("reload-keeps-the-conversation"):
            page.reload()
            page.wait_for_function("() => document.querySelectorAll('.bubble.user').length === 5", timeout=WAIT)
            assert page.locator(".bubble.assistant .answer strong").first.inner_text() == "now"
            assert page.evaluate("window.__xss") is None
            assert page.locator(".bubble.assistant").nth(2).get_attribute("data-status") == "stopped"
            assert page.locator(".bubble.assistant").nth(4).get_attribute("data-status") == "error"
            assert page.locator(".bubble.assistant").nth(4).locator(".error").inner_text() == error
            if os.environ.get("CHAT_SCREENSHOTS"):
                page.set_viewport_size({"width": 390, "height": 844})
                steps.shot("390px-conversation")
                page.set_viewport_size({"width": 1440, "height": 900})

        with steps.step("fifty-messages"):
            page.click(".conversations li:has-text('Fifty turns') .conversation")
            page.wait_for_function("() => document.querySelectorAll('.bubble.assistant').length === 50", timeout=WAIT)
            took = page.evaluate("performance.getEntriesByName('chat-history').pop().duration")
            assert took < 1000, f"50 messages took {took:.0f} ms"
            assert page.locator("details.step").count() == 50

        with steps.step("widths"):
            page.goto(f"{base}/chat/#{long.pk}")
            page.wait_for_function("() => document.querySelectorAll('.bubble.assistant').length === 50", timeout=WAIT)
            for width, height in ((1440, 900), (390, 844)):
                page.set_viewport_size({"width": width, "height": height})
                # Nothing wider than the screen: no sideways scrolling of the page itself.
                assert page.evaluate("document.documentElement.scrollWidth") <= width
                assert page.is_visible("#input") and page.is_visible("#send") and page.is_visible("#model")
                if os.environ.get("CHAT_SCREENSHOTS"):
                    steps.shot(f"{width}px")
            page.click("#toggle-sidebar")
            assert page.is_visible(".conversations li:has-text('Fifty turns')")
            if os.environ.get("CHAT_SCREENSHOTS"):
                steps.shot("390px-sidebar")

        with steps.step("rename-and-delete"):
            page.set_viewport_size({"width": 1440, "height": 900})
            answers = iter(["Server checks"])
            page.on("dialog", lambda dialog: dialog.accept(next(answers, "")))
            page.locator(".conversations li", has_text="Say something slowly").get_by_label("Rename").click()
            page.wait_for_selector(".conversations li .conversation:text-is('Server checks')")
            # Deleting the open conversation leaves an empty new chat.
            page.locator(".conversations li", has_text="Fifty turns").get_by_label("Delete").click()
            page.wait_for_function("() => document.querySelectorAll('.conversations li').length === 1")
            assert page.locator(".bubble").count() == 0
            page.reload()
            page.wait_for_selector(".conversations li .conversation:text-is('Server checks')")
            assert page.locator(".conversations li").count() == 1
        assert steps.errors == []

    assert Session.objects.get(name="Server checks").owner == root
    assert Session.objects.get(pk=long.pk).is_deleted
    stopped = Message.objects.get(query="Talk for a long time")
    assert stopped.status == "stopped" and stopped.answer.startswith("word0")


def test_admin_config_form_and_approvals_others_decide(chromium, daphne_server, django_user_model, make_llm_config,
                                                       fake_upstream):
    django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    # Staff without the right to decide approvals whose approver is staff.
    django_user_model.objects.create_user("viewer", "viewer@example.com", PASSWORD, is_staff=True)
    config = make_llm_config(name="main", default=True)
    make_llm_config(name="pool-a", model_name="fake-a", route="fast", priority=10)
    make_llm_config(name="pool-b", model_name="fake-b", route="fast")
    AgentApp.objects.create(name="ops")
    tool_policy_update(name="current_time", requires_approval=True, approver="staff")
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        steps = Steps(page, "admin")
        with steps.step("login"):
            _login(page, daphne_server.base_url)
        with steps.step("config-form"):
            page.goto(f"{daphne_server.base_url}/admin/llmconfigs/llmconfig/{config.pk}/change/")
            assert page.input_value("#id_name") == "main"
            page.click("button.test-connection")
            page.wait_for_selector(".messagelist .success", timeout=WAIT)
            assert "connection OK" in page.inner_text(".messagelist")
            if os.environ.get("CHAT_SCREENSHOTS"):
                steps.shot("1440px-config-form")
                page.goto(f"{daphne_server.base_url}/admin/llmconfigs/llmconfig/")
                steps.shot("1440px-config-list")
                page.goto(f"{daphne_server.base_url}/admin/agentcore/agentapp/add/")
                steps.shot("1440px-app-form")
                page.goto(f"{daphne_server.base_url}/admin/llmconfigs/llmconfig/{config.pk}/change/")
        with steps.step("config-list-fits-1440"):
            page.goto(f"{daphne_server.base_url}/admin/llmconfigs/llmconfig/")
            # Every column, the masked key last, is on the screen: the results do not scroll sideways.
            assert page.evaluate("(() => { const r = document.querySelector('.results');"
                                 " return r.scrollWidth <= r.clientWidth; })()")
            assert page.is_visible("td.field-key") and "sk-…" in page.inner_text("td.field-key")
            page.goto(f"{daphne_server.base_url}/admin/llmconfigs/llmconfig/{config.pk}/change/")
        with steps.step("config-form-failure"):
            fake_upstream.script(Reply(status=401, error_message="bad key {api_key}"))
            page.click("button.test-connection")
            page.wait_for_selector(".messagelist .error", timeout=WAIT)
            text = page.inner_text(".messagelist")
            assert "connection failed (auth)" in text and config.api_key not in text
        with steps.step("back-to-chat"):
            page.goto(daphne_server.base_url + "/")
            page.wait_for_url("**/chat/")
            assert page.locator("#model optgroup[label=Models] option").all_inner_texts() == [
                f"main ({config.model_name})", "pool-a (fake-a)", "pool-b (fake-b)"]
        with steps.step("chat-with-a-pool"):
            page.select_option("#model", "route:fast")
            _send(page, "Which model answers?")
            _wait_done(page)
            # The pool's first member (highest priority) answered.
            assert fake_upstream.chat_requests[-1].body["model"] == "fake-a"
            assert "fake-a" in _last_answer(page).locator(".meta").inner_text()
            # The conversation keeps its pool (it stores a config, not a pool): opened again, the picker shows it.
            assert page.input_value("#model") == "route:fast"
            page.reload()
            page.wait_for_selector(".bubble.user", timeout=WAIT)
            assert page.input_value("#model") == "route:fast"
        with steps.step("app-form-tools"):
            page.goto(f"{daphne_server.base_url}/admin/agentcore/agentapp/add/")
            label = page.locator("label:has(input[name=enabled_tools][value=current_time])")
            assert "needs approval" in label.inner_text()
        assert steps.errors == []

        viewer = browser.new_page(viewport={"width": 390, "height": 844})
        steps = Steps(viewer, "viewer")
        with steps.step("waiting-for-approval"):
            _login(viewer, daphne_server.base_url, "viewer")
            fake_upstream.script(Reply(tool_calls=[ToolCall("current_time", {})]))
            _send(viewer, "What time is it?")
            box = viewer.wait_for_selector(".approval:has-text('current_time')", timeout=WAIT)
            assert "Waiting for approval" in box.inner_text()
            assert viewer.locator(".approval button").count() == 0
        assert steps.errors == []


def test_the_model_picker_offers_only_what_the_app_may_use(chromium, daphne_server, django_user_model,
                                                           make_llm_config):
    django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    main = make_llm_config(name="main", model_name="fake-main", default=True)
    second = make_llm_config(name="second", model_name="fake-second")
    AgentApp.objects.create(name="a-limited", mode=AgentApp.Mode.CHAT, allowed_routes=["fake-main"])
    AgentApp.objects.create(name="b-open", mode=AgentApp.Mode.CHAT)

    def offered(page) -> set[str]:
        return set(page.eval_on_selector_all("#model option", "options => options.filter("
                                             "o => o.value && !o.disabled && !o.hidden).map(o => o.value)"))

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        steps = Steps(page, "allow-list")
        with steps.step("limited-app"):
            _login(page, daphne_server.base_url)
            page.select_option("#app", label="a-limited")
            assert offered(page) == {str(main.pk)}
        with steps.step("open-app"):
            page.select_option("#app", label="b-open")
            assert offered(page) == {str(main.pk), str(second.pk)}
        assert steps.errors == []


def test_a_user_who_is_not_staff_signs_in_and_chats(chromium, daphne_server, django_user_model, make_llm_config,
                                                    fake_upstream):
    django_user_model.objects.create_user("carol", "carol@example.com", PASSWORD)
    make_llm_config(name="main", model_name="fake-main", default=True)
    AgentApp.objects.create(name="ops", mode=AgentApp.Mode.CHAT)
    fake_upstream.script(Reply(text="Hello Carol."))
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 390, "height": 844})
        steps = Steps(page, "not-staff")
        with steps.step("login"):
            _login(page, daphne_server.base_url, username="carol")
            assert page.locator(".links .who").inner_text() == "carol"
            assert page.locator(".links a:has-text('Admin')").count() == 0
            if os.environ.get("CHAT_SCREENSHOTS"):
                steps.shot("chat-390")
        with steps.step("chat"):
            _send(page, "hello")
            _wait_done(page)
            assert _last_answer(page).locator(".answer").inner_text() == "Hello Carol."
        with steps.step("logout"):
            page.click("#toggle-sidebar")  # at phone width the conversations and links fold away
            page.click(".links button:has-text('Log out')")
            page.wait_for_url("**/login/**")
        assert steps.errors == []
