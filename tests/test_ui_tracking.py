"""Headless Chromium reads a tracked message (issue 13, proof): a real ``carepost serve``, a real
``carepost worker`` and the local mail capture of ``carepost run``. A tracked message is sent
through the API, arrives in the capture, its HTML is opened in Chromium (the open pixel loads
from ``/t/o/``), a link is clicked (the redirect from ``/t/c/`` lands on the recorded local
target), and the message page shows the open and the click, as a person's.

The live server is another process: this module arranges its own organization and never empties
the database under it.
"""

from __future__ import annotations

import email
import secrets
import time
from email import policy as email_policy
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from tests.fixtures.accounts import add_staff, ui_login
from tests.fixtures.ui import (
    capture_relay_env,
    running_capture,
    running_worker,
)

pytestmark = pytest.mark.ui
ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "tracking-ui.example"
# A person's desktop browser (headless Chromium announces itself as HeadlessChrome: a machine).
DESKTOP_CHROME = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
                  "Safari/537.36")


@pytest.fixture(scope="module")
def capture(storage, tmp_path_factory):  # one per database: a module runs on both in one process
    yield from running_capture(tmp_path_factory)


@pytest.fixture(scope="module")
def live_server_env(capture):
    return capture_relay_env(capture, "mail.tracking-ui.example")


@pytest.fixture(scope="module")
def worker(storage, live_server, live_server_env, tmp_path_factory):
    yield from running_worker(storage, live_server, live_server_env, tmp_path_factory)


@pytest.fixture(scope="module")
def clinic(live_server):
    from types import SimpleNamespace

    from carepost.accounts.credentials import create_credential
    from carepost.accounts.service import create_organization
    from carepost.core import clock
    from carepost.core.database import org_session, system_session
    from carepost.delivery import service

    with system_session() as s:
        org = create_organization(s, f"Tracking Clinic {secrets.token_hex(2)}")
        owner = add_staff(s, org.id, "owner")
        s.commit()
        org_id = org.id
    with org_session(org_id) as s:
        row = service.create_sending_domain(s, org_id, f"{secrets.token_hex(3)}.{DOMAIN}")
        row.verified_at = clock.now()
        service.update_delivery_settings(s, org_id, {"default_purpose": "treatment"})
        cred, secret = create_credential(s, org_id, name="tracking ui", scopes=["messages:send", "messages:read"])
        s.commit()
        return SimpleNamespace(org_id=org_id, domain=row.domain, owner=owner,
                               key={"Authorization": f"Bearer {cred.key_id}.{secret}"})


def _captured_html(capture: dict, rcpt: str, timeout: float = 90.0) -> str:
    from carepost.core.mailcapture import capture_files, read_capture

    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in capture_files(capture["dir"]):
            msg = email.message_from_bytes(read_capture(path, capture["keys"]), policy=email_policy.default)
            if rcpt in (msg.get_all("X-CarePost-Capture-Rcpt-To") or []):
                return msg.get_body(("html",)).get_content()
        time.sleep(0.3)
    raise AssertionError(f"nothing for {rcpt} arrived in the capture")


def test_open_and_click_a_tracked_message_in_chromium_and_see_them_on_the_message_page(
        browser, live_server, capture, worker, clinic):
    landing = f"{live_server.url}/healthz?from=newsletter"
    html = (f'<html><body><p>Your flu shot clinic is open.</p><p><a id="book" href="{landing}">Book a time</a></p>'
            '</body></html>')
    r = httpx.post(f"{live_server.url}/api/v1/messages", headers=clinic.key, timeout=30, json={
        "from": f"Clinic <care@{clinic.domain}>", "to": ["robin.ash@patients.example"], "subject": "Flu shots",
        "html": html, "text": "Your flu shot clinic is open.", "contains_phi": False, "security": "tls_required",
        "track_opens": True, "track_clicks": True})
    assert r.status_code == 202, r.text
    message_id = r.json()["id"]
    mail = _captured_html(capture, "robin.ash@patients.example")
    assert "/t/o/" in mail and "/t/c/" in mail and landing not in mail

    context = browser.new_context(base_url=live_server.url, user_agent=DESKTOP_CHROME,
                                  viewport={"width": 1366, "height": 800})
    foreign: list[str] = []
    page = context.new_page()
    page.set_default_timeout(20000)
    page.on("request", lambda req: foreign.append(req.url)
            if not req.url.startswith((live_server.url, "data:", "about:")) else None)
    try:
        # Clicks seconds after delivery without an open look like a gateway's: a person reads first.
        time.sleep(1)
        page.goto(f"{live_server.url}/healthz")  # an origin for the mail view; the mail is set as its content
        with page.expect_response(lambda resp: "/t/o/" in resp.url) as pixel:
            page.set_content(mail)
        assert pixel.value.status == 200 and pixel.value.headers["content-type"] == "image/gif"
        with page.expect_navigation():
            page.click("#book")
        assert page.url == landing  # the recorded URL, through /t/c/ and its 302

        ui_login(page, clinic.owner)
        page.goto(f"/app/deliveries/{message_id}")
        expect(page.get_by_test_id("engagement")).to_be_visible()
        expect(page.get_by_test_id("opened-human")).to_have_text("1")
        expect(page.get_by_test_id("clicked-human")).to_have_text("1")
        lines = page.get_by_test_id("recipient-engagement").inner_text()
        assert "opened" in lines and "clicked" in lines and "link 1" in lines and "human" in lines
    finally:
        context.close()
    assert not foreign, f"loaded from other hosts: {foreign}"
