"""The analytics page in headless Chromium (issue 13 item 6): an owner sees totals, the chart drawn
by the vendored uPlot (a canvas, no console error, nothing from another host — the ``page``
fixture fails on any foreign request), the table per message source and the CSV link; an analyst
without ``phi:read_unmasked`` sees small cells suppressed."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from carepost.core import clock
from carepost.tracking import rollups
from tests.fixtures.accounts import add_staff, ui_login

pytestmark = pytest.mark.ui


def _seed(session, org_id: str) -> None:
    now = clock.now()
    for hours_ago, n in ((1, 400), (26, 250), (50, 120)):
        at = now - timedelta(hours=hours_ago)
        rollups.add(session, org_id=org_id, at=at, metric="accepted", n=n, source="campaign", campaign_id="c" * 26,
                    receiving_domain="gmail.com", purpose="marketing")
        rollups.add(session, org_id=org_id, at=at, metric="delivered", n=n - 5, source="campaign",
                    campaign_id="c" * 26, receiving_domain="gmail.com", purpose="marketing")
        rollups.add(session, org_id=org_id, at=at, metric="opened_human", n=n // 3, source="campaign",
                    campaign_id="c" * 26, receiving_domain="gmail.com", purpose="marketing")
    rollups.add(session, org_id=org_id, at=now, metric="accepted", n=7, source="api", receiving_domain="other",
                purpose="treatment")
    rollups.add(session, org_id=org_id, at=now, metric="secured:tls1.3", n=700, source="campaign")
    session.commit()


@pytest.fixture(scope="module")
def clinic(live_server):
    """One organization for the module (the live server keeps its keys for the module's life):
    a week of rollups, an owner and an analyst."""
    from types import SimpleNamespace

    from carepost.accounts.service import create_organization
    from carepost.core.database import system_session

    with system_session() as s:
        org = create_organization(s, "Analytics Clinic")
        s.commit()
        _seed(s, org.id)
        owner, analyst = add_staff(s, org.id, "owner"), add_staff(s, org.id, "analyst")
        s.commit()
    return SimpleNamespace(org_id=org.id, owner=owner, analyst=analyst)


def test_analytics_page_draws_the_chart(page, clinic):
    owner = clinic.owner
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    ui_login(page, owner)
    page.get_by_test_id("main-nav").get_by_role("link", name="Analytics").click()
    page.wait_for_url(re.compile(r".*/app/analytics$"))
    chart = page.get_by_test_id("analytics-chart")
    chart.locator("canvas").wait_for()
    assert chart.get_attribute("data-drawn") == "true"
    assert chart.locator(".u-legend").inner_text().count("Accepted") >= 1
    totals = page.get_by_test_id("analytics-totals")
    assert totals.locator("[data-metric='accepted'] .stat-value").inner_text() == "777"
    rows = page.get_by_test_id("by-source").locator("tbody tr")
    assert rows.count() == 2
    assert "Transactional API" in rows.nth(0).inner_text() and "Campaigns" in rows.nth(1).inner_text()
    assert rows.nth(0).locator("td").first.inner_text() == "7"
    assert page.get_by_test_id("secured").inner_text() == "tls1.3: 700"
    href = page.get_by_test_id("csv-source").get_attribute("href")
    response = page.request.get(href)
    assert response.status == 200 and response.text().splitlines()[0].startswith("source,")

    # By hour from three days back (the seed reaches 50 hours back, whatever the hour now), filtered to marketing: only the campaign counts.
    page.select_option("#f-interval", "hour")
    page.select_option("#f-purpose", "marketing")
    page.fill("#f-start", (clock.now() - timedelta(days=3)).date().isoformat())
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r".*interval=hour.*"))
    page.get_by_test_id("analytics-chart").locator("canvas").wait_for()
    assert page.get_by_test_id("analytics-totals").locator("[data-metric='accepted'] .stat-value").inner_text() == "770"
    assert not errors, errors


def test_analytics_page_suppresses_small_cells_without_phi_rights(page, clinic):
    analyst = clinic.analyst
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    ui_login(page, analyst)
    page.goto("/app/analytics")
    page.get_by_test_id("analytics-chart").locator("canvas").wait_for()
    assert page.get_by_test_id("small-cell-notice").is_visible()
    api_row = page.get_by_test_id("by-source").locator("tbody tr").nth(0)
    assert "Transactional API" in api_row.inner_text()
    assert api_row.locator("td").first.inner_text() == "<11"
    # The campaign's 770 stays exact; the total would give the 7 away (777 - 770), so the smallest
    # shown cell of that column is suppressed too.
    campaign_row = page.get_by_test_id("by-source").locator("tbody tr").nth(1)
    assert campaign_row.locator("td").first.inner_text() == "suppressed"
    assert not errors, errors
