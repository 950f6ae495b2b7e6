"""The journey pages (issue 15 item 6) without a browser, on both databases: every starter
validates once its templates (and segment) are chosen; the list, the editor, the validation
endpoint, saving a draft, publishing and pausing through the real sign-in; permissions, CSRF,
cross-tenant 404s, no PHI in URLs; the contact page's journey timeline. The browser flow is
tests/test_ui_journeys.py."""

from __future__ import annotations

import pytest

from carepost.core.database import org_session
from carepost.journeys import starters
from tests.test_campaigns_planning import make_contact, make_segment


def make_templates(s, org_id) -> dict[str, tuple[str, int]]:
    """One template per purpose the starters use: purpose -> (template id, version)."""
    from carepost.content import service as content
    from carepost.content.schemas import TemplateIn

    out = {}
    for purpose in ("treatment", "refill_reminder", "health_care_operations"):
        t = content.create_template(s, org_id, TemplateIn(
            name=f"Journey {purpose}", subject="A message from your clinic", purpose=purpose, contains_phi=False,
            html="<p>Hello {{ first_name }}, please call us.</p>", language="en"))
        s.flush()
        out[purpose] = (t.id, content.current_version(s, t).version)
    return out


def filled_starter(key: str, templates: dict, segment_id: str | None) -> dict:
    starter = starters.get_starter(key)
    definition = starters.starter_definition(key)
    slots = starters.slots(definition)
    return starters.fill(definition, {sid: templates[starter.purpose] for sid in slots["templates"]},
                         segment_id if slots["segment"] else None)


def test_every_starter_is_valid_once_its_templates_are_chosen(org, session):
    from carepost.journeys.validation import validate_definition

    assert {s.key for s in starters.list_starters()} == {
        "appointment_reminder", "post_discharge", "refill_reminder", "annual_wellness_visit", "flu_season",
        "new_patient_onboarding"}
    with org_session(org.id) as s:
        templates = make_templates(s, org.id)
        segment = make_segment(s, org.id, name="Adults due a flu shot")
        s.commit()
        for starter in starters.list_starters():
            assert starter.purpose in ("treatment", "refill_reminder", "health_care_operations"), starter.key
            assert starter.definition["purpose"] == starter.purpose
            raw = starters.starter_definition(starter.key)
            # as shipped, the empty template slots are named by the validation
            problems = validate_definition(s, org.id, raw)
            assert problems and all(p["path"].startswith(("steps.", "entry.segment_id")) for p in problems), problems
            assert validate_definition(s, org.id, filled_starter(starter.key, templates, segment)) == [], starter.key
        # the appointment reminder: 7 days, 2 days and 2 hours before the appointment
        d = starters.starter_definition("appointment_reminder")
        assert d["entry"] == {"type": "date", "field": "appointment.start", "offset": "-7d"}
        assert [d["steps"][s]["timeout"] for s in ("wait_2d", "wait_2h")] == ["5d", "46h"]  # -7d+5d = -2d; -2d+46h = -2h
