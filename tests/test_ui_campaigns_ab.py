"""Headless Chromium through an A/B/n campaign (issue 14 item 4), with a real ``carepost serve``, a
real ``carepost worker`` and the local mail capture of ``carepost run``.

A marketer builds a three-variant test in the wizard — A the campaign's version, B another
version of the template (content), C the same content sent an hour later (send time) — adding and
removing rows in place (campaigns-ab.js under the page's CSP), with a 20 % holdout, a 60 % test
fraction, human clicks as the metric and the winner after 4 hours; a bad send offset is named at
its row; the variant rows fit a 390 px screen. Compliance approves, the marketer launches, the
worker plans: every recipient row is a variant, the holdout or waits for the winner, and the
messages of A and B land in the capture with their own content. The campaign page shows each
variant, the holdout and the rest, with the significance the code computes.
"""

from __future__ import annotations

import email
import re
import secrets
import time
from email import policy as email_policy

import pytest
from playwright.sync_api import expect
from sqlalchemy import func, select

from tests.fixtures.accounts import add_staff, ui_login
from tests.fixtures.ui import capture_relay_env, running_capture, running_worker
from tests.test_ui_campaigns import CLIPPED, next_step

pytestmark = pytest.mark.ui
expect.set_options(timeout=15000)
DOMAIN = "campaigns-ab-ui.example"
PATIENTS = 40


@pytest.fixture(scope="module")
def capture(storage, tmp_path_factory):
    yield from running_capture(tmp_path_factory)


@pytest.fixture(scope="module")
def live_server_env(capture):
    return capture_relay_env(capture, "mail.campaigns-ab-ui.example")


@pytest.fixture(scope="module")
def worker(storage, live_server, live_server_env, tmp_path_factory):
    yield from running_worker(storage, live_server, live_server_env, tmp_path_factory)


@pytest.fixture(scope="module")
def clinic(live_server):
    """A clinic with 40 authorized patients in Springfield, a marketing template with two
    versions, a marketer and a compliance officer."""
    from types import SimpleNamespace

    from carepost.accounts.service import create_organization
    from carepost.consent import authorizations
    from carepost.consent.service import set_consent_settings
    from carepost.content import service as content
    from carepost.content.schemas import TemplateIn
    from carepost.core import clock
    from carepost.core.database import org_session, system_session
    from carepost.delivery import service as delivery
    from carepost.patients import service as patients
    from carepost.segments import service as segments

    with system_session() as s:
        org = create_organization(s, f"AB Clinic {secrets.token_hex(2)}")
        marketer, compliance = add_staff(s, org.id, "marketer"), add_staff(s, org.id, "compliance_officer")
        s.commit()
        org_id = org.id
    tag = secrets.token_hex(3)
    with org_session(org_id) as s:
        domain = delivery.create_sending_domain(s, org_id, f"{tag}.{DOMAIN}")
        domain.verified_at = clock.now()
        set_consent_settings(s, org_id, {"postal_address": "AB Clinic, 1 Main Street, Springfield, IL 62701"})
        addresses = {}
        for i in range(PATIENTS):
            c = patients.save_contact(s, org_id, {"given_name": f"Pat{i}", "family_name": "Test", "city": "Springfield",
                                                  "preferred_language": "en",
                                                  "email": f"pat{i}.{tag}@patients.example"}).contact
            authorizations.record_authorization(s, org_id, contact_id=c.id, purpose="marketing", method="api",
                                                signature_name=f"Pat{i} Test", send_copy=False)
            addresses[c.id] = f"pat{i}.{tag}@patients.example"
        segments.create_segment(s, org_id, {"name": "Springfield", "query": "city = Springfield"}, segments.SYSTEM)
        template = content.create_template(s, org_id, TemplateIn(
            name="Flu season", subject="Flu shots this week", purpose="marketing", contains_phi=False, language="en",
            html="<p>Hello {{ first_name }}, flu shots are in: book online.</p>"))
        s.flush()
        content.update_template(s, template, TemplateIn(
            name="Flu season", subject="Flu shots this week", purpose="marketing", contains_phi=False, language="en",
            html="<p>Hello {{ first_name }}, walk in for your flu shot any day this week.</p>"))
        s.commit()
        return SimpleNamespace(org_id=org_id, domain=domain.domain, marketer=marketer, compliance=compliance,
                               addresses=addresses)


def _captured(capture: dict, rcpts: set[str], timeout: float = 90.0) -> dict[str, email.message.EmailMessage]:
    from carepost.core.mailcapture import capture_files, read_capture

    deadline = time.time() + timeout
    found: dict[str, email.message.EmailMessage] = {}
    while time.time() < deadline:
        for path in capture_files(capture["dir"]):
            msg = email.message_from_bytes(read_capture(path, capture["keys"]), policy=email_policy.default)
            for rcpt in msg.get_all("X-CarePost-Capture-Rcpt-To") or []:
                if rcpt in rcpts:
                    found.setdefault(rcpt, msg)
        if set(found) == rcpts:
            return found
        time.sleep(0.3)
    raise AssertionError(f"arrived: {sorted(found)}; expected {sorted(rcpts)}")


def _groups(org_id: str, campaign_id: str) -> dict[tuple[str, str | None], list[str]]:
    from carepost.campaigns.models import CampaignRecipient
    from carepost.core.database import org_session

    out: dict = {}
    with org_session(org_id) as s:
        for contact_id, status, variant in s.execute(
                select(CampaignRecipient.contact_id, CampaignRecipient.status, CampaignRecipient.variant)
                .where(CampaignRecipient.campaign_id == campaign_id)):
            group = "held_out" if status == "held_out" else "awaiting" if status == "awaiting" else "test"
            out.setdefault((group, variant), []).append(contact_id)
    return out


def test_marketer_builds_a_three_variant_test_on_content_and_send_time(browser, live_server, capture, worker, clinic):
    from carepost.campaigns.models import Campaign, CampaignRecipient
    from carepost.core.database import org_session

    foreign: list[str] = []

    def context():
        ctx = browser.new_context(base_url=live_server.url, viewport={"width": 1366, "height": 800})
        pg = ctx.new_page()
        pg.set_default_timeout(20000)
        pg.on("request", lambda req: foreign.append(req.url)
              if not req.url.startswith((live_server.url, "data:", "about:")) else None)
        return ctx, pg

    m_ctx, page = context()
    c_ctx, officer = context()
    try:
        ui_login(page, clinic.marketer)
        page.goto("/app/campaigns/new")
        page.fill("#f-name", "Flu shots A/B/n")
        page.select_option("#f-purpose", "marketing")
        page.select_option("#f-segment_id", label="Springfield")
        next_step(page)

        expect(page.get_by_test_id("wizard-steps").locator("[aria-current=step]")).to_have_text("2. Content")
        options = page.locator("#f-template_version_id option")
        v1 = options.filter(has_text="Flu season — version 1").get_attribute("value")
        v2 = options.filter(has_text="Flu season — version 2").get_attribute("value")
        page.select_option("#f-template_version_id", v1)
        page.select_option("#f-sending_domain_id", label=clinic.domain)
        page.fill("#f-from_address", f"care@{clinic.domain}")
        # By keyboard, like next_step: a click can land on the layout the preview frame moves.
        page.get_by_test_id("ab-test").locator("summary").press("Enter")
        expect(page.locator("#f-ab_enabled")).to_be_visible()
        page.locator("#f-ab_enabled").press("Space")  # by keyboard too (a click landed elsewhere at load)
        expect(page.locator("#f-ab_enabled")).to_be_checked()
        rows = page.get_by_test_id("ab-variant-row")
        expect(rows).to_have_count(2)
        url = page.url
        # add two rows and remove one, in place (the script; no round trip)
        page.get_by_test_id("ab-add").press("Enter")
        expect(rows).to_have_count(3)
        page.get_by_test_id("ab-add").press("Enter")
        expect(rows).to_have_count(4)
        expect(page.get_by_test_id("ab-variant-key")).to_have_text(["A", "B", "C", "D"])
        rows.nth(1).get_by_test_id("ab-remove").press("Enter")
        expect(rows).to_have_count(3)
        expect(page.get_by_test_id("ab-variant-key")).to_have_text(["A", "B", "C"])
        assert page.url == url
        page.select_option("#f-ab_v1_template_version_id", v2)  # B: the other content
        page.fill("#f-ab_v2_send_offset_minutes", "an hour")  # C: a send time, badly written
        page.fill("#f-ab_holdout", "20")
        page.fill("#f-ab_test_fraction", "60")
        page.select_option("#f-ab_metric", "human_clicks")
        page.fill("#f-ab_winner_after_hours", "4")
        next_step(page)
        expect(page.get_by_test_id("error-ab_v2_send_offset_minutes")).to_contain_text("whole number of minutes")
        expect(page.locator("#f-ab_v2_send_offset_minutes")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#f-ab_v1_template_version_id")).to_have_value(v2)  # kept what was typed
        page.fill("#f-ab_v2_send_offset_minutes", "60")
        # phone width: the three variant rows fit, nothing clipped
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate(CLIPPED) == []
        page.set_viewport_size({"width": 1366, "height": 800})
        next_step(page)

        expect(page.get_by_test_id("wizard-steps").locator("[aria-current=step]")).to_have_text("3. Schedule")
        next_step(page)
        page.wait_for_url(re.compile(r".*/app/campaigns/[0-9a-f]{32}/review$"))
        campaign_id = page.url.rsplit("/", 2)[-2]
        with org_session(clinic.org_id) as s:
            stored = s.get(Campaign, campaign_id).ab_test
        assert stored == {"variants": [{"key": "A"}, {"key": "B", "template_version_id": v2},
                                       {"key": "C", "send_offset_minutes": 60}],
                          "holdout": 0.2, "test_fraction": 0.6, "metric": "human_clicks", "winner_after_hours": 4}
        page.get_by_test_id("submit-campaign").click()
        page.wait_for_url(re.compile(rf".*/app/campaigns/{campaign_id}\?done=submitted$"))

        ui_login(officer, clinic.compliance)
        officer.goto(f"/app/campaigns/{campaign_id}")
        officer.fill("#approve-comment", "Variants checked")
        officer.get_by_test_id("approve").click()
        expect(officer.get_by_test_id("campaign-status")).to_have_text("approved")

        page.goto(f"/app/campaigns/{campaign_id}")
        page.get_by_test_id("action-launch").click()
        expect(page.get_by_test_id("campaign-progress")).to_be_visible()

        # planning (the worker) assigns every patient to a variant, the holdout or the rest
        deadline = time.time() + 90
        while time.time() < deadline:
            with org_session(clinic.org_id) as s:
                n = s.scalar(select(func.count()).select_from(CampaignRecipient)
                             .where(CampaignRecipient.campaign_id == campaign_id))
                status = s.get(Campaign, campaign_id).status
            if n == PATIENTS and status != "planning":
                break
            time.sleep(0.5)
        groups = _groups(clinic.org_id, campaign_id)
        assert sum(len(v) for v in groups.values()) == PATIENTS, groups.keys()
        assert set(groups) == {("held_out", "holdout"), ("awaiting", None), ("test", "A"), ("test", "B"),
                               ("test", "C")}, sorted(groups, key=str)
        # A and B are sent now, each with its own content; C waits an hour
        a, b = groups[("test", "A")][0], groups[("test", "B")][0]
        mails = _captured(capture, {clinic.addresses[a], clinic.addresses[b]})
        assert "book online" in mails[clinic.addresses[a]].get_body(("html",)).get_content()
        assert "walk in for your flu shot" in mails[clinic.addresses[b]].get_body(("html",)).get_content()
        with org_session(clinic.org_id) as s:
            offsets = {v: s.scalar(select(func.min(CampaignRecipient.send_after)).where(
                CampaignRecipient.campaign_id == campaign_id, CampaignRecipient.variant == v)) for v in ("A", "C")}
        assert 59 * 60 <= (offsets["C"] - offsets["A"]).total_seconds() <= 61 * 60 + 120, offsets

        # the report, for compliance (exact counts): each variant, the holdout, the rest, significance
        officer.goto(f"/app/campaigns/{campaign_id}")
        results = officer.get_by_test_id("ab-results")
        expect(results.get_by_test_id("ab-variant-key")).to_have_text(["A", "B", "C"])
        expect(results.get_by_test_id("ab-variant-recipients")).to_have_text(
            [str(len(groups[("test", k)])) for k in "ABC"])
        expect(results.get_by_test_id("ab-variant-differs")).to_have_text(
            [re.compile("campaign's"), "version 2", "sent 60 min later"])
        expect(results.get_by_test_id("ab-holdout-recipients")).to_have_text(str(len(groups[("held_out", "holdout")])))
        expect(results.get_by_test_id("ab-awaiting-recipients")).to_have_text(str(len(groups[("awaiting", None)])))
        expect(results.get_by_test_id("ab-verdict")).to_contain_text("significant")
        expect(results.get_by_test_id("ab-verdict")).to_contain_text("p < 0.05")
        expect(results.get_by_test_id("ab-winner-due")).to_contain_text(
            f"4 hours after the last test message is sent (some are still to send); "
            f"{len(groups[('awaiting', None)])} recipients wait")
    finally:
        m_ctx.close()
        c_ctx.close()
    assert not foreign, f"loaded from other hosts: {foreign}"
