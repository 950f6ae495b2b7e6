"""The MLLP listener's group path (issue 15, speed): a group of messages is handled set-wise —
patients by one blind-index query, events through ``tracking.conversions.record_events``, journeys
through ``contact.events_recorded`` — and answers exactly as the same messages one by one: the same
ACK codes in order, a control id repeated in the group answered as a replay (same content) or a
duplicate (other content), an unknown MRN in the error queue, unknown senders refused,
and a contact's second event in the group seeing what its first did in journeys (a run started by
the first reaches its goal on the second)."""

from __future__ import annotations

from sqlalchemy import func, select

from carepost.core.database import org_session, read_only_session
from carepost.ehr import service
from carepost.ehr.models import EhrMessage
from carepost.journeys.models import JourneyRun
from carepost.tracking.conversions import ContactEvent
from tests.ehr_messages import adt, siu


def _patient(org_id: str, mrn: str, email: str) -> str:
    from carepost.patients import service as patients

    with org_session(org_id) as s:
        cid = patients.save_contact(s, org_id, {"given_name": "Ann", "email": email, "mrn": mrn}).contact.id
        s.commit()
    return cid


def _connection(org_id: str) -> str:
    with org_session(org_id) as s:
        _, token = service.create_connection(s, org_id, name="ADT feed", sending_facilities=["NORTHCLINIC"])
        s.commit()
    return token


def _org(session, name: str):
    from carepost.accounts.service import create_organization

    o = create_organization(session, name)
    session.commit()
    return o


def _codes(answers: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for answer in answers:
        msa = answer.decode().split("MSA|", 1)[1].split("\r", 1)[0].split("|")
        err = answer.decode().split("ERR|", 1)[1].split("\r", 1)[0] if "ERR|" in answer.decode() else ""
        out.append((msa[0], msa[1], "205" if "205" in err else ""))
    return out


def _frames(token: str, prefix: str) -> list[bytes]:
    frames = [
        siu(token, "S12", f"{prefix}-1", "MRN-A"),
        adt(token, "A04", f"{prefix}-2", "MRN-B"),
        adt(token, "A04", f"{prefix}-3", "MRN-NOBODY"),  # unknown patient: error queue
        adt(token, "A04", f"{prefix}-4", "MRN-B", patient_class="O"),
        siu(token, "S12", f"{prefix}-1", "MRN-A"),  # the same message again: a replay
        adt(token, "A08", f"{prefix}-2", "MRN-B"),  # its control id with other content: duplicate
        adt("mdeadbeef00.not-a-real-secret-value-xx", "A04", f"{prefix}-5", "MRN-A"),  # unknown sender
        b"not an HL7 message",
        siu(token, "S14", f"{prefix}-6", "MRN-A"),  # the same patient's second event
    ]
    return [f.encode() if isinstance(f, str) else f for f in frames]


def _setup(org_id: str) -> str:
    _patient(org_id, "MRN-A", "a@valid.test")
    _patient(org_id, "MRN-B", "b@valid.test")
    return _connection(org_id)


def _state(org_id: str) -> dict:
    with read_only_session(org_id) as s:
        events = s.scalar(select(func.count()).select_from(ContactEvent).where(ContactEvent.org_id == org_id))
        rows = s.execute(select(EhrMessage.status, EhrMessage.reason_code).where(EhrMessage.org_id == org_id)).all()
    return {"events": events, "rows": sorted((st, rc or "") for st, rc in rows)}


def test_a_group_answers_as_one_by_one(db, session):
    grouped, single = _org(session, "Group Clinic"), _org(session, "Single Clinic")
    token_g, token_s = _setup(grouped.id), _setup(single.id)
    frames = _frames(token_g, "G")
    together = service.ingest_batch([(f, "127.0.0.1") for f in frames])
    apart = [service.ingest_batch([(f, "127.0.0.1")])[0] for f in _frames(token_s, "S")]
    codes = _codes(together)
    assert [c[0] for c in codes] == ["AA", "AA", "AE", "AA", "AA", "AE", "AR", "AR", "AA"]
    assert codes[5][2] == "205"  # the duplicate control id
    assert [(c[0], c[2]) for c in codes] == [(c[0], c[2]) for c in _codes(apart)]
    assert [c[1] for c in codes[:6]] == ["G-1", "G-2", "G-3", "G-4", "G-1", "G-2"]
    g, s_ = _state(grouped.id), _state(single.id)
    assert g == s_
    assert g["events"] == 4
    assert ("error", "patient_not_found") in g["rows"]
    assert ("error", "duplicate_control_id") in g["rows"]
    # the whole group again: replays (no new event), the queued ones still queued
    again = _codes(service.ingest_batch([(f, "127.0.0.1") for f in frames]))
    assert [c[0] for c in again] == [c[0] for c in codes]
    assert _state(grouped.id)["events"] == 4


def test_each_recorded_message_and_queued_error_is_audited(db, session):
    from carepost.audit.models import AuditEvent

    org = _org(session, "Audit Clinic")
    token = _setup(org.id)
    service.ingest_batch([(f, "127.0.0.1") for f in _frames(token, "A")])
    with read_only_session(org.id) as s:
        actions = sorted(s.scalars(select(AuditEvent.action).where(AuditEvent.org_id == org.id,
                                                                   AuditEvent.action.like("%e%_%"),
                                                                   AuditEvent.actor_type == "ehr_connection")))
    # 4 events recorded; 2 kept in the queue (unknown patient, duplicate); the replay and the
    # refusals write nothing
    assert actions.count("contact_event.create") == 4
    assert actions.count("ehr_message.queue") == 2


def test_journeys_see_a_contacts_events_in_order_within_a_group(db, session):
    from tests.test_journeys_engine import make_journey

    org = _org(session, "Journey Clinic")
    token = _setup(org.id)
    cid = _patient(org.id, "MRN-C", "c@valid.test")
    other = _patient(org.id, "MRN-D", "d@valid.test")
    with org_session(org.id) as s:
        journey_id, _ = make_journey(s, org.id, {
            "purpose": "treatment", "reentry": {"mode": "never"}, "start": "w",
            "entry": {"type": "event", "event": "appointment.booked"},
            "goal": {"event": "appointment.modified", "within_days": 7},
            "steps": {"w": {"type": "wait", "duration": "2d", "next": "x"}, "x": {"type": "exit"}}})
        s.commit()
    frames = [siu(token, "S12", "J-1", "MRN-C"), siu(token, "S12", "J-2", "MRN-D"),
              siu(token, "S14", "J-3", "MRN-C")]  # C: booked then modified (the goal), in one group
    answers = _codes(service.ingest_batch([(f.encode(), "127.0.0.1") for f in frames]))
    assert [a[0] for a in answers] == ["AA", "AA", "AA"]
    with read_only_session(org.id) as s:
        runs = {r.contact_id: r for r in s.scalars(select(JourneyRun).where(JourneyRun.journey_id == journey_id))}
    assert set(runs) == {cid, other}
    assert (runs[cid].state, runs[cid].exit_reason) == ("completed", "goal")
    assert runs[other].state in ("waiting", "active") and runs[other].exit_reason is None


def test_handed_over_checkpoints_are_written_by_the_caller(db, session):
    """``ingest_batch(..., checkpoints=list)`` (the listener's path): the group's audit checkpoint
    is signed at the commit and handed to the caller instead of written, and ``write_checkpoints``
    then makes this machine's file cover the group's last audit event; a group answered one by one
    (its transaction failed) hands over each message's checkpoint the same way."""
    from carepost.audit import checkpoints
    from carepost.audit.models import AuditEvent
    from carepost.audit.service import write_checkpoints

    org = _org(session, "Checkpoint Clinic")
    token = _setup(org.id)
    before = checkpoints.read_local(org.id)
    signed: list = []
    answers = service.ingest_batch([(f, "127.0.0.1") for f in _frames(token, "H")], checkpoints=signed)
    assert [c[0] for c in _codes(answers)][:2] == ["AA", "AA"]
    with read_only_session(org.id) as s:
        newest, newest_id = s.execute(select(AuditEvent.seq, AuditEvent.id).where(AuditEvent.chain == org.id)
                                      .order_by(AuditEvent.seq.desc()).limit(1)).one()
    assert [cp.chain for cp in signed] == [org.id] and signed[0].seq == newest
    assert checkpoints.read_local(org.id) == before  # not written by ingest_batch
    write_checkpoints(signed)
    cp = checkpoints.read_local(org.id)
    assert (cp.seq, cp.event_id) == (newest, newest_id)
    # without the list the checkpoint is written at the commit, as before
    service.ingest_batch([(siu(token, "S12", "H-9", "MRN-A").encode(), "127.0.0.1")])
    with read_only_session(org.id) as s:
        newest = s.scalar(select(func.max(AuditEvent.seq)).where(AuditEvent.chain == org.id))
    assert checkpoints.read_local(org.id).seq == newest


def test_a_refused_event_keeps_its_message_in_the_error_queue(db, session):
    """A message whose event tracking refuses (an event time more than MAX_PAST_DAYS ago) is
    answered AE and kept in the error queue — in a group as alone — while the group's other
    messages are recorded."""
    from datetime import UTC, datetime, timedelta

    org = _org(session, "Old Event Clinic")
    token = _setup(org.id)
    old = (datetime.now(UTC) - timedelta(days=800)).strftime("%Y%m%d%H%M%S") + "+0000"

    def aged(control_id: str) -> bytes:
        lines = adt(token, "A04", control_id, "MRN-B").split("\r")
        lines[1] = f"EVN|A04|{old}"
        return "\r".join(lines).encode()

    answers = _codes(service.ingest_batch([(siu(token, "S12", "O-1", "MRN-A").encode(), "127.0.0.1"),
                                           (aged("O-2"), "127.0.0.1")]))
    alone = _codes(service.ingest_batch([(aged("O-3"), "127.0.0.1")]))
    assert [a[0] for a in answers] == ["AA", "AE"] and alone[0][0] == "AE"
    with read_only_session(org.id) as s:
        rows = {r.control_id: r for r in s.scalars(select(EhrMessage).where(EhrMessage.org_id == org.id))}
    assert rows["O-1"].status == "recorded"
    assert (rows["O-2"].status, rows["O-2"].reason_code) == ("error", "event_refused") and rows["O-2"].raw_enc
    assert (rows["O-3"].status, rows["O-3"].reason_code) == ("error", "event_refused")
    assert _state(org.id)["events"] == 1


def test_a_merge_in_a_group_is_seen_by_the_messages_after_it(db, session):
    """ADT^A40 moves an MRN: in one group, a message before the merge that names the prior MRN finds
    the prior patient, one after it the survivor — as one by one."""
    from tests.ehr_messages import merge

    org = _org(session, "Merge Clinic")
    survivor, prior = _patient(org.id, "MRN-S", "s@valid.test"), _patient(org.id, "MRN-P", "p@valid.test")
    token = _connection(org.id)
    frames = [adt(token, "A08", "M-1", "MRN-P"), merge(token, "M-2", "MRN-S", "MRN-P"),
              adt(token, "A08", "M-3", "MRN-P"), siu(token, "S12", "M-4", "MRN-P")]
    answers = service.ingest_batch([(f.encode(), "127.0.0.1") for f in frames])
    assert [c[0] for c in _codes(answers)] == ["AA"] * 4
    with read_only_session(org.id) as s:
        events = s.execute(select(ContactEvent.name, ContactEvent.contact_id).where(ContactEvent.org_id == org.id)
                           .order_by(ContactEvent.received_at, ContactEvent.id)).all()
    assert sorted(events) == sorted([("patient.updated", prior), ("patient.merged", survivor),
                                     ("patient.updated", survivor), ("appointment.booked", survivor)])
