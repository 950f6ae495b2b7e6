"""Topics in headless Chromium (issue 10 item 6): the page speaks of a "Short name", not a "Key";
"confirm by email" (double opt-in) is not pre-checked and applies to opt-in topics only; a topic
is edited and archived from its row, and an archived topic refuses new messages."""

from __future__ import annotations

import re

import pytest

from tests.fixtures.accounts import ui_login

pytestmark = pytest.mark.ui


def test_owner_adds_edits_and_archives_a_topic(page, live_server, org, make_user):
    from carepost.consent.service import list_topics
    from carepost.core.database import org_session

    owner = make_user(org, role="owner")
    ui_login(page, owner)
    page.goto("/app/consent/topics")
    assert page.get_by_label("Short name").is_visible()
    assert not page.get_by_text(re.compile(r"^Key$")).count()
    double = page.get_by_label("Ask them to confirm by email (opt-in topics only)")
    assert not double.is_checked()  # not pre-checked

    # an opt-out topic with "confirm by email" ticked: the confirmation does not apply
    page.get_by_label("Name", exact=True).fill("Flu clinic news")
    page.get_by_label("Short name").fill("flu-clinic")
    double.check()
    page.get_by_role("button", name="Add topic").click()
    page.wait_for_url(re.compile(r".*/app/consent/topics$"))
    row = page.locator('tr[data-topic="flu-clinic"]')
    assert "Everyone who has not unsubscribed" in row.inner_text()
    with org_session(org.id) as s:
        [topic] = [t for t in list_topics(s, org.id, include_archived=True) if t.key == "flu-clinic"]
        assert topic.double_opt_in is False

    # edit: rename, make it opt-in with confirmation, then archive
    row.get_by_text("Edit Flu clinic news").click()
    row.get_by_label("Name", exact=True).fill("Flu clinic")
    row.get_by_label("Opt-in: only patients who signed up get it").check()
    row.get_by_label("Ask them to confirm by email (opt-in topics only)").check()
    row.get_by_role("button", name="Save Flu clinic news").click()
    page.wait_for_url(re.compile(r".*/app/consent/topics$"))
    row = page.locator('tr[data-topic="flu-clinic"]')
    assert "Only patients who signed up" in row.inner_text() and "Flu clinic" in row.inner_text()
    row.get_by_text("Edit Flu clinic").click()
    row.get_by_label(re.compile("^Archived")).check()
    row.get_by_role("button", name="Save Flu clinic").click()
    page.wait_for_url(re.compile(r".*/app/consent/topics$"))
    assert "Archived" in page.locator('tr[data-topic="flu-clinic"]').inner_text()
    with org_session(org.id) as s:
        [topic] = [t for t in list_topics(s, org.id, include_archived=True) if t.key == "flu-clinic"]
        assert (topic.name, topic.opt_in_required, topic.double_opt_in, topic.archived) == ("Flu clinic", True, True, True)
