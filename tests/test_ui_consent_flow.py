"""Headless Chromium, end to end: a patient signs a marketing authorization on a hosted form
(drawing their signature), confirms it through the link sent to their address, later revokes it
from the revocation link of their copy, and a marketing message to them is then refused with
the reason (``excluded``, ``authorization_revoked``).

The live server and a ``carepost worker`` are other processes: nothing here empties the
database under them. The confirmation and revocation links are the ones the emails carry, made
from the database. The marketing message is checked at acceptance and again when the worker
claims it; either way the recipient ends ``excluded`` with the reason, and nothing is sent.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from carepost.core.database import system_session
from tests.fixtures.delivery import prove_ownership

pytestmark = pytest.mark.ui
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _quick_forms():
    """The hosted form's minimum fill time is 1 s here (3 s by default); set before the server starts."""
    from carepost.core.config import reset_settings

    before = os.environ.get("CAREPOST_FORM_MIN_FILL_SECONDS")
    os.environ["CAREPOST_FORM_MIN_FILL_SECONDS"] = "1"
    reset_settings()
    yield
    if before is None:
        os.environ.pop("CAREPOST_FORM_MIN_FILL_SECONDS", None)
    else:
        os.environ["CAREPOST_FORM_MIN_FILL_SECONDS"] = before
    reset_settings()


@pytest.fixture(scope="module")
def clinic(live_server):
    """An organization (default authorization texts), a sending domain, an API credential, and a
    published form with a marketing authorization block that offers a drawn signature."""
    from carepost.accounts import credentials as creds
    from carepost.accounts.service import create_organization
    from carepost.delivery import service as delivery
    from carepost.forms import service as forms
    from carepost.forms.schemas import FormIn

    tag = secrets.token_hex(3)
    with system_session() as s:
        org = create_organization(s, f"Consent Flow Clinic {tag}")
        forms.scope_to(s, org.id)
        prove_ownership(s, delivery.create_sending_domain(s, org.id, f"mail-{tag}.example", ed25519=False))
        cred, secret = creds.create_credential(s, org.id, name="Consent flow",
                                               scopes=["messages:send", "messages:read", "phi:read_unmasked"])
        form = forms.create_form(s, org.id, FormIn(name="Stay in touch", fields=[
            {"key": "email", "type": "email", "label": "Email address", "required": True, "contact_field": "email"},
            {"key": "first", "type": "text", "label": "First name", "contact_field": "given_name"},
            {"key": "auth", "type": "authorization", "label": "Marketing authorization", "purpose": "marketing",
             "drawn_signature": True, "required": True},
        ]))
        forms.publish(s, form)
        s.commit()
        return {"org_id": org.id, "domain": f"mail-{tag}.example", "form_id": form.id, "public_id": form.public_id,
                "headers": {"Authorization": f"Bearer {cred.key_id}.{secret}"}}


@pytest.fixture(scope="module")
def worker(storage, live_server, tmp_path_factory):
    """``carepost worker`` consuming the queue the live server enqueues deliveries on."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "carepost.cli", "worker", "--threads", "1", "--no-periodic"], cwd=str(ROOT),
                            env={**os.environ, **storage.env, "CAREPOST_LOG_JSON": "true"}, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    yield proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _submission(form_id: str):
    from carepost.forms.models import FormSubmission

    with system_session() as s:
        return s.scalars(select(FormSubmission).where(FormSubmission.form_id == form_id)).one()


def test_sign_confirm_revoke_then_marketing_is_refused(page, live_server, clinic, worker):
    from carepost.consent import authorizations as auths
    from carepost.consent.models import Authorization
    from carepost.forms import service as forms
    from carepost.forms.models import FormSubmission

    csp_errors: list[str] = []
    page.on("console", lambda msg: csp_errors.append(msg.text) if "Content Security Policy" in msg.text else None)

    # 1. The patient fills in the hosted form and draws a signature.
    page.goto(f"/f/{clinic['public_id']}")
    expect(page.get_by_role("heading", name="Stay in touch")).to_be_visible()
    page.get_by_label("Email address").fill("river@example.org")
    page.get_by_label("First name").fill("River")
    page.get_by_label("I have read this authorization and I sign it.").check()
    page.get_by_label("Your full name (typed signature)").fill("River Example")
    canvas = page.locator("canvas.sig-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + box["height"] / 2)
    page.mouse.down()
    for i in range(1, 12):
        page.mouse.move(box["x"] + 20 + i * 25, box["y"] + box["height"] / 2 + (12 if i % 2 else -12))
    page.mouse.up()
    assert page.locator("input[name='f_auth__drawn']").input_value().startswith("data:image/png;base64,")
    page.wait_for_timeout(1100)  # the configured minimum fill time
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_test_id("form-thanks")).to_contain_text("we have sent an email")

    sub = _submission(clinic["form_id"])
    assert sub.status == "pending_confirmation" and sub.contact_created
    with system_session() as s:
        assert s.scalars(select(Authorization).where(Authorization.org_id == clinic["org_id"])).all() == []
        token = forms.confirmation_token(s, s.get(FormSubmission, sub.id))

    # 2. The link from the confirmation email: a page first (GET never acts), then Confirm.
    page.goto(f"/f/confirm/{token}")
    expect(page.get_by_test_id("confirm-card")).to_contain_text("Record your signed authorization")
    page.get_by_role("button", name="Confirm").click()
    expect(page.get_by_role("heading", name="Confirmed")).to_be_visible()

    with system_session() as s:
        [row] = s.scalars(select(Authorization).where(Authorization.org_id == clinic["org_id"])).all()
        assert (row.contact_id, row.purpose, row.method, row.signature_kind, row.status) == (
            sub.contact_id, "marketing", "form", "drawn", "active")
        forms.scope_to(s, clinic["org_id"])
        revoke_link = auths.revocation_url(s, row)
        s.commit()

    # 3. Later, from the revocation link in their copy, the patient revokes.
    page.goto(revoke_link.replace(live_server.url, ""))
    page.get_by_label("I revoke this authorization").check()
    page.get_by_test_id("revoke").click()
    expect(page.get_by_test_id("revoked")).to_be_visible()
    with system_session() as s:
        assert s.get(Authorization, row.id).status == "revoked"

    # 4. A marketing message to them is accepted but refused for that recipient, with the reason.
    with httpx.Client(base_url=live_server.url, headers=clinic["headers"], timeout=15) as api:
        r = api.post("/api/v1/messages", json={
            "from": f"news@{clinic['domain']}", "to": ["river@example.org"], "subject": "Spring wellness offers",
            "text": "Our new programs.", "purpose": "marketing", "contains_phi": False})
        assert r.status_code == 202, r.text
        deadline = time.time() + 30
        while True:
            message = api.get(f"/api/v1/messages/{r.json()['id']}").json()
            if message["recipients"][0]["status"] != "queued" or time.time() > deadline:
                break
            time.sleep(0.3)
    [recipient] = message["recipients"]
    assert (recipient["status"], recipient["reason"]) == ("excluded", "authorization_revoked"), (
        message, Path(worker.log_path).read_text()[-3000:])
    assert not csp_errors, csp_errors
