"""Interactive API docs at /api/docs, served entirely by CarePost."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from carepost.web.rendering import STATIC_DIR


class _Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self.inline_styles = 0
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key) and tag in ("script", "link", "img", "iframe"):
                self.urls.append(a[key])
        if "style" in a:
            self.inline_styles += 1
        if tag == "style":
            self.inline_styles += 1
        self._in_script = tag == "script" and not a.get("src")

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False


def test_docs_page_loads_only_local_static_assets(client):
    response = client.get("/api/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    parser = _Assets()
    parser.feed(response.text)
    assert parser.urls, "the page must load Swagger UI"
    for url in parser.urls:
        assert url.startswith("/static/"), url
    assert parser.inline_scripts == 0 and parser.inline_styles == 0  # CSP forbids them
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in parser.urls
    assert "/static/vendor/swagger-ui/swagger-ui.css" in parser.urls
    assert 'data-openapi-url="/api/v1/openapi.json"' in response.text
    assert "script-src 'self'" in response.headers["content-security-policy"]
    for url in parser.urls:
        assert client.get(url).status_code == 200, url


def test_swagger_ui_is_vendored_with_its_license():
    vendor = STATIC_DIR / "vendor" / "swagger-ui"
    assert "Apache License" in (vendor / "LICENSE").read_text()
    init = (STATIC_DIR / "api-docs.js").read_text()
    assert "validatorUrl: null" in init  # the validator badge would call validator.swagger.io
    assert not re.search(r"https?://", init)


def test_docs_route_is_declared_public_and_fastapi_default_docs_are_off(client):
    assert client.get("/docs").status_code == 404
    assert client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 404
    assert client.get("/api/v1/openapi.json").json()["info"]["title"] == "CarePost API"


@pytest.mark.ui
def test_docs_render_in_chromium_without_other_hosts_or_csp_violations(page, live_server):
    violations = []
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.goto("/api/docs")
    page.wait_for_selector(".opblock", timeout=20000)
    assert page.locator(".opblock-summary-path", has_text="/healthz").count() >= 1
    assert page.locator(".info .title", has_text="CarePost API").count() == 1
    assert violations == []


def test_the_staff_ui_links_to_the_api_docs_from_the_nav(client, org, make_user):
    """Issue 10 item 16: every signed-in person finds the API reference in the menu."""
    import re

    from tests.fixtures.accounts import login_client

    login_client(client, make_user(org, role="marketer"))
    page = client.get("/app")
    assert page.status_code == 200
    nav = page.text.split('<nav class="sidenav"', 1)[1].split("</nav>", 1)[0]
    assert re.search(r'<a href="/api/docs"[^>]*>API documentation</a>', nav)
    assert client.get("/api/docs").status_code == 200
