"""Headless Chromium on the secure portal, with a real ``carepost serve`` and ``carepost worker``:
the recipient opens the link, gets the one-time code by real email (the worker mails it to the
local MX test server), reads the message in its sandboxed frame, downloads the attachment and
replies; a question-protected message on a phone-sized screen; the expired page.

The live server is another process that caches unwrapped keys, so these tests never empty the
database under it (no ``db`` fixture): each test arranges its own organization's message.
"""

from __future__ import annotations

import email
import re
import secrets
import time
from datetime import timedelta
from email import policy as email_policy
from pathlib import Path

import pytest
from playwright.sync_api import expect

from carepost.core import clock
from carepost.core.database import system_session
from tests.fixtures.portal import ADDRESS, PHI_SUBJECT, arrange
from tests.fixtures.ui import running_worker

pytestmark = pytest.mark.ui
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def live_server_env(tls_ca, dns_server, mx_servers):
    """The live server and the worker route mail to the local MX test servers."""
    return {
        "CAREPOST_DNS_NAMESERVERS": f"127.0.0.1:{dns_server.port}",
        "CAREPOST_MX_OVERRIDES": ",".join(s.override for s in mx_servers.values()),
        "CAREPOST_EXTRA_CA_FILE": str(tls_ca.ca_file),
        "CAREPOST_SMTP_HELO_NAME": "carepost.bar.example",
        "CAREPOST_SMTP_TIMEOUT": "5",
        "CAREPOST_DNS_TIMEOUT": "2",
    }


@pytest.fixture(scope="module")
def worker(storage, live_server, live_server_env, tmp_path_factory):
    """``carepost worker`` consuming the queue the live server enqueues code emails on."""
    yield from running_worker(storage, live_server, live_server_env, tmp_path_factory)


def _arrange(**kw):
    from carepost.accounts.service import create_organization

    with system_session() as s:
        org = create_organization(s, f"Lakeside Clinic {secrets.token_hex(2)}")
        s.commit()
        return arrange(s, org.id, **kw), org.name


def _wait_for_code(recorder, timeout: float = 30.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for m in recorder.messages:
            msg = email.message_from_bytes(m.data, policy=email_policy.default)
            found = re.search(r"(\d{4}) (\d{4})", msg.get_body(("plain",)).get_content())
            if found and ADDRESS in m.rcpt_tos:
                return "".join(found.groups())
        time.sleep(0.2)
    raise AssertionError("no code email arrived")


def test_recipient_gets_the_code_by_email_reads_downloads_and_replies(page, worker, mx_servers, tmp_path):
    recorder = mx_servers["valid"].recorder
    recorder.reset()
    a, org_name = _arrange()
    page.goto(f"/p/{a.token}")
    expect(page.get_by_test_id("portal-org")).to_have_text(org_name)
    expect(page.locator("body")).not_to_contain_text(PHI_SUBJECT)
    page.get_by_test_id("send-code").click()
    page.wait_for_url(re.compile(r".*\?sent=1$"))
    expect(page.locator("body")).to_contain_text("j•••@valid.test")
    code = _wait_for_code(recorder)
    page.fill("#code", f"{code[:4]} {code[4:]}")
    page.get_by_test_id("verify").click()
    page.wait_for_url(re.compile(r".*/message$"))
    expect(page.get_by_test_id("subject")).to_have_text(PHI_SUBJECT)
    frame = page.frame_locator("[data-testid=body-frame]")
    expect(frame.locator("body")).to_contain_text("shows benign tissue")
    # The frame runs no script and shows no remote image.
    assert frame.locator("img[src^='https:']").count() == 0 and frame.locator("script").count() == 0
    with page.expect_download() as dl:
        page.get_by_test_id("attachment").click()
    saved = tmp_path / "result.pdf"
    dl.value.save_as(saved)
    assert dl.value.suggested_filename == "result.pdf" and saved.read_bytes() == b"%PDF-1.4 biopsy"
    page.fill("#reply-text", "Thank you, that is a relief.")
    page.get_by_test_id("send-reply").click()
    expect(page.get_by_test_id("reply-sent")).to_be_visible()
    expect(page.get_by_test_id("reply")).to_contain_text("Thank you, that is a relief.")
    # The URL never carried anything but the opaque token.
    assert re.fullmatch(rf"{re.escape(page.url.split('/p/')[0])}/p/{re.escape(a.token)}/message(\?replied=1)?", page.url)


def test_question_message_on_a_phone_screen(browser, live_server):
    a, _ = _arrange(auth="question", question="Which city were you born in?", answer="Eau Claire")
    context = browser.new_context(base_url=live_server.url, viewport={"width": 390, "height": 844}, is_mobile=True,
                                  has_touch=True, device_scale_factor=3)
    foreign = []
    pg = context.new_page()
    pg.set_default_timeout(15000)
    pg.on("request", lambda req: foreign.append(req.url) if not req.url.startswith((live_server.url, "data:", "about:")) else None)
    try:
        pg.goto(f"/p/{a.token}")
        expect(pg.get_by_test_id("question")).to_have_text("Which city were you born in?")
        assert pg.evaluate("document.documentElement.scrollWidth") <= 390
        pg.fill("#answer", "eau  claire")
        pg.get_by_test_id("verify").click()
        pg.wait_for_url(re.compile(r".*/message$"))
        expect(pg.get_by_test_id("subject")).to_be_visible()
        # Readable on a phone: nothing wider than the screen, buttons full width and easy to tap.
        assert pg.evaluate("document.documentElement.scrollWidth") <= 390
        box = pg.get_by_test_id("send-reply").bounding_box()
        assert box["width"] >= 300 and box["height"] >= 40
        frame_box = pg.get_by_test_id("body-frame").bounding_box()
        assert frame_box["width"] <= 390
    finally:
        context.close()
    assert not foreign, f"page loaded from other hosts: {foreign}"


def test_expired_message_shows_the_expired_page(page):
    from carepost.portal.models import PortalMessage

    a, _ = _arrange()
    with system_session() as s:
        s.get(PortalMessage, a.portal_message_id).expires_at = clock.now() - timedelta(minutes=1)
        s.commit()
    page.goto(f"/p/{a.token}")
    expect(page.get_by_test_id("portal-state")).to_have_attribute("data-state", "expired")
    expect(page.locator("h1")).to_have_text("This message has expired")
    expect(page.locator("body")).not_to_contain_text(PHI_SUBJECT)
    page.goto(f"/p/{a.token}/message")
    expect(page.locator("h1")).to_have_text("This message has expired")
