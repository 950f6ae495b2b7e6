"""Headless Chromium: the segment builder. "Women 50-74 without a mammogram in 24 months" built
in the visual mode (nested group, field picker, value-set picker) and typed in the text mode give
the same live count — the count the engine gives for the same query — and each mode shows the
other's form; code search inside value sets adds a criterion; the segment is saved and listed.

The live server is another process on the same database: the population is written into the
test's organization before the browser runs.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest
from playwright.sync_api import expect

from carepost.core.database import system_session
from tests.fixtures.accounts import ui_login

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import segments_population as population

pytestmark = [pytest.mark.ui, pytest.mark.slow]

QUERY = 'age between 50 and 74 and sex = female and not has procedure in valueset "mammography" within 24 months'


@pytest.fixture(scope="module")
def marketer(live_server):
    from carepost.accounts import mfa
    from carepost.accounts.models import User
    from carepost.accounts.passwords import hash_password
    from carepost.accounts.service import add_membership, create_organization
    from carepost.core import clock
    from carepost.core.database import get_engine
    from tests.fixtures.accounts import TestUser, strong_password

    with system_session() as s:
        org = create_organization(s, f"Segments UI {secrets.token_hex(3)}")
        password = strong_password()
        user = User(email=f"sui-{secrets.token_hex(4)}@example.test", display_name="Segment Builder",
                    password_hash=hash_password(password), password_changed_at=clock.now())
        s.add(user)
        s.flush()
        secret = mfa.new_totp_secret()
        mfa.store_totp_secret(s, user, secret)
        user.totp_confirmed_at = clock.now()
        add_membership(s, org.id, user, "marketer")
        s.commit()
        org_id = org.id
    population.populate(get_engine(), org_id, 500, seed=9, today=clock.now().date(), batch_size=250, drop_indexes=False)
    return TestUser(id=user.id, email=user.email, password=password, totp_secret=secret, org_id=org_id, role="marketer")


def _engine_count(org_id: str) -> int:
    from carepost.core.database import org_session
    from carepost.segments import service

    with org_session(org_id) as s:
        return service.count(s, org_id, QUERY, service.SYSTEM)["count"]


def _count_reaches(page, expected: int) -> int:
    """The live count settles on ``expected`` (it is recounted, debounced, as the query changes)."""
    out = page.locator("#live-count")
    expect(out).to_have_text(str(expected), timeout=30000)
    expect(out).to_have_attribute("data-state", "done")
    return int(out.inner_text())


def test_visual_and_text_modes_give_the_same_count(page, marketer):
    expected = _engine_count(marketer.org_id)
    assert expected > 10  # above the small-cell threshold, so the marketer sees the exact number

    ui_login(page, marketer)
    page.goto("/app/segments")
    page.get_by_role("link", name="New segment").click()
    expect(page.locator("#segment-builder")).to_have_attribute("data-ready", "yes")

    # --- visual mode: age and sex in the top group, the mammogram in a nested "none of" group
    top = page.locator("#visual-root > fieldset")
    top.locator(":scope > .seg-add .seg-add-pick").select_option("field:age")
    top.locator(":scope > .seg-add .seg-add-crit").click()
    row = page.locator(".seg-crit").nth(0)
    row.get_by_label("Operator").select_option("between")
    row.get_by_label("Value").fill("50, 74")
    top.locator(":scope > .seg-add .seg-add-pick").select_option("field:sex")
    top.locator(":scope > .seg-add .seg-add-crit").click()
    row = page.locator(".seg-crit").nth(1)
    row.get_by_label("Operator").select_option("=")
    row.get_by_label("Value").fill("female")
    top.locator(":scope > .seg-add .seg-add-group").click()
    nested = top.locator("fieldset.seg-group[data-depth='1']")
    nested.locator(".seg-group-not").check()
    nested.locator(".seg-add-pick").select_option("has:procedure")
    nested.locator(".seg-add-crit").click()
    row = nested.locator(".seg-crit")
    row.get_by_label("Value set").select_option("mammography")
    row.get_by_label("Within (blank: ever)").fill("24")
    row.get_by_label("Unit").select_option("months")
    visual_count = _count_reaches(page, expected)

    # the text mode shows the same query in the segment language
    page.get_by_role("button", name="Text").click()
    expect(page.locator("#query-text")).to_have_value(QUERY)

    # --- text mode, from scratch: typed text gives the same count and builds the visual form
    page.goto("/app/segments/new")
    expect(page.locator("#segment-builder")).to_have_attribute("data-ready", "yes")
    page.get_by_role("button", name="Text").click()
    page.locator("#query-text").fill(QUERY)
    expect(page.locator(".seg-crit")).to_have_count(3)
    text_count = _count_reaches(page, expected)
    assert text_count == visual_count
    page.get_by_role("button", name="Visual").click()
    expect(page.locator(".seg-crit").nth(2).get_by_label("Value set")).to_have_value("mammography")

    # a syntax error names the position and changes nothing
    page.get_by_role("button", name="Text").click()
    page.locator("#query-text").fill("age between 50 and")
    expect(page.locator("#builder-error")).to_contain_text("line 1", timeout=15000)
    assert _count_reaches(page, expected) == expected

    # breakdown by sex: all of them are women
    page.locator("#query-text").fill(QUERY)
    expect(page.locator("#builder-error")).to_be_hidden()
    page.get_by_label("Break down by").select_option("sex")
    expect(page.locator("#breakdown tbody tr")).to_have_count(1)
    expect(page.locator("#breakdown tbody tr td").first).to_have_text("female")

    # code search inside value sets adds a criterion using the set
    page.get_by_role("button", name="Visual").click()
    page.get_by_label("Code, name or value set").fill("4548-4")
    hit = page.locator(".seg-code-hit").filter(has_text="hba1c")
    expect(hit).to_contain_text("loinc:4548-4")
    hit.get_by_role("button").click()
    expect(page.locator(".seg-crit")).to_have_count(4)
    expect(page.locator(".seg-crit").nth(3).get_by_label("Value set")).to_have_value("hba1c")
    expect(page.locator("#live-count")).to_have_attribute("data-state", "done")
    page.locator(".seg-crit").nth(3).get_by_role("button", name="Remove").click()
    expect(page.locator(".seg-crit")).to_have_count(3)

    # save, then the list shows it
    page.get_by_label("Name", exact=True).fill("Mammography gap 50-74")
    page.get_by_role("button", name="Save segment").click()
    expect(page.locator("#save-status")).to_have_text("Saved.")
    page.goto("/app/segments")
    expect(page.get_by_test_id("segments")).to_contain_text("Mammography gap 50-74")
