"""``screening_due:<value set>`` date entries (issue 15 item 1): the next screening is due one
interval (``offset``) after the latest procedure or observation in the value set; a newer
screening moves it; contacts never screened, with codes of another value set, unverified codes
or another organization's records start nothing; the definition is refused when the value set is
unknown or the interval not positive. On both databases, set-wise through ``evaluate_due``."""

from __future__ import annotations

from datetime import timedelta

from carepost.core import clock
from carepost.core.database import org_session
from carepost.journeys import entries, validation
from tests.test_campaigns_planning import make_contact
from tests.test_journeys_engine import definition, make_journey, runs, template_ref


def _procedure(s, org_id, cid, when, *, system="snomed", code="71651007", verified=True):
    from carepost.patients.models import Procedure

    s.add(Procedure(org_id=org_id, contact_id=cid, code_system=system, code=code, status="completed",
                    performed_start=when, code_verified=verified))


def _observation(s, org_id, cid, when, *, code="4548-4"):
    from carepost.patients.models import Observation

    s.add(Observation(org_id=org_id, contact_id=cid, code_system="loinc", code=code, status="final",
                      effective_at=when, value_quantity=6.1, value_unit="%"))


def test_mammography_due_two_years_after_the_last_one(sender, session):
    from carepost.accounts.service import create_organization

    org_id = sender.org_id
    now = clock.now()
    two_years_ago = now.replace(year=now.year - 2) + timedelta(hours=6)  # due in 6 hours
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        jid, _ = make_journey(s, org_id, definition(
            ref, entry={"type": "date", "field": "screening_due:mammography", "offset": "2y"}),
            published_ago=timedelta(days=2))
        due = make_contact(s, org_id, "due@valid.test")
        rescreened = make_contact(s, org_id, "again@valid.test")
        never = make_contact(s, org_id, "never@valid.test")
        unverified = make_contact(s, org_id, "unverified@valid.test")
        other_set = make_contact(s, org_id, "colon@valid.test")
        _procedure(s, org_id, due, two_years_ago)
        _procedure(s, org_id, due, two_years_ago - timedelta(days=400))  # older ones do not count
        _procedure(s, org_id, rescreened, two_years_ago)
        _procedure(s, org_id, rescreened, now - timedelta(days=30))  # screened again: not due
        _procedure(s, org_id, unverified, two_years_ago, verified=False)
        _procedure(s, org_id, other_set, two_years_ago, system="cpt", code="45378")  # a colonoscopy
        s.commit()
        assert never
    stranger = create_organization(session, "Other Clinic")
    session.commit()
    with org_session(stranger.id) as s:
        cid = make_contact(s, stranger.id, "stranger@valid.test")
        _procedure(s, stranger.id, cid, two_years_ago)
        s.commit()
    assert entries.evaluate_due(org_id) == 1
    (run,) = runs(org_id, jid)
    assert run.contact_id == due
    assert run.entry_key == f"screen:mammography:{clock.aware(two_years_ago):%Y%m%d}"
    assert run.state == "waiting" and clock.aware(run.wake_at) > now  # fires when due
    # evaluated again (forced): the same occurrence starts nothing twice
    assert entries.evaluate_due(org_id, force=True) == 0


def test_hba1c_observations_count_too(sender, session):
    org_id = sender.org_id
    now = clock.now()
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        jid, _ = make_journey(s, org_id, definition(
            ref, entry={"type": "date", "field": "screening_due:hba1c", "offset": "3mo"}),
            published_ago=timedelta(days=2))
        cid = make_contact(s, org_id, "a1c@valid.test")
        last = entries.shift(now, -3, "mo") + timedelta(hours=2)
        _observation(s, org_id, cid, last)
        s.commit()
    assert entries.evaluate_due(org_id) == 1
    (run,) = runs(org_id, jid)
    assert run.contact_id == cid and run.entry_key.startswith("screen:hba1c:")


def test_an_unknown_value_set_or_a_non_positive_interval_is_refused(sender):
    with org_session(sender.org_id) as s:
        ref = template_ref(s, sender.org_id)
        bad_set = definition(ref, entry={"type": "date", "field": "screening_due:no_such_set", "offset": "1y"})
        bad_offset = definition(ref, entry={"type": "date", "field": "screening_due:mammography", "offset": "-7d"})
        good = definition(ref, entry={"type": "date", "field": "screening_due:colorectal_cancer_screening",
                                      "offset": "1y"})
        errors_set = validation.validate_definition(s, sender.org_id, bad_set)
        errors_offset = validation.validate_definition(s, sender.org_id, bad_offset)
        errors_good = validation.validate_definition(s, sender.org_id, good)
    assert any(e["path"] == "entry.field" for e in errors_set)
    assert any(e["path"] == "entry.offset" for e in errors_offset)
    assert not [e for e in errors_good if e["path"].startswith("entry")]
