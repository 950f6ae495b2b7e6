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
    assert set(records) == {"dkim", "dkim-ed25519", "spf", "dmarc", "return-path-mx", "mta-sts", "mta-sts-host"}
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

    # Publish the rest: every record passes, and the list shows the domain as ready.
    for purpose in ("spf", "return-path-mx", "mta-sts", "mta-sts-host"):
        _publish(dns_server, records[purpose])
    page.get_by_test_id("check-dns").click()
    expect(page.get_by_test_id("check-summary")).to_have_text("Every record passes.")
    for purpose in records:
        expect(page.locator(f"[data-purpose={purpose}] [data-testid=record-status]")).to_have_text("Pass")
    page.get_by_role("link", name="Sending domains").first.click()
    expect(page.get_by_test_id("domains")).to_contain_text("All records pass")
