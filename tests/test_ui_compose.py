"""Headless Chromium on the compose page (issue 10 item 5), with a real ``carepost serve``, a real
``carepost worker`` and the local mail capture of ``carepost run`` (STARTTLS with its own CA, a
TLS-enforcing relay): free text to a patient found by name and to a typed address, the
per-recipient security preview, a test to oneself that arrives in the capture, sending and the
statuses that follow; a bad address named in the error; what the Marketer role may and may not
send.

The live server is another process: these tests arrange their own organization and never empty
the database under it.
"""

from __future__ import annotations

import email
import re
import secrets
import time
from email import policy as email_policy
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.fixtures.accounts import TestUser, add_staff, ui_login
from tests.fixtures.ui import (
    capture_relay_env,
    running_capture,
    running_worker,
)

pytestmark = pytest.mark.ui
ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "compose-ui.example"


@pytest.fixture(scope="module")
def capture(storage, tmp_path_factory):  # one per database: a module runs on both in one process
    """The mail capture ``carepost run`` starts: every message the worker sends lands as a file."""
    yield from running_capture(tmp_path_factory)


@pytest.fixture(scope="module")
def live_server_env(capture):
    return capture_relay_env(capture, "mail.compose-ui.example")


@pytest.fixture(scope="module")
def worker(storage, live_server, live_server_env, tmp_path_factory):
    """``carepost worker`` consuming the queue the live server enqueues deliveries on."""
    yield from running_worker(storage, live_server, live_server_env, tmp_path_factory)


def _user(s, org_id: str, role: str) -> TestUser:
    return add_staff(s, org_id, role)


@pytest.fixture(scope="module")
def clinic(live_server):
    """An organization ready to send from ``compose-ui.example``, a patient with an email address,
    a marketing topic, an owner and a marketer."""
    from types import SimpleNamespace

    from carepost.accounts.service import create_organization
    from carepost.consent.service import create_topic, set_consent_settings
    from carepost.core import clock
    from carepost.core.database import org_session, system_session
    from carepost.delivery import service
    from carepost.patients.service import save_contact

    with system_session() as s:
        org = create_organization(s, f"Compose Clinic {secrets.token_hex(2)}")
        owner, marketer = _user(s, org.id, "owner"), _user(s, org.id, "marketer")
        s.commit()
        org_id = org.id
    with org_session(org_id) as s:
        row = service.create_sending_domain(s, org_id, f"{secrets.token_hex(3)}.{DOMAIN}")
        if hasattr(row, "verified_at"):
            row.verified_at = clock.now()
        service.update_delivery_settings(s, org_id, {"default_purpose": "treatment"})
        set_consent_settings(s, org_id, {"postal_address": "Compose Clinic, 1 Main Street, Springfield, IL 62701"})
        topic = create_topic(s, org_id, key="events", name="Classes and events")
        pat = save_contact(s, org_id, {"given_name": "Patricia", "family_name": "Quill",
                                       "email": "patricia.quill@patients.example"}).contact.id
        s.commit()
        return SimpleNamespace(org_id=org_id, domain=row.domain, owner=owner, marketer=marketer, topic=topic.id, pat=pat)


def _captured(capture: dict, rcpt: str, timeout: float = 60.0) -> list[email.message.EmailMessage]:
    from carepost.core.mailcapture import capture_files, read_capture

    deadline = time.time() + timeout
    while time.time() < deadline:
        found = []
        for path in capture_files(capture["dir"]):
            msg = email.message_from_bytes(read_capture(path, capture["keys"]), policy=email_policy.default)
            if rcpt in (msg.get_all("X-CarePost-Capture-Rcpt-To") or []):
                found.append(msg)
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"nothing for {rcpt} arrived in the capture")


def test_compose_preview_test_send_and_statuses(page, clinic, capture, worker, live_server):
    ui_login(page, clinic.owner)
    page.get_by_role("link", name="Compose").click()
    expect(page.locator("h1")).to_have_text("Compose")

    # A patient found by name, and a typed address.
    page.fill("#contact_name", "quill")
    page.get_by_test_id("contact-search").click()
    found = page.get_by_test_id("found-contact")
    expect(found).to_have_count(1)
    expect(found).to_contain_text("Patricia Quill")
    found.locator("input").check()
    page.fill("#addresses", "lee.hart@elsewhere.example")
    page.fill("#from", f"care@{clinic.domain}")
    page.fill("#subject", "A message from your care team")
    page.fill("#text", "Dear {{ first_name }}, your lab results are ready in the portal.")
    page.select_option("#purpose", "treatment")

    # The per-recipient security preview, before anything is sent.
    page.get_by_test_id("preview-security").click()
    rows = page.get_by_test_id("preview-row")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("Patricia Quill <patricia.quill@patients.example>")
    expect(rows.nth(1)).to_contain_text("lee.hart@elsewhere.example")
    expect(page.get_by_test_id("preview-method")).to_have_text(["tls", "tls"])
    expect(rows.nth(0)).to_contain_text("the relay enforces verified TLS")

    # A test to oneself arrives in the capture, merge fields as their names, never patient data.
    page.get_by_test_id("send-test").click()
    expect(page.get_by_test_id("test-sent")).to_contain_text(clinic.owner.email)
    (test_mail,) = _captured(capture, clinic.owner.email)
    assert test_mail["Subject"] == "[Test] A message from your care team"
    body = test_mail.get_body(("plain",)).get_content()
    assert "Dear [first_name], your lab results are ready" in body and "Patricia" not in body
    # The form kept what was typed (the preview and the test answer fragments).
    expect(page.locator("#text")).to_have_value("Dear {{ first_name }}, your lab results are ready in the portal.")

    # Send: one message each, statuses on the page that follows.
    page.get_by_test_id("send").click()
    page.wait_for_url(re.compile(r".*/app/compose/sent/[0-9a-f]{32}$"))
    expect(page.get_by_test_id("sent-row")).to_have_count(2)
    (pat_mail,) = _captured(capture, "patricia.quill@patients.example")
    (lee_mail,) = _captured(capture, "lee.hart@elsewhere.example")
    assert "Dear Patricia, your lab results" in pat_mail.get_body(("plain",)).get_content()
    assert "Dear , your lab results" in lee_mail.get_body(("plain",)).get_content()
    assert "lee.hart" not in pat_mail.as_string()  # no recipient sees another's address
    deadline = time.time() + 60
    while time.time() < deadline:
        page.reload()
        statuses = page.get_by_test_id("status").all_inner_texts()
        if statuses and all(s in ("sent", "delivered") for s in statuses):
            break
        time.sleep(0.5)
    assert sorted(page.get_by_test_id("status").all_inner_texts()) in (["delivered", "delivered"], ["sent", "sent"],
                                                                        ["delivered", "sent"])
    page.get_by_test_id("message-link").first.click()
    page.wait_for_url(re.compile(r".*/app/deliveries/[0-9a-f]{32}$"))
    expect(page.get_by_test_id("method")).to_have_text("tls")
    expect(page.get_by_test_id("status")).to_have_text(re.compile(r"sent|delivered"))
    # Ids only in every URL the flow visited.
    assert "patricia" not in page.url.lower() and "@" not in page.url


def test_bad_address_is_named_in_the_error(page, clinic):
    ui_login(page, clinic.owner)
    page.goto("/app/compose")
    page.fill("#addresses", "lee.hart@elsewhere.example\nnot an address")
    page.fill("#from", f"care@{clinic.domain}")
    page.fill("#subject", "Hello")
    page.fill("#text", "Hello there.")
    page.get_by_test_id("send").click()
    expect(page.get_by_test_id("compose-error")).to_contain_text("addresses.1")
    expect(page.get_by_test_id("field-error-addresses")).to_be_visible()
    expect(page.locator("#addresses")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#addresses")).to_have_value("lee.hart@elsewhere.example\nnot an address")


def test_marketer_sends_marketing_and_is_refused_treatment(page, clinic):
    ui_login(page, clinic.marketer)
    page.get_by_role("link", name="Compose").click()
    expect(page.get_by_test_id("marketer-note")).to_be_visible()
    options = page.locator("#purpose option").evaluate_all("els => els.map(e => e.value)")
    assert "treatment" not in options and "marketing" in options
    expect(page.locator("#contact_name")).to_have_count(0)  # name search needs unmasked PHI

    def fill():
        page.fill("#contact_id_typed", clinic.pat)
        page.fill("#from", f"news@{clinic.domain}")
        page.fill("#subject", "Yoga classes this spring")
        page.fill("#text", "Hi {{ first_name }}, yoga starts Monday.")
        page.select_option("#contains_phi", "no")

    # Marketing without its topic: refused naming the topic.
    fill()
    page.select_option("#purpose", "marketing")
    page.get_by_test_id("send").click()
    expect(page.get_by_test_id("compose-error")).to_contain_text("topic")

    # A form changed to ask for treatment is refused by the server (403 naming the purpose).
    fill()
    page.locator("#purpose").evaluate("s => { const o = document.createElement('option'); o.value = 'treatment'; "
                                      "o.text = 'Treatment'; s.add(o); s.value = 'treatment'; }")
    page.get_by_test_id("send").click()
    expect(page.get_by_test_id("compose-error")).to_contain_text("purpose")
    expect(page.get_by_test_id("compose-error")).to_contain_text("commercial messages")

    # Marketing in its topic is sent; the patient signed no authorization, so it is excluded.
    fill()
    page.select_option("#purpose", "marketing")
    page.select_option("#topic", clinic.topic)
    page.get_by_test_id("preview-security").click()
    expect(page.get_by_test_id("preview-method")).to_have_text(["excluded"])
    expect(page.get_by_test_id("preview-row")).to_contain_text("No signed authorization")
    expect(page.get_by_test_id("preview-row")).not_to_contain_text("patricia.quill")  # masked for a marketer
    page.get_by_test_id("send").click()
    page.wait_for_url(re.compile(r".*/app/deliveries/[0-9a-f]{32}$"))
    expect(page.get_by_test_id("status")).to_have_text("excluded")
    expect(page.locator("body")).to_contain_text("no_authorization")
