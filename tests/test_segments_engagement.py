"""Engagement from the portal and forms tables, distance from a ZIP, and organization scoping of
every table a segment reads (the differential test covers the rest of the criteria)."""

from __future__ import annotations

from datetime import timedelta

from carepost.core import clock


def _org(name):
    from carepost.accounts.service import create_organization
    from carepost.core.database import system_session

    with system_session() as s:
        org = create_organization(s, name)
        s.commit()
        return org.id


def _ids(org_id, query):
    from carepost.core.database import read_only_session
    from carepost.segments import service

    with read_only_session(org_id) as s:
        return set(service.contact_ids(s, org_id, query, service.SYSTEM))


def _world(org_id, tag):
    """Three contacts: one opened a portal message and lives in Cambridge; one submitted a form
    and lives in Boston; one did nothing and lives in Springfield, IL."""
    from carepost.core.database import org_session
    from carepost.delivery.models import Message, MessageRecipient
    from carepost.forms.models import Form, FormSubmission
    from carepost.patients.models import Contact
    from carepost.portal.models import PortalMessage

    now = clock.now()
    with org_session(org_id) as s:
        opened = Contact(org_id=org_id, postal_code="02139")
        submitted = Contact(org_id=org_id, postal_code="02108-1234")
        idle = Contact(org_id=org_id, postal_code="62701")
        s.add_all([opened, submitted, idle])
        s.flush()
        msg = Message(org_id=org_id, from_address="clinic@example.test", subject_enc=b"x", security="portal")
        s.add(msg)
        s.flush()
        for contact, viewed in ((opened, now - timedelta(days=3)), (idle, None)):
            r = MessageRecipient(org_id=org_id, message_id=msg.id, address_enc=b"x", address_index="a", domain_index="d",
                                 contact_id=contact.id, status="portal_viewed" if viewed else "sent", method="portal")
            s.add(r)
            s.flush()
            s.add(PortalMessage(org_id=org_id, message_id=msg.id, recipient_id=r.id, token_hash=f"{tag}-{contact.id}",
                                address_enc=b"x", address_index="a", first_viewed_at=viewed))
        form = Form(org_id=org_id, public_id=f"pub-{tag}", name="Intake", status="published")
        s.add(form)
        s.flush()
        s.add(FormSubmission(org_id=org_id, form_id=form.id, form_version=1, status="confirmed", data_enc=b"x",
                             contact_id=submitted.id, created_at=now - timedelta(days=10)))
        s.add(FormSubmission(org_id=org_id, form_id=form.id, form_version=1, status="expired", data_enc=b"x",
                             contact_id=idle.id, created_at=now - timedelta(days=10)))
        s.commit()
        return opened.id, submitted.id, idle.id


def test_portal_forms_distance_and_scoping(db):
    a, b = _org("Engaged A"), _org("Engaged B")
    opened, submitted, idle = _world(a, "a")
    other = _world(b, "b")
    assert _ids(a, "has portal_message_opened within 7 days") == {opened}
    assert _ids(a, "has portal_message_opened within 2 days") == set()
    assert _ids(a, "has message_received within 1 days") == {opened, idle}
    assert _ids(a, "has form_submitted within 30 days") == {submitted}
    assert _ids(a, "has no form_submitted") == {opened, idle}
    assert _ids(a, "within 5 miles of zip 02139") == {opened, submitted}
    assert _ids(a, "within 5 miles of zip 02139 and not has portal_message_opened") == {submitted}
    assert _ids(a, "zip3 = 021 or zip = 62701") == {opened, submitted, idle}
    # the other organization's identical rows never leak in, and vice versa
    assert _ids(b, "has form_submitted or has portal_message_opened") == {other[0], other[1]}
    everything = ("has form_submitted or has portal_message_opened or has message_received or zip3 = 627 "
                  "or has condition or has encounter or suppressed or authorized for marketing")
    assert _ids(a, everything) <= {opened, submitted, idle}
    assert _ids(b, everything) <= set(other)
    # a snapshot, the members of a segment and a breakdown stay inside the organization too
    from carepost.core.database import org_session
    from carepost.segments import service

    with org_session(a) as s:
        seg = service.create_segment(s, a, {"name": "All", "kind": "snapshot", "query": "zip3 in (021, 627)"}, service.SYSTEM)
        dyn = service.create_segment(s, a, {"name": "Dyn", "query": "zip3 in (021, 627)"}, service.SYSTEM)
        s.commit()
        assert set(service.members(s, a, seg, service.SYSTEM)[0]) == {opened, submitted, idle}
        assert set(service.members(s, a, dyn, service.SYSTEM)[0]) == {opened, submitted, idle}
        groups = service.breakdown(s, a, "zip3 in (021, 627)", "zip3", service.SYSTEM)["groups"]
        assert groups == [{"value": "021", "count": 2}, {"value": "627", "count": 1}]


def test_the_daily_task_keeps_one_count_per_segment_and_day(db):
    from sqlalchemy import select

    from carepost.core.database import org_session, read_only_session
    from carepost.segments import service, tasks
    from carepost.segments.models import SegmentDailyCount

    a, b = _org("Daily A"), _org("Daily B")
    _world(a, "a")
    _world(b, "b")
    with org_session(a) as s:
        service.create_segment(s, a, {"name": "Near", "query": "within 5 miles of zip 02139"}, service.SYSTEM)
        s.commit()
    with org_session(b) as s:
        service.create_segment(s, b, {"name": "Forms", "query": "has form_submitted"}, service.SYSTEM)
        s.commit()
    assert tasks.count_all_organizations() == 2
    assert tasks.count_all_organizations() == 2  # the same day: updated, not added
    with read_only_session() as s:
        rows = sorted((r.org_id == a, r.count) for r in s.scalars(select(SegmentDailyCount)))
    assert rows == [(False, 1), (True, 2)]
