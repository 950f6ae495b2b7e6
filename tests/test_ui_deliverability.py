"""The deliverability page and SPF/DMARC validation in headless Chromium (issue 13 item 7).

A marketer's organization has sent to Gmail, Yahoo and other domains (counted through the real
rollup API), receivers have mailed a DMARC aggregate report and an SMTP TLS report (read by the
real parser), and the hourly evaluation raised an alert over Gmail's 0.3% spam-rate limit. The
owner sees the banner on the dashboard, follows it to /app/deliverability, reads the per-provider
table, the alert, the DMARC sources and the TLS summary, switches to 30 days; then validates a
sending domain's SPF and DMARC against Debian's nsd serving the zone (the live server's
``CAREPOST_DNS_NAMESERVERS``) and sees the broken record named."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest

from carepost.core import clock
from carepost.tracking import rollups
from tests.fixtures.accounts import ui_login
from tests.fixtures.nsd import NsdServer
from tests.test_bounces import FROM_DOMAIN, make_sent
from tests.test_tracking_feedback import AGGREGATE, tls_report

pytestmark = pytest.mark.ui

MAIL_HOST = "mail.carepost.test"
ZONES = {
    # The organization's From domain: DMARC p=none without rua; the return path's SPF misses the mail server.
    FROM_DOMAIN: ['_dmarc IN TXT "v=DMARC1; p=none"', 'bounces IN TXT "v=spf1 ip4:198.51.100.7 -all"'],
    "carepost.test": ["mail IN A 192.0.2.25"],
}


@pytest.fixture(scope="module")
def nsd(tmp_path_factory):
    server = NsdServer(tmp_path_factory.mktemp("nsd-ui"), ZONES)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live_server_env(nsd) -> dict:
    return {"CAREPOST_DNS_NAMESERVERS": nsd.nameservers, "CAREPOST_SMTP_HELO_NAME": MAIL_HOST}


def _aggregate_now() -> bytes:
    end = int(time.time()) - 3600
    xml = AGGREGATE.replace("<begin>1764633600</begin><end>1764719999</end>",
                            f"<begin>{end - 86400}</begin><end>{end}</end>")
    return xml.format(report_id="ui-1", domain=FROM_DOMAIN, reporter="google.com",
                      return_domain=f"bounces.{FROM_DOMAIN}").encode()


def _tls_now() -> bytes:
    today = clock.now().strftime("%Y-%m-%d")
    return tls_report("ui-tls").replace(b"2026-12-02", today.encode())


def _seed(session, org_id) -> str:
    from carepost.core.database import org_session
    from carepost.tracking import deliverability, feedback

    sent = make_sent(session, org_id)  # the proven sending domain
    now = clock.now()
    for domain, metrics in (("gmail.com", {"sent": 2000, "delivered": 2000, "complained": 8}),
                            ("yahoo.com", {"sent": 800, "delivered": 790, "bounced_hard": 4, "deferred": 12}),
                            ("other", {"sent": 300, "delivered": 280, "bounced_hard": 20})):
        for metric, n in metrics.items():
            rollups.add(session, org_id=org_id, at=now, metric=metric, n=n, receiving_domain=domain, source="campaign")
    rollups.add(session, org_id=org_id, at=now - timedelta(days=20), metric="sent", n=10000,
                receiving_domain="gmail.com", source="campaign")
    session.commit()
    with org_session(org_id) as work:
        assert feedback.store_dmarc(work, org_id, _aggregate_now(), inbound_report_id=None).status == "applied"
        assert feedback.store_tls(work, org_id, _tls_now(), inbound_report_id=None).status == "applied"
        deliverability.evaluate(work, org_id)
        work.commit()
    return sent.domain.id


def test_owner_reads_deliverability_and_validates_records(page, live_server, session, org, make_user):
    domain_id = _seed(session, org.id)
    owner = make_user(org, role="owner")
    ui_login(page, owner)

    banner = page.get_by_test_id("deliverability-banner")
    assert "gmail.com" in banner.inner_text() and "over the 0.3% limit" in banner.inner_text()
    banner.get_by_role("link", name="See deliverability").click()
    page.wait_for_url(re.compile(r".*/app/deliverability$"))
    assert page.get_by_test_id("main-nav").get_by_role("link", name="Deliverability").is_visible()

    table = page.get_by_test_id("provider-table")
    gmail = table.locator("tr[data-provider='gmail.com']")
    assert gmail.locator("[data-rate='complaint_rate'] [data-testid='rate-value']").inner_text() == "0.40%"
    assert gmail.locator("[data-rate='complaint_rate'] [data-testid='rate-status']").inner_text() == "Over the limit"
    yahoo = table.locator("tr[data-provider='yahoo.com']")
    assert yahoo.locator("[data-rate='complaint_rate'] [data-testid='rate-status']").inner_text() == "OK"
    assert yahoo.locator("[data-rate='deferral_rate'] [data-testid='rate-value']").inner_text() == "1.50%"
    other = table.locator("tr[data-provider='other']")
    assert other.locator("[data-rate='bounce_rate'] [data-testid='rate-status']").inner_text() == "Over the limit"
    assert table.locator("tr[data-provider='all'] td").first.inner_text() == "3100"

    alerts = page.get_by_test_id("alerts-table").locator("tr[data-active='true']")
    assert alerts.count() == 2  # Gmail's complaint rate and other's hard bounces
    assert "gmail.com" in alerts.all_inner_texts()[0] + alerts.all_inner_texts()[1]

    sources = page.get_by_test_id("dmarc-sources")
    assert sources.locator("tr[data-source='192.0.2.10'] [data-testid='dmarc-status']").inner_text() == "pass"
    assert sources.locator("tr[data-source='198.51.100.7'] [data-testid='dmarc-status']").inner_text() == "fail"
    assert page.get_by_test_id("tls-successful").inner_text() == "97"
    assert page.get_by_test_id("tls-failure-type").inner_text() == "certificate-expired: 3"

    page.get_by_role("link", name="last 30 days").click()
    page.wait_for_url(re.compile(r".*/app/deliverability\?days=30$"))
    assert page.get_by_test_id("provider-table").locator("tr[data-provider='gmail.com'] td").first.inner_text() == "12000"

    # SPF and DMARC validation on the sending-domain page, against the local nsd.
    page.goto(f"/app/domains/{domain_id}")
    page.get_by_test_id("validate-records").click()
    summary = page.get_by_test_id("validation-summary")
    summary.wait_for()
    assert "need attention" in summary.inner_text()
    spf = page.locator("[data-testid='validation-record'][data-kind='spf']")
    assert spf.get_by_test_id("validation-status").inner_text() == "Invalid"
    assert "192.0.2.25" in spf.inner_text() and "does not authorize" in spf.inner_text()
    dmarc = page.locator("[data-testid='validation-record'][data-kind='dmarc']")
    assert dmarc.get_by_test_id("validation-published").inner_text() == "v=DMARC1; p=none"
    assert dmarc.locator("[data-testid='finding'][data-level='warning']").count() >= 2
