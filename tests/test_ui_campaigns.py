"""Headless Chromium through the campaign pages (issue 14 item 7), with a real ``carepost serve``,
a real ``carepost worker`` and the local mail capture of ``carepost run``.

A marketer builds a campaign to a clinical segment (type 2 diabetes) in the wizard — a bad
field named inline at each step, the live count, a preview as a patient of the audience in both
widths, the compliance report —, checks at phone width (390 px) that nothing of the wizard is
clipped, and submits; a compliance officer approves it from the inbox with a comment; the
marketer launches it; the worker plans and sends; each eligible patient's message lands in the
capture personalized in their language (EN and ES), the unauthorized patient gets nothing, and
the campaign page shows the progress, the history and the tracking figures.

The live server is another process: this module arranges its own organization and never empties
the database under it.
"""

from __future__ import annotations

import email
import re
import secrets
import time
from email import policy as email_policy

import pytest
from playwright.sync_api import expect

from tests.fixtures.accounts import add_staff, ui_login
from tests.fixtures.ui import capture_relay_env, running_capture, running_worker

pytestmark = pytest.mark.ui
expect.set_options(timeout=15000)  # a shared, loaded machine: the server may take seconds per step
DOMAIN = "campaigns-ui.example"


@pytest.fixture(scope="module")
def capture(storage, tmp_path_factory):  # one per database: a module runs on both in one process
    yield from running_capture(tmp_path_factory)


@pytest.fixture(scope="module")
def live_server_env(capture):
    return capture_relay_env(capture, "mail.campaigns-ui.example")


@pytest.fixture(scope="module")
def worker(storage, live_server, live_server_env, tmp_path_factory):
    yield from running_worker(storage, live_server, live_server_env, tmp_path_factory)


@pytest.fixture(scope="module")
def clinic(live_server):
    """A clinic sending from ``campaigns-ui.example``: a marketer, a compliance officer, a
    type 2 diabetes segment, a marketing template in English and Spanish, and four patients —
    two diabetic with a marketing authorization (one prefers Spanish), one diabetic without,
    one not diabetic."""
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
    from carepost.patients.schemas import FactIn
    from carepost.segments import service as segments

    with system_session() as s:
        org = create_organization(s, f"Campaign Clinic {secrets.token_hex(2)}")
        marketer, compliance = add_staff(s, org.id, "marketer"), add_staff(s, org.id, "compliance_officer")
        s.commit()
        org_id = org.id
    tag = secrets.token_hex(3)
    with org_session(org_id) as s:
        domain = delivery.create_sending_domain(s, org_id, f"{tag}.{DOMAIN}")
        domain.verified_at = clock.now()
        delivery.update_delivery_settings(s, org_id, {"default_purpose": "treatment"})
        set_consent_settings(s, org_id, {"postal_address": "Campaign Clinic, 1 Main Street, Springfield, IL 62701"})

        def patient(given, family, lang, diabetic, signed):
            c = patients.save_contact(s, org_id, {"given_name": given, "family_name": family, "preferred_language": lang,
                                                  "email": f"{given.lower()}.{tag}@patients.example"}).contact
            if diabetic:
                patients.create_fact(s, org_id, c.id, "conditions", FactIn(
                    code_system="icd10cm", code="E11.9", display="Type 2 diabetes mellitus", status="active"))
            if signed:
                authorizations.record_authorization(s, org_id, contact_id=c.id, purpose="marketing", method="api",
                                                    signature_name=f"{given} {family}", send_copy=False)
            return c.id

        ana = patient("Anabel", "Reyes", "en", True, True)
        beto = patient("Beto", "Salazar", "es", True, True)
        cara = patient("Carolyn", "Ng", "en", True, False)
        patient("Dmitri", "Olsen", "en", False, True)
        segment = segments.create_segment(s, org_id, {"name": "Type 2 diabetes", "query": "has condition icd10cm:E11.*"},
                                          segments.SYSTEM)
        template = content.create_template(s, org_id, TemplateIn(
            name="Diabetes education class", subject="A class for you this month", purpose="marketing",
            contains_phi=False, language="en",
            html="<p>Hello {{ first_name }}, join our free diabetes cooking class on Saturday.</p>",
            variants={"es": {"subject": "Una clase para usted este mes",
                             "html": "<p>Hola {{ first_name }}, venga a nuestra clase de cocina el sábado.</p>"}}))
        s.commit()
        return SimpleNamespace(org_id=org_id, domain=domain.domain, marketer=marketer, compliance=compliance, tag=tag,
                               ana=ana, beto=beto, cara=cara, segment=segment.id, template=template.id)


def _captured(capture: dict, rcpts: set[str], timeout: float = 60.0) -> dict[str, email.message.EmailMessage]:
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


def next_step(page) -> None:
    """The wizard's Next, by keyboard (a click can land on the moving layout while a preview
    frame is being swapped in on a loaded machine), waiting for the page it loads."""
    with page.expect_navigation():
        page.get_by_test_id("wizard-next").press("Enter")


CLIPPED = """() => {
  const width = document.documentElement.clientWidth;
  const out = [];
  if (document.documentElement.scrollWidth > width + 1) out.push("page scrolls sideways: " + document.documentElement.scrollWidth);
  for (const el of document.querySelectorAll("main input, main select, main textarea, main button, main label, main iframe, main h1, main h2, main legend, main .wizard-steps li, main .alert")) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;  // not shown
    if (el.type === "hidden" || el.closest("details:not([open])")) continue;
    if (r.left < -1 || r.right > width + 1) out.push((el.id || el.name || el.tagName) + " " + Math.round(r.left) + ".." + Math.round(r.right));
  }
  return out;
}"""


def test_marketer_builds_compliance_approves_worker_sends_report_shows(browser, live_server, capture, worker, clinic):
    ana_addr, beto_addr, cara_addr = (f"{n}.{clinic.tag}@patients.example" for n in ("anabel", "beto", "carolyn"))
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
        # --- the marketer, through the wizard
        ui_login(page, clinic.marketer)
        page.get_by_test_id("main-nav").get_by_role("link", name="Campaigns", exact=True).click()
        page.get_by_test_id("new-campaign").click()
        expect(page.get_by_test_id("wizard-steps").locator("[aria-current=step]")).to_have_text("1. Audience")
        page.select_option("#f-segment_id", label="Type 2 diabetes")
        # the live count (segments service; a masked viewer sees small counts as "fewer than 11")
        expect(page.get_by_test_id("audience-count-value")).to_have_text("fewer than 11")
        page.select_option("#f-purpose", "marketing")
        next_step(page)  # no name: the field's error, inline
        expect(page.get_by_test_id("error-name")).to_be_visible()
        expect(page.locator("#f-name")).to_have_attribute("aria-invalid", "true")
        page.fill("#f-name", "Diabetes cooking class")
        next_step(page)

        expect(page.get_by_test_id("wizard-steps").locator("[aria-current=step]")).to_have_text("2. Content")
        page.select_option("#f-template_version_id", page.locator(
            "#f-template_version_id option", has_text="Diabetes education class — version 1").get_attribute("value"))
        expect(page.get_by_test_id("preview-subject")).to_have_text("A class for you this month")
        expect(page.get_by_test_id("preview-desktop")).to_be_visible()
        # preview as a patient of the audience: the Spanish speaker, masked for a marketer
        options = page.locator("#f-preview_contact_id option")
        expect(options).to_have_count(4)  # merge fields by name + the three diabetic patients
        spanish = page.locator("#f-preview_contact_id option", has_text="(es)").get_attribute("value")
        page.select_option("#f-preview_contact_id", spanish)
        expect(page.get_by_test_id("preview-language")).to_have_text("es")
        expect(page.get_by_test_id("preview-subject")).to_have_text("Una clase para usted este mes")
        expect(page.get_by_test_id("preview-meta")).to_contain_text("masked")
        phone = page.get_by_test_id("preview-phone").bounding_box()
        desktop = page.get_by_test_id("preview-desktop").bounding_box()
        assert 360 <= phone["width"] <= 380 and desktop["width"] > 600, (phone, desktop)
        assert "Hola" in page.frame_locator("[data-testid=preview-phone]").locator("body").inner_text()
        page.fill("#f-from_address", "care@elsewhere.example")  # not under the sending domain
        page.select_option("#f-sending_domain_id", label=clinic.domain)
        next_step(page)
        expect(page.get_by_test_id("error-from_address")).to_contain_text("sending domain")
        page.fill("#f-from_address", f"care@{clinic.domain}")
        page.fill("#f-from_name", "Campaign Clinic")
        next_step(page)

        expect(page.get_by_test_id("wizard-steps").locator("[aria-current=step]")).to_have_text("3. Schedule")
        expect(page.get_by_test_id("quiet-hours-note")).to_be_visible()
        page.fill("#f-throttle_per_hour", "0")
        next_step(page)
        expect(page.get_by_test_id("error-throttle_per_hour")).to_contain_text("1 to")
        page.check("#sk-at")
        page.fill("#f-send_at", "2001-01-01T09:00")
        page.fill("#f-throttle_per_hour", "")
        next_step(page)
        expect(page.get_by_test_id("error-send_at")).to_contain_text("past")
        page.check("#sk-now")
        page.fill("#f-throttle_per_domain_per_hour", "500")
        next_step(page)

        # the review: the saved draft and its pre-launch compliance report
        page.wait_for_url(re.compile(r".*/app/campaigns/[0-9a-f]{32}/review$"))
        campaign_id = page.url.rsplit("/", 2)[-2]
        report = page.get_by_test_id("compliance-report")
        expect(report.get_by_test_id("report-exclusion")).to_contain_text(["No authorization for this purpose"])
        expect(report.get_by_test_id("report-audience")).to_have_text("fewer than 11")
        expect(report.get_by_test_id("report-security")).to_be_visible()
        expect(report.get_by_test_id("sample-subject")).to_be_visible()

        # phone width: every step of the wizard fits, nothing clipped
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(f"/app/campaigns/{campaign_id}/edit")
        for step in ("1. Audience", "2. Content", "3. Schedule"):
            try:
                expect(page.get_by_test_id("wizard-steps").locator("[aria-current=step]")).to_have_text(step)
            except AssertionError:
                raise AssertionError(page.locator("main").inner_text()) from None
            if step.startswith("1"):
                expect(page.get_by_test_id("audience-count-value")).to_be_visible()
            if step.startswith("2"):
                expect(page.get_by_test_id("preview-phone")).to_be_visible()
            assert page.evaluate(CLIPPED) == [], step
            next_step(page)
        page.wait_for_url(re.compile(r".*/review$"))
        expect(page.get_by_test_id("compliance-report")).to_be_visible()
        assert page.evaluate(CLIPPED) == []
        page.set_viewport_size({"width": 1366, "height": 800})
        page.fill("#submit-comment", "For the May class")
        page.get_by_test_id("submit-campaign").click()
        page.wait_for_url(re.compile(rf".*/app/campaigns/{campaign_id}\?done=submitted$"))
        expect(page.get_by_test_id("campaign-status")).to_have_text("submitted")
        expect(page.get_by_test_id("action-launch")).to_have_count(0)  # not before approval

        # --- compliance: the inbox, the report, approve with a comment
        ui_login(officer, clinic.compliance)
        officer.get_by_test_id("main-nav").get_by_role("link", name="Campaign approvals").click()
        row = officer.get_by_test_id("approval-row").filter(has_text="Diabetes cooking class")
        row.get_by_test_id("review-link").click()
        report = officer.get_by_test_id("compliance-report")
        expect(report.get_by_test_id("report-audience")).to_have_text("3")  # exact: unmasked viewer
        expect(report.get_by_test_id("report-eligible")).to_have_text("2")
        expect(report.get_by_test_id("report-exclusion")).to_have_text([re.compile(r"No authorization.*1")])
        officer.fill("#approve-comment", "Audience and authorizations checked")
        officer.get_by_test_id("approve").click()
        expect(officer.get_by_test_id("campaign-status")).to_have_text("approved")
        expect(officer.get_by_test_id("history-comment")).to_have_text(["For the May class",
                                                                        "Audience and authorizations checked"])

        # --- the marketer launches; the worker plans and sends
        page.reload()
        page.get_by_test_id("action-launch").click()
        expect(page.get_by_test_id("campaign-progress")).to_be_visible()
        mails = _captured(capture, {ana_addr, beto_addr})
        en, es = mails[ana_addr], mails[beto_addr]
        assert en["Subject"] == "A class for you this month" and es["Subject"] == "Una clase para usted este mes"
        assert "Hello Anabel, join our free diabetes cooking class" in en.get_body(("html",)).get_content()
        assert "Hola Beto, venga a nuestra clase" in es.get_body(("html",)).get_content()
        assert en["From"].addresses[0].addr_spec == f"care@{clinic.domain}"
        assert "Beto" not in en.as_string() and "Anabel" not in es.as_string()
        # the progress polls until everything is sent
        expect(page.get_by_test_id("progress-sent")).to_have_text("2", timeout=30000)
        expect(page.get_by_test_id("progress-excluded")).to_have_text("1")

        # --- the report: the campaign's figures and history, for compliance (exact counts); the
        # campaign is "sending" or already "completed" (every recipient handed to delivery).
        officer.goto(f"/app/campaigns/{campaign_id}")
        expect(officer.get_by_test_id("campaign-status")).to_have_text(re.compile("^(sending|completed)$"))
        expect(officer.get_by_test_id("tracking-sent")).to_have_text("2")
        expect(officer.get_by_test_id("progress-sent")).to_have_text("2")
        expect(officer.get_by_test_id("progress-exclusions")).to_contain_text("No authorization for this purpose")
        expect(officer.get_by_test_id("analytics-chart")).to_have_attribute("data-drawn", "true")
        actions = [h.split(" ")[2] for h in officer.get_by_test_id("history-event").all_inner_texts()]
        assert actions[:4] == ["created", "submitted", "approved", "launched"], actions
    finally:
        m_ctx.close()
        c_ctx.close()
    assert not foreign, f"loaded from other hosts: {foreign}"
    _captured(capture, {ana_addr, beto_addr}, timeout=1)
    from carepost.core.mailcapture import capture_files, read_capture

    rcpts = [r for p in capture_files(capture["dir"])
             for r in email.message_from_bytes(read_capture(p, capture["keys"])).get_all("X-CarePost-Capture-Rcpt-To") or []]
    assert cara_addr not in rcpts  # no authorization: nothing sent
