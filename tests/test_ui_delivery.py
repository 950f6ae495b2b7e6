"""Headless Chromium on the delivery pages: setting up a sending domain — add it, read the DNS
records the page shows, publish them on the local DNS test server, run the live check (htmx) and
see pass/fail per record. The live server's look-ups go to that DNS server."""

from __future__ import annotations

import re
import secrets

import pytest
from playwright.sync_api import expect

from tests.fixtures.accounts import ui_login

pytestmark = pytest.mark.ui


@pytest.fixture(scope="module")
def live_server_env(dns_server):
    return {"CAREPOST_DNS_NAMESERVERS": f"127.0.0.1:{dns_server.port}", "CAREPOST_SMTP_HELO_NAME": "mail.ui-test.example",
            "CAREPOST_DNS_TIMEOUT": "2"}


@pytest.fixture(scope="module")
def developer(live_server):
    """A developer (domains:manage) of a fresh organization."""
    from carepost.accounts import mfa
    from carepost.accounts.models import User
    from carepost.accounts.passwords import hash_password
    from carepost.accounts.service import add_membership, create_organization
    from carepost.core import clock
    from carepost.core.database import system_session
    from tests.fixtures.accounts import TestUser, strong_password

    with system_session() as s:
        org = create_organization(s, f"Delivery UI {secrets.token_hex(3)}")
        password = strong_password()
        user = User(email=f"dui-{secrets.token_hex(4)}@example.test", display_name="Dee Veloper",
                    password_hash=hash_password(password), password_changed_at=clock.now())
        s.add(user)
        s.flush()
        secret = mfa.new_totp_secret()
        mfa.store_totp_secret(s, user, secret)
        user.totp_confirmed_at = clock.now()
        add_membership(s, org.id, user, "developer")
        s.commit()
        return TestUser(id=user.id, email=user.email, password=password, totp_secret=secret, org_id=org.id, role="developer")


def _txt(value: str) -> str:
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


def _shown_records(page) -> dict[str, dict]:
    out = {}
    for block in page.get_by_test_id("record").all():
        purpose = block.get_attribute("data-purpose")
        codes = block.locator("code").all_inner_texts()
        kind = block.locator("h3 .badge").first.inner_text()
        out[purpose] = {"name": codes[0].strip(), "value": codes[1].strip(), "type": kind.strip()}
    return out


def _publish(dns_server, record: dict) -> None:
    if record["type"] == "TXT":
        dns_server.add(record["name"], "TXT", _txt(record["value"]))
    elif record["type"] == "MX":
        dns_server.add(record["name"], "MX", record["value"] + ".")
    else:  # the MTA-STS host: a CNAME to the web host, which must resolve
        dns_server.add(record["name"], "A", "127.0.0.1")


def test_sending_domain_setup_with_live_dns_check(page, developer, dns_server):
    domain = f"ui{secrets.token_hex(3)}.example"
    ui_login(page, developer)
    page.get_by_role("link", name="Sending domains").click()
    page.fill("#domain", domain)
    page.get_by_role("button", name="Add domain").click()
    page.wait_for_url(re.compile(r".*/app/domains/[0-9a-f]{32}$"))
    expect(page.locator("h1")).to_have_text(domain)
    records = _shown_records(page)
    assert set(records) == {"dkim", "dkim-ed25519", "spf", "dmarc", "return-path-mx", "tls-rpt", "mta-sts", "mta-sts-host", "ownership"}
    assert records["dkim"]["value"].startswith("v=DKIM1; k=rsa; p=MII") and len(records["dkim"]["value"]) > 300
    assert records["spf"] == {"name": f"bounces.{domain}", "value": "v=spf1 a:mail.ui-test.example -all", "type": "TXT"}
    # A copy button copies the exact value.
    page.locator("[data-purpose=dkim] [data-copy-target^=rv-]").click()
    expect(page.locator("[data-purpose=dkim] [data-copy-target^=rv-]")).to_have_text("Copied")

    # Only the DKIM keys and DMARC are published so far.
    for purpose in ("dkim", "dkim-ed25519", "dmarc"):
        _publish(dns_server, records[purpose])
    page.get_by_test_id("check-dns").click()
    expect(page.get_by_test_id("check-summary")).to_contain_text("not check out yet")
    status = {p: page.locator(f"[data-purpose={p}] [data-testid=record-status]") for p in records}
    expect(status["dkim"]).to_have_text("Pass")
    expect(status["dmarc"]).to_have_text("Pass")
    expect(status["spf"]).to_have_text("Fail")
    expect(page.locator("[data-purpose=spf] [data-testid=record-detail]")).to_have_text("no SPF record")
    expect(status["return-path-mx"]).to_have_text("Fail")
    # Issue 9 item 2: nothing can be sent until the ownership record is found.
    expect(status["ownership"]).to_have_text("Fail")
    expect(page.get_by_test_id("ownership-status")).to_contain_text("Ownership not proven")

    # Publish the rest: every record passes, and the list shows the domain as ready.
    for purpose in ("spf", "return-path-mx", "tls-rpt", "mta-sts", "mta-sts-host", "ownership"):
        _publish(dns_server, records[purpose])
    page.get_by_test_id("check-dns").click()
    expect(page.get_by_test_id("check-summary")).to_have_text("Every record passes.")
    for purpose in records:
        expect(page.locator(f"[data-purpose={purpose}] [data-testid=record-status]")).to_have_text("Pass")
    expect(page.get_by_test_id("ownership-status")).to_contain_text("Ownership proven")
    page.get_by_role("link", name="Sending domains").first.click()
    expect(page.get_by_test_id("domains")).to_contain_text("All records pass")
    row = page.get_by_test_id("domains").locator("tr", has_text=domain)
    expect(row.get_by_test_id("ownership-badge")).to_have_count(0)


def test_domain_page_warns_of_local_names_and_deletes_a_domain_after_confirmation(page, developer, live_server):
    """Issue 10 item 12: the live server's base URL is a loopback address, so the page warns that
    the records are useless; the HELO name is a real name, so no HELO warning. Removing a domain
    asks first (dismissing keeps it), then removes it and audits the removal."""
    from sqlalchemy import select

    from carepost.audit.models import AuditEvent
    from carepost.core.database import system_session

    domain = f"del{secrets.token_hex(3)}.example"
    ui_login(page, developer)
    page.goto(live_server.url + "/app/domains")
    warnings = page.get_by_test_id("domain-setup-warning")
    expect(warnings).to_have_count(1)
    expect(warnings).to_contain_text("The base URL is http://")
    expect(warnings).to_contain_text("CAREPOST_BASE_URL")
    page.fill("#domain", domain)
    page.get_by_role("button", name="Add domain").click()
    page.wait_for_url(re.compile(r".*/app/domains/[0-9a-f]{32}$"))
    domain_id = page.url.rsplit("/", 1)[-1]
    expect(page.get_by_test_id("domain-setup-warning")).to_have_count(1)

    page.once("dialog", lambda d: d.dismiss())
    page.get_by_test_id("delete-domain").click()
    expect(page.locator("h1")).to_have_text(domain)  # dismissed: nothing happened
    messages = []

    def accept(dialog):
        messages.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    page.get_by_test_id("delete-domain").click()
    page.wait_for_url(re.compile(r".*/app/domains\?deleted=1$"))
    assert domain in messages[0]
    expect(page.get_by_test_id("domain-deleted")).to_be_visible()
    expect(page.locator("body")).not_to_contain_text(domain)
    assert page.goto(f"{live_server.url}/app/domains/{domain_id}").status == 404
    with system_session() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "domain.delete", AuditEvent.target_id == domain_id)).one()
        assert event.details["domain"] == domain and event.details["via"] == "ui"


@pytest.mark.parametrize(("base_url", "helo", "expected"), [
    ("http://localhost:8000", "localhost", ["base URL", "HELO name"]),
    ("https://care.clinic.example", "mx.clinic.example", []),
    ("https://care.clinic.example", "laptop", ["HELO name"]),
    ("http://127.0.0.1:8000", "mx.clinic.example", ["base URL"]),
])
def test_setup_warnings_name_what_is_local(monkeypatch, base_url, helo, expected):
    from carepost.core.config import reset_settings
    from carepost.delivery.pages import setup_warnings

    monkeypatch.setenv("CAREPOST_BASE_URL", base_url)
    monkeypatch.setenv("CAREPOST_SMTP_HELO_NAME", helo)
    reset_settings()
    try:
        found = setup_warnings()
        assert [w.split(" is ", 1)[0].removeprefix("The ") for w in found] == expected
    finally:
        monkeypatch.undo()
        reset_settings()
