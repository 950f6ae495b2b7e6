"""Headless Chromium: the form builder with its script (add, remove, retype and move rows in
place, publish), a survey filled in with the keyboard only on a phone-sized screen (errors
summarized and linked to their fields), then the aggregated results.

The live server is another process: nothing here empties the database under it.
"""

from __future__ import annotations

import os
import re
import secrets

import pytest
from playwright.sync_api import expect

from carepost.core.database import system_session
from tests.fixtures.accounts import ui_login

pytestmark = pytest.mark.ui


@pytest.fixture(scope="module", autouse=True)
def _quick_forms():
    """A 1-second minimum fill time on the live server (3 s by default)."""
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
def marketer(live_server):
    from carepost.accounts import mfa
    from carepost.accounts.models import User
    from carepost.accounts.passwords import hash_password
    from carepost.accounts.service import add_membership, create_organization
    from carepost.core import clock
    from tests.fixtures.accounts import TestUser, strong_password

    with system_session() as s:
        org = create_organization(s, f"Forms UI {secrets.token_hex(3)}")
        password = strong_password()
        user = User(email=f"fui-{secrets.token_hex(4)}@example.test", display_name="Forms Builder",
                    password_hash=hash_password(password), password_changed_at=clock.now())
        s.add(user)
        s.flush()
        secret = mfa.new_totp_secret()
        mfa.store_totp_secret(s, user, secret)
        user.totp_confirmed_at = clock.now()
        add_membership(s, org.id, user, "marketer")
        s.commit()
        return TestUser(id=user.id, email=user.email, password=password, totp_secret=secret, org_id=org.id, role="marketer")


def test_build_publish_answer_by_keyboard_and_read_results(page, marketer, browser, live_server):
    ui_login(page, marketer)
    page.goto("/app/forms")
    page.get_by_role("link", name="New form").click()
    page.get_by_label("Name (shown to patients)").fill("After your visit")
    page.get_by_label("Survey: anonymous answers").check()
    # the new form starts with an email row; a survey needs none, so remove it in place
    rows = page.locator("#builder-rows .builder-row")
    expect(rows).to_have_count(1)
    rows.first.get_by_role("button", name="Remove").click()
    expect(rows).to_have_count(0)
    url_before = page.url
    for key, label, kind in (("wait", "How long did you wait?", "choice"), ("overall", "Overall rating", "rating")):
        page.get_by_role("button", name="Add a field").click()
        row = rows.last
        row.get_by_label("Type", exact=True).select_option(kind)
        row.get_by_label("Key", exact=True).fill(key)
        row.get_by_label("Label (question)", exact=True).fill(label)
    assert page.url == url_before  # rows were added without a round trip
    # only the settings of each row's type are shown
    expect(rows.nth(0).get_by_label("Options, one per line", exact=True)).to_be_visible()
    expect(rows.nth(0).get_by_label("Scale (3 to 10)", exact=True)).to_be_hidden()
    expect(rows.nth(1).get_by_label("Scale (3 to 10)", exact=True)).to_be_visible()
    rows.nth(0).get_by_label("Options, one per line", exact=True).fill("Less than 10 minutes\n10 to 30 minutes\nMore than 30 minutes")
    rows.nth(1).get_by_label("Required", exact=True).check()
    rows.nth(1).get_by_role("button", name="Move up").click()
    expect(rows.nth(0).get_by_label("Key", exact=True)).to_have_value("overall")
    page.get_by_test_id("save-form").click()
    expect(page.get_by_role("status")).to_contain_text("The form was saved.")
    expect(page.get_by_test_id("form-status")).to_have_text("draft")
    page.get_by_test_id("publish").click()
    expect(page.get_by_test_id("form-status")).to_have_text("published")
    public = page.get_by_test_id("public-url").get_attribute("href")
    assert re.search(r"/f/[A-Za-z0-9_-]{20}$", public)

    from carepost.forms.models import Form

    with system_session() as s:
        form = s.query(Form).filter(Form.org_id == marketer.org_id).one()
        assert [f["key"] for f in form.fields] == ["overall", "wait"]
        assert form.fields[0]["required"] and form.fields[1]["options"][0] == "Less than 10 minutes"

    # a patient fills the survey in on a phone, with the keyboard only
    phone = browser.new_context(base_url=live_server.url, viewport={"width": 375, "height": 740})
    p = phone.new_page()
    foreign: list[str] = []
    p.on("request", lambda r: foreign.append(r.url) if not r.url.startswith((live_server.url, "data:")) else None)
    try:
        p.goto(public.replace(live_server.url, ""))
        assert p.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
        # sending it empty: the error summary links each error to its field
        p.wait_for_timeout(1100)
        p.get_by_role("button", name="Send").click()
        summary = p.locator("#error-summary")
        expect(summary).to_contain_text("Overall rating: This field is required.")
        link = summary.get_by_role("link", name=re.compile("Overall rating"))
        assert link.get_attribute("href") == "#fld-overall"
        group = p.get_by_role("group", name=re.compile("Overall rating"))
        assert "err-overall" in group.get_attribute("aria-describedby")
        # keyboard only: Tab to the first rating, arrows choose, Tab on to the next group, Space picks
        p.locator("#fld-overall-1").focus()
        p.keyboard.press("ArrowRight")
        p.keyboard.press("ArrowRight")
        p.keyboard.press("ArrowRight")
        expect(p.locator("#fld-overall-4")).to_be_checked()
        p.keyboard.press("Tab")
        expect(p.locator("#fld-wait-1")).to_be_focused()
        p.keyboard.press("Space")
        expect(p.locator("#fld-wait-1")).to_be_checked()
        p.keyboard.press("Tab")
        expect(p.get_by_role("button", name="Send")).to_be_focused()
        p.wait_for_timeout(1100)
        p.keyboard.press("Enter")
        expect(p.get_by_test_id("form-thanks")).to_be_visible()
    finally:
        phone.close()
    assert not foreign, foreign
    page.goto(f"/app/forms/{form.id}/results")
    expect(page.get_by_test_id("average-overall")).to_have_text("4.00")
    expect(page.get_by_test_id("result-wait")).to_contain_text("Less than 10 minutes")
