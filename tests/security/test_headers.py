"""Security headers on every surface of a real daphne (issue 15, item 1), and the pages the project serves (chat, admin,
Swagger at /api/docs/) working in a real headless Chromium under their Content-Security-Policy."""
from __future__ import annotations

import httpx
import pytest
from django.conf import settings

from agentcore.models import AgentApp
from difyapi.auth import api_key_create
from tests.security.test_uploads import HTML, png_bytes, upload

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PASSWORD = "pw-headers-admin-123"


def test_every_surface_sends_the_security_headers(daphne_server):
    paths = ["/", "/chat/", "/login/", "/admin/login/", "/api/docs/", "/api/docs/?script=", "/api/schema/",
             "/api/llm-configs/",
             "/v1/info", "/v1/no-such-endpoint", "/health/"]
    for path in paths:
        response = httpx.get(daphne_server.base_url + path, timeout=20)
        assert response.status_code < 500, path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["x-frame-options"] == "DENY", path
        assert response.headers["referrer-policy"] == "same-origin", path
        assert response.headers["content-security-policy"] == settings.CONTENT_SECURITY_POLICY, path
    # The streaming chat endpoint is a Channels consumer, outside Django's middleware: JSON and SSE, never a page.
    for method in ("GET", "POST"):
        response = httpx.request(method, daphne_server.base_url + "/v1/chat-messages", timeout=20)
        assert response.status_code in (401, 405)
        assert response.headers["x-content-type-options"] == "nosniff"
    # Without the HTTPS environment (test_deploy_settings.py), plain http on loopback just works.
    login = httpx.get(daphne_server.base_url + "/admin/login/", timeout=20)
    assert login.status_code == 200 and "strict-transport-security" not in login.headers
    assert "; secure" not in login.headers["set-cookie"].lower()
    assert "frame-ancestors 'none'" in settings.CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in settings.CONTENT_SECURITY_POLICY


class PageWatch:
    """A browser page that records every CSP violation and console error of what it loads."""

    LISTEN = """document.addEventListener("securitypolicyviolation", (e) => {
        (window.__violations = window.__violations || []).push(`${e.violatedDirective} ${e.blockedURI}`);
    });"""

    def __init__(self, browser, base_url: str):
        self.base_url = base_url
        self.context = browser.new_context(accept_downloads=True)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("response", self._response)
        self.page.add_init_script(self.LISTEN)

    def _console(self, message) -> None:
        # Failed loads are recorded with their address by _response.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def _response(self, response) -> None:
        # Chromium asks for /favicon.ico on its own; the project serves none.
        if response.status >= 400 and not response.url.endswith("/favicon.ico"):
            self.errors.append(f"{response.status} {response.url}")

    def open(self, path: str):
        self.errors.clear()
        response = self.page.goto(self.base_url + path)
        self.page.wait_for_load_state("load")
        return response

    def assert_clean(self, what: str) -> None:
        violations = self.page.evaluate("window.__violations || []")
        assert violations == [] and self.errors == [], f"{what}: {violations} {self.errors}"


def test_admin_and_api_docs_work_under_their_csp_in_chromium(chromium, daphne_server, django_user_model,
                                                              make_llm_config):
    django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    config = make_llm_config()
    AgentApp.objects.create(name="browser-keys", mode="chat")
    with chromium() as browser:
        admin_and_docs_pages_are_clean(PageWatch(browser, daphne_server.base_url), config_id=config.pk)


def admin_and_docs_pages_are_clean(watch: PageWatch, *, config_id) -> None:
    watch.open("/login/")
    watch.assert_clean("chat login page")
    # The chat stylesheet applied (a blocked one would leave the form unstyled).
    assert watch.page.evaluate("getComputedStyle(document.querySelector('.login-form')).display") == "flex"
    watch.open("/admin/login/")
    watch.assert_clean("login page")
    # The admin's stylesheet applied (a blocked one would leave the header unstyled).
    assert watch.page.evaluate("getComputedStyle(document.querySelector('#header')).display") == "flex"
    watch.page.fill("#id_username", "root")
    watch.page.fill("#id_password", PASSWORD)
    watch.page.click("input[type=submit]")
    watch.page.wait_for_url("**/admin/")
    for path in ["/chat/", "/admin/", "/admin/llmconfigs/llmconfig/", "/admin/llmconfigs/llmconfig/add/",
                 f"/admin/llmconfigs/llmconfig/{config_id}/change/", "/admin/difyapi/apikey/add/",
                 "/admin/auth/user/add/"]:
        assert watch.open(path).status == 200, path
        watch.assert_clean(path)
    # The project's own admin styles come from stylesheets too.
    watch.open(f"/admin/llmconfigs/llmconfig/{config_id}/change/")
    radius = watch.page.evaluate("getComputedStyle(document.querySelector('button.test-connection')).borderRadius")
    assert radius == "15px"
    watch.open("/admin/difyapi/apikey/add/")
    watch.page.select_option("#id_app", index=1)
    watch.page.fill("#id_name", "browser")
    watch.page.click("input[name=_save]")
    watch.page.wait_for_selector("code.api-key-once")
    assert watch.page.evaluate("getComputedStyle(document.querySelector('code.api-key-once')).userSelect") == "all"
    watch.assert_clean("key created page")

    watch.open("/api/docs/")
    watch.page.wait_for_selector(".opblock", timeout=30_000)
    assert watch.page.locator(".opblock").count() > 10
    watch.assert_clean("Swagger UI")


def test_uploads_open_in_chromium_as_an_image_or_a_download_never_a_page(chromium, daphne_server):
    app = AgentApp.objects.create(name="browser-uploads", mode="chat")
    key = api_key_create(app=app)[1]
    png = upload(daphne_server, key, "chart.png", png_bytes(), "image/png").json()
    page = upload(daphne_server, key, "page.html", HTML, "text/html").json()
    with chromium() as browser:
        uploads_open_as_an_image_or_a_download(PageWatch(browser, daphne_server.base_url), png=png, page=page)


def uploads_open_as_an_image_or_a_download(watch: PageWatch, *, png: dict, page: dict) -> None:

    watch.page.goto(png["source_url"])
    assert watch.page.evaluate("document.images.length === 1 && document.images[0].naturalWidth") == 1

    with watch.page.expect_download() as download:
        try:
            watch.page.goto(page["source_url"])
        except Exception as exc:  # Chromium aborts a navigation that turns into a download
            assert "Download is starting" in str(exc)
    assert download.value.suggested_filename == "page.html"
    with open(download.value.path(), "rb") as saved:
        assert saved.read() == HTML
