"""Deliverability per sending domain in headless Chromium (issue 13 item 7): mail from two of the
organization's sending domains (counted through the real rollup API, with the sending-domain
dimension), the hourly evaluation raises an alert for the newsletter domain's complaint rate over
0.3%; the owner sees it in the dashboard banner ("from news…"), follows it, and reads the per
sending domain table and the alert."""

from __future__ import annotations

import re
import secrets

import pytest

from carepost.core import clock
from carepost.tracking import rollups
from tests.fixtures.accounts import ui_login

pytestmark = pytest.mark.ui


def _seed(session, org_id) -> tuple[str, str]:
    from carepost.core.database import org_session
    from carepost.delivery import service
    from carepost.tracking import deliverability

    tag = secrets.token_hex(3)
    with org_session(org_id) as s:
        news = service.create_sending_domain(s, org_id, f"news-{tag}.clinic.example").domain
        care = service.create_sending_domain(s, org_id, f"care-{tag}.clinic.example")
        news_row = service.sending_domain_for(s, org_id, news)
        ids = (news_row.id, care.id)
        names = (news, care.domain)
        s.commit()
    now = clock.now()
    for domain_id, metrics in ((ids[0], {"sent": 1000, "delivered": 1000, "complained": 4, "bounced_hard": 5}),
                               (ids[1], {"sent": 3000, "delivered": 2990, "bounced_hard": 10})):
        for metric, n in metrics.items():
            rollups.add(session, org_id=org_id, at=now, metric=metric, n=n, receiving_domain="outlook.com",
                        source="campaign", sending_domain_id=domain_id)
    session.commit()
    with org_session(org_id) as work:
        deliverability.evaluate(work, org_id)
        work.commit()
    return names


def test_owner_reads_rates_and_alerts_per_sending_domain(page, live_server, session, org, make_user):
    news, care = _seed(session, org.id)
    owner = make_user(org, role="owner")
    ui_login(page, owner)

    banner = page.get_by_test_id("deliverability-banner")
    assert f"from {news}" in banner.inner_text() and "over the 0.3% limit" in banner.inner_text()
    banner.get_by_role("link", name="See deliverability").click()
    page.wait_for_url(re.compile(r".*/app/deliverability$"))

    table = page.get_by_test_id("sending-domain-table")
    row = table.locator(f"tr[data-sending-domain='{news}']")
    assert row.locator("th").inner_text() == news
    assert row.locator("[data-rate='complaint_rate'] [data-testid='rate-value']").inner_text() == "0.40%"
    assert row.locator("[data-rate='complaint_rate'] [data-testid='rate-status']").inner_text() == "Over the limit"
    assert row.locator("[data-rate='bounce_rate'] [data-testid='rate-status']").inner_text() == "OK"
    clean = table.locator(f"tr[data-sending-domain='{care}']")
    assert clean.locator("td").first.inner_text() == "3000"
    assert clean.locator("[data-rate='complaint_rate'] [data-testid='rate-status']").inner_text() == "OK"

    alerts = page.get_by_test_id("alerts-table").locator("tr[data-active='true']")
    texts = alerts.all_inner_texts()
    assert any(f"from {news}" in t and "Complaint" in t for t in texts), texts
    assert not any(care in t for t in texts)
