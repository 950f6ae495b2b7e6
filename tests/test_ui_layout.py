"""Staff UI layout in headless Chromium (issue 10 item 15): every kind of form field is styled
like a text field, checkboxes and radios sit beside their labels, the audit log and contacts fit
a 1366 px screen, and at phone width (390 px) the main menu collapses behind "Menu", opens on a
tap, and nothing on the main pages is wider than the screen or cut off."""

from __future__ import annotations

import re
import secrets

import pytest
from playwright.sync_api import expect

from carepost.audit.service import record
from carepost.core.database import system_session
from tests.fixtures.accounts import ui_login

pytestmark = pytest.mark.ui

LONG = "x" * 90  # an unbroken value: a long id, address or action


def make_owner(org_id: str):
    """An owner with confirmed TOTP, made in a system session (the module's tests share one
    sign-in: the per-test ``db`` fixture would empty the database under the live server)."""
    from tests.fixtures.accounts import add_staff

    with system_session() as s:
        user = add_staff(s, org_id, "owner", email=f"owner-{secrets.token_hex(4)}@example.test",
                         display_name="Layout Owner")
        s.commit()
        return user


@pytest.fixture(scope="module")
def owner_page(browser, live_server):
    from carepost.accounts.service import create_organization
    from carepost.consent import service as consent
    from carepost.patients import service as patients

    tag = secrets.token_hex(3)
    with system_session() as s:
        org = create_organization(s, f"Layout Clinic {tag}")
        s.commit()
        org_id = org.id
    owner = make_owner(org_id)
    with system_session() as s:
        for i in range(4):
            record(s, org_id=org_id, actor_type="user", actor_id=owner.id, action=f"contact.read.{LONG[:60]}",
                   target_type="contact", target_id=f"{LONG}{i}", ip="2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")
        s.commit()
    with system_session() as s:
        s.info.pop("scope")
        s.info["org_id"] = org_id
        for i in range(3):
            patients.save_contact(s, org_id, {
                "given_name": "Maximiliana-Alexandrina-Konstantinopoulou", "family_name": "Vandersteenhoven-" + LONG[:30],
                "email": f"averyveryverylongmailboxname{i}-{tag}-{LONG[:40]}@subdomain.example-clinic-network.org",
                "city": "Llanfairpwllgwyngyllgogerychwyrndrobwllllantysiliogogogoch", "state": "MA", "postal_code": "02139",
            })
        consent.create_topic(s, org_id, key=f"news{tag}", name="Newsletter")
        s.commit()
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1366, "height": 768})
    page = context.new_page()
    page.set_default_timeout(15000)
    foreign: list[str] = []
    page.on("request", lambda req: foreign.append(req.url) if not req.url.startswith((live_server.url, "data:", "about:")) else None)
    ui_login(page, owner)
    yield page
    context.close()
    assert not foreign, f"page loaded from other hosts: {foreign}"


def _page_width(page) -> tuple[int, int]:
    return page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")


# Visible elements reaching past the right edge of the screen, unless a scrolling box holds them.
CLIPPED_JS = """
() => {
  const out = [];
  const vw = document.documentElement.clientWidth;
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0 || r.right <= vw + 1) continue;
    const cs = getComputedStyle(el);
    if (cs.visibility === 'hidden' || cs.position === 'absolute' && r.width <= 1) continue;
    let p = el.parentElement, scrolls = false;
    while (p && p !== document.body) {
      const o = getComputedStyle(p).overflowX;
      if (o === 'auto' || o === 'scroll') { scrolls = true; break; }
      p = p.parentElement;
    }
    if (!scrolls) out.push(el.tagName + (el.id ? '#' + el.id : '') + '.' + el.className + ' right=' + Math.round(r.right));
  }
  return out.slice(0, 10);
}
"""


def test_audit_log_and_contacts_fit_1366(owner_page):
    page = owner_page
    page.set_viewport_size({"width": 1366, "height": 768})
    for path, table in (("/app/audit", "audit-events"), ("/app/contacts", "contacts")):
        page.goto(path)
        expect(page.get_by_test_id(table)).to_be_visible()
        scroll, width = _page_width(page)
        assert scroll <= width, f"{path}: the page is {scroll} px wide at {width} px"
        # the table itself fits its card: no sideways scrolling inside either
        overflow = page.get_by_test_id(table).evaluate("t => t.parentElement.scrollWidth - t.parentElement.clientWidth")
        assert overflow <= 0, f"{path}: the table scrolls sideways by {overflow} px"
        assert page.evaluate(CLIPPED_JS) == [], path


PHONE_PAGES = ["/app", "/app/contacts", "/app/audit", "/app/users", "/app/api-credentials", "/app/consent/topics",
               "/app/webhooks", "/app/branding", "/app/forms", "/app/domains", "/app/account/security"]


def test_phone_menu_collapses_opens_on_tap_and_nothing_is_clipped(owner_page):
    page = owner_page
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto("/app")
    nav, toggle = page.get_by_test_id("main-nav"), page.get_by_test_id("menu-toggle")
    expect(toggle).to_be_visible()
    expect(nav).to_be_hidden()  # collapsed
    toggle.click()  # a tap
    expect(nav).to_be_visible()
    box = nav.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    nav.get_by_role("link", name="Audit log").click()
    page.wait_for_url(re.compile(r".*/app/audit$"))
    expect(page.get_by_test_id("main-nav")).to_be_hidden()  # a new page starts collapsed
    # the menu is reachable by keyboard too: the toggle is a focusable checkbox labelled "Menu"
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    expect(page.locator("#nav-toggle")).to_be_focused()
    page.keyboard.press("Space")
    expect(page.get_by_test_id("main-nav")).to_be_visible()

    for path in PHONE_PAGES:
        page.goto(path)
        scroll, width = _page_width(page)
        assert scroll <= 390, f"{path}: the page is {scroll} px wide at 390 px"
        assert page.evaluate(CLIPPED_JS) == [], path
        expect(page.get_by_role("banner").get_by_role("button", name="Sign out")).to_be_in_viewport()

    page.set_viewport_size({"width": 1366, "height": 768})
    expect(page.get_by_test_id("menu-toggle")).to_be_hidden()  # on a wide screen the menu is always shown
    expect(page.get_by_test_id("main-nav")).to_be_visible()


STYLE_JS = """
el => { const s = getComputedStyle(el);
  return [s.borderTopWidth, s.borderTopStyle, s.borderTopColor, s.borderTopLeftRadius, s.paddingLeft, s.paddingTop,
          s.fontFamily, s.fontSize, s.backgroundColor]; }
"""


def _style(locator):
    return locator.evaluate(STYLE_JS)


def test_every_kind_of_field_is_styled_like_a_text_field(owner_page):
    page = owner_page
    page.set_viewport_size({"width": 1366, "height": 768})
    page.goto("/app/audit")
    reference = _style(page.locator("#f-action"))  # input type=text
    assert reference[0] == "1px" and reference[1] == "solid" and reference[4] == "10px"
    checks = {
        "/app/audit": ["#f-actor", "#f-since"],  # select, date
        "/app/contacts": ["#s-email", "#s-phone", "#f-stage"],  # email, tel, select
        "/app/consent/topics": ["#t-name"],  # no type at all
        "/app/webhooks": ["input[type=url]"],
        "/app/portal-settings": ["#body"],  # textarea
        "/app/api-credentials": ["#cred-expiry"],
    }
    for path, selectors in checks.items():
        page.goto(path)
        for sel in selectors:
            field = page.locator(sel).first
            expect(field).to_be_visible()
            got = _style(field)
            assert got[:7] == reference[:7], f"{path} {sel}: {got} differs from a text field {reference}"
            assert got[8] == reference[8], f"{path} {sel}: background {got[8]}"


def test_checkboxes_and_radios_sit_beside_their_labels(owner_page):
    page = owner_page
    page.set_viewport_size({"width": 1366, "height": 768})
    for path, ids in (("/app/consent/topics", ["t-optin", "t-double"]),
                      ("/app/api-credentials", ["scope-1", "cred-sandbox"]),
                      ("/app/webhooks", ["event-all"])):
        page.goto(path)
        for box_id in ids:
            box = page.locator(f"#{box_id}").bounding_box()
            label = page.locator(f"label[for='{box_id}']").bounding_box()
            assert box and label, (path, box_id)
            # same line: the label starts right of the box, and their vertical extents overlap
            assert label["x"] >= box["x"] + box["width"] - 1, (path, box_id, box, label)
            assert label["x"] - (box["x"] + box["width"]) < 24, (path, box_id, box, label)
            assert box["y"] < label["y"] + label["height"] and label["y"] < box["y"] + box["height"], (path, box_id, box, label)
