"""HL7 v2 over MLLP (issue 15 item 3): the real ``carepost mllp`` process receives ADT and SIU
messages over TCP and TLS, answers AA/AE/AR with MSA-2 echoing MSH-10 and an ERR naming the
problem, records contact events (properties encrypted) for patients matched by MRN, keeps what
it cannot record in the error queue (reason without PHI, raw message encrypted), records each
message once, refuses unknown senders and facilities, and never records an event for another
organization's patient."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from carepost.core.database import org_session, read_only_session
from carepost.ehr.models import EhrMessage
from carepost.tracking.conversions import ContactEvent
from tests.ehr_messages import MllpClient, adt, msh, parse_ack, pid, siu
from tests.fixtures.delivery import free_port

ROOT = Path(__file__).resolve().parent.parent


def _wait_for_port(proc, port: int) -> None:
    deadline = time.monotonic() + 300  # a shared machine at load 30 needs minutes to start a process
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "carepost mllp did not start"
            time.sleep(0.2)


def _start(storage, port: int, extra_env: dict | None = None, args: tuple = ()) -> subprocess.Popen:
    env = {**os.environ, **storage.env, **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "carepost.cli", "mllp", "--host", "127.0.0.1", "--port", str(port),
                             *args], env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return proc.returncode


@pytest.fixture(scope="module")
def listener(storage):
    """``carepost mllp`` as a real process on plain TCP (loopback), for the module."""
    port = free_port()
    proc = _start(storage, port)
    _wait_for_port(proc, port)
    yield port
    assert _stop(proc) == 0, proc.stdout.read().decode()[-3000:]


def _patient(org_id: str, mrn: str, email: str = "ann@valid.test") -> str:
    from carepost.patients import service as patients

    with org_session(org_id) as s:
        cid = patients.save_contact(s, org_id, {"given_name": "Ann", "email": email, "mrn": mrn}).contact.id
        s.commit()
    return cid


def _connection(org_id: str, facilities=("NORTHCLINIC",)) -> str:
    from carepost.ehr import service

    with org_session(org_id) as s:
        _, token = service.create_connection(s, org_id, name="ADT feed", sending_facilities=list(facilities))
        s.commit()
    return token


def _events(org_id: str) -> list[ContactEvent]:
    with read_only_session(org_id) as s:
        return list(s.scalars(select(ContactEvent).where(ContactEvent.org_id == org_id)
                              .order_by(ContactEvent.received_at, ContactEvent.id)))


def _messages(org_id: str, status: str | None = None) -> list[EhrMessage]:
    with read_only_session(org_id) as s:
        q = select(EhrMessage).where(EhrMessage.org_id == org_id)
        if status:
            q = q.where(EhrMessage.status == status)
        return list(s.scalars(q.order_by(EhrMessage.received_at, EhrMessage.id)))


def _properties(event: ContactEvent) -> dict:
    from carepost.tracking.conversions import event_properties

    with read_only_session(event.org_id) as s:
        return event_properties(s, event)


def _raw(row: EhrMessage) -> str:
    from carepost.ehr.service import raw_text

    with read_only_session(row.org_id) as s:
        return raw_text(s, row)


def test_adt_and_siu_messages_become_events(db, org, listener):
    cid = _patient(org.id, "MRN-4411")
    token = _connection(org.id)
    sent = [("A01", adt(token, "A01", "ADT0001", "MRN-4411")), ("A03", adt(token, "A03", "ADT0002", "MRN-4411")),
            ("A04", adt(token, "A04", "ADT0003", "MRN-4411", patient_class="O")),
            ("A08", adt(token, "A08", "ADT0004", "MRN-4411")),
            ("S12", siu(token, "S12", "SIU0001", "MRN-4411")), ("S13", siu(token, "S13", "SIU0002", "MRN-4411")),
            ("S14", siu(token, "S14", "SIU0003", "MRN-4411")), ("S15", siu(token, "S15", "SIU0004", "MRN-4411"))]
    with MllpClient(listener) as client:
        for trigger, message in sent:
            answer = client.exchange(message)
            assert answer["code"] == "AA", answer["raw"]
            assert answer["control_id"] == message.split("\r")[0].split("|")[9]
            assert answer["msh"][8] == f"ACK^{trigger}^ACK" and answer["msh"][4] == "EPICADT"
            assert answer["msh"][5] == "NORTHCLINIC"
    events = _events(org.id)
    assert [e.name for e in events] == ["patient.admitted", "patient.discharged", "patient.registered",
                                        "patient.updated", "appointment.booked", "appointment.rescheduled",
                                        "appointment.modified", "appointment.cancelled"]
    assert {e.contact_id for e in events} == {cid}
    assert all(e.properties_enc and b"MRN-4411" not in e.properties_enc and b"NORTHHOSP" not in e.properties_enc
               for e in events)
    admitted = _properties(events[0])
    assert admitted["patient_class"] == "I" and admitted["location"] == {
        "point_of_care": "4W", "room": "401", "bed": "B", "facility": "NORTHHOSP"}
    assert admitted["provider_ids"] == ["1234567", "7654321"] and admitted["message_type"] == "ADT^A01"
    assert "admitted_at" in admitted and "Testpatient" not in str(admitted)
    discharged = _properties(events[1])
    assert discharged["discharged_at"] and events[1].occurred_at.replace(tzinfo=UTC) < datetime.now(UTC)
    booked = _properties(events[4])
    start = (datetime.now(UTC) + timedelta(days=3)).replace(hour=15, minute=30, second=0, microsecond=0)
    assert booked["start"] == start.isoformat().replace("+00:00", "Z")
    assert booked["appointment_type"] == "FOLLOWUP" and booked["appointment_id"] == "APT1001"
    assert booked["location"]["point_of_care"] == "CLINIC2" and booked["provider_ids"] == ["1234567"]
    assert booked["service_codes"] == ["99213"] and booked["duration"] == 20
    assert _properties(events[7])["status"] == "Cancelled"
    rows = _messages(org.id)
    assert len(rows) == 8 and {r.status for r in rows} == {"recorded"} and all(r.raw_enc is None for r in rows)
    assert {r.event_id for r in rows} == {e.id for e in events}
    # Each recorded event is audited by the connection, ids only.
    from carepost.audit.models import AuditEvent

    with read_only_session(org.id) as s:
        audits = s.scalars(select(AuditEvent).where(AuditEvent.org_id == org.id,
                                                    AuditEvent.action == "contact_event.create")).all()
    assert len(audits) == 8 and {a.actor_type for a in audits} == {"ehr_connection"}
    assert all("MRN-4411" not in str(a.details) for a in audits)


def test_transfers_cancellations_and_the_other_appointment_notifications(db, org, listener):
    """ADT A02 (transfer), A11 (cancel admit), A13 (cancel discharge) and SIU S16-S22, S26 become
    events as A01-A08 and S12-S15 do; S23/S24 (time slots, no patient) are not taken."""
    cid = _patient(org.id, "MRN-T")
    token = _connection(org.id)
    transfer = adt(token, "A02", "TR-1", "MRN-T").replace("4W^401^B^NORTHHOSP||||",
                                                          "5E^502^A^NORTHHOSP|||4W^401^B^NORTHHOSP|")
    sent = [transfer, adt(token, "A11", "TR-2", "MRN-T"), adt(token, "A13", "TR-3", "MRN-T")]
    sent += [siu(token, f"S{n}", f"TR-S{n}", "MRN-T") for n in (16, 17, 18, 19, 20, 21, 22, 26)]
    with MllpClient(listener) as client:
        for message in sent:
            answer = client.exchange(message)
            trigger = message.split("|", 9)[8].split("^")[1]
            assert (answer["code"], answer["msh"][8]) == ("AA", f"ACK^{trigger}^ACK"), answer["raw"]
        slots = client.exchange(siu(token, "S23", "TR-S23", "MRN-T"))
        assert (slots["code"], slots["err_code"], slots["err_location"]) == ("AR", "201", "MSH^1^9")
        assert "S26" in slots["text"] and "S23" not in slots["text"]
    events = _events(org.id)
    assert [e.name for e in events] == [
        "patient.transferred", "patient.admission_cancelled", "patient.discharge_cancelled",
        "appointment.discontinued", "appointment.deleted", "appointment.resource_added",
        "appointment.resource_modified", "appointment.resource_cancelled", "appointment.resource_discontinued",
        "appointment.resource_deleted", "appointment.noshow"]
    assert {e.contact_id for e in events} == {cid}
    moved = _properties(events[0])
    assert moved["location"] == {"point_of_care": "5E", "room": "502", "bed": "A", "facility": "NORTHHOSP"}
    assert moved["prior_location"] == {"point_of_care": "4W", "room": "401", "bed": "B", "facility": "NORTHHOSP"}
    assert moved["message_type"] == "ADT^A02"
    noshow = _properties(events[-1])
    assert noshow["appointment_id"] == "APT1001" and noshow["message_type"] == "SIU^S26"
    assert _properties(events[1]).get("prior_location") is None


def test_a_merge_moves_the_prior_mrn_to_the_surviving_patient(db, org, listener):
    """ADT^A40: the MRN of MRG-1 moves, by blind index, to the patient of PID-3; a message naming
    the prior MRN then finds the surviving patient — also right after the merge on the same
    connection (pipelined, possibly in the merge's group). A survivor CarePost does not know is an
    error kept in the error queue and moves nothing; MRG is required."""
    from carepost.core.database import read_only_session
    from carepost.patients import service as patients
    from tests.ehr_messages import merge

    survivor = _patient(org.id, "MRN-M1", "one@valid.test")
    prior = _patient(org.id, "MRN-M2", "two@valid.test")
    third = _patient(org.id, "MRN-M3", "three@valid.test")
    fourth = _patient(org.id, "MRN-M4", "four@valid.test")
    token = _connection(org.id)
    with MllpClient(listener) as client:
        first = merge(token, "MG-1", "MRN-M1", "MRN-M2")
        assert client.exchange(first)["code"] == "AA"
        assert client.exchange(adt(token, "A08", "MG-2", "MRN-M2"))["code"] == "AA"
        client.send(merge(token, "MG-3", "MRN-M1", "MRN-M3"))
        client.send(adt(token, "A08", "MG-4", "MRN-M3"))
        assert [parse_ack(client.receive())["code"] for _ in range(2)] == ["AA", "AA"]
        unknown = client.exchange(merge(token, "MG-5", "MRN-404", "MRN-M4"))
        assert (unknown["code"], unknown["err_code"], unknown["err_location"]) == ("AE", "204", "PID^1^3")
        assert client.exchange(adt(token, "A08", "MG-6", "MRN-M4"))["code"] == "AA"
        gone = client.exchange(merge(token, "MG-7", "MRN-M1", "MRN-GONE"))  # nothing left to move
        assert gone["code"] == "AA"
        no_mrg = client.exchange(merge(token, "MG-8", "MRN-M1", None))
        assert (no_mrg["code"], no_mrg["err_code"], no_mrg["err_location"]) == ("AE", "100", "MRG")
        assert client.exchange(first)["code"] == "AA"  # a resend: a replay
    events = _events(org.id)  # (two of them may share a group: compared without their order)
    assert sorted((e.name, e.contact_id) for e in events) == sorted([
        ("patient.merged", survivor), ("patient.updated", survivor), ("patient.merged", survivor),
        ("patient.updated", survivor), ("patient.updated", fourth), ("patient.merged", survivor)])
    assert sorted(_properties(e)["merged_contact_ids"] for e in events if e.name == "patient.merged") == sorted(
        [[prior], [third], []])
    with read_only_session(org.id) as s:
        for mrn in ("MRN-M1", "MRN-M2", "MRN-M3"):
            assert patients.find_contact_ids(s, org.id, mrn=mrn) == [survivor], mrn
        assert patients.find_contact_ids(s, org.id, mrn="MRN-M4") == [fourth]
        assert patients.get_contact(s, prior).id == prior  # the other record stays (not merged)
    assert sorted(m.control_id for m in _messages(org.id, "error")) == ["MG-5", "MG-8"]
    from carepost.audit.models import AuditEvent

    with read_only_session(org.id) as s:
        audits = s.scalars(select(AuditEvent).where(AuditEvent.org_id == org.id, AuditEvent.target_id == survivor,
                                                    AuditEvent.action == "contact_event.create")).all()
    assert sorted(a.details["merged_contact_ids"] for a in audits if "merged_contact_ids" in a.details) \
        == sorted([[prior], [third]])  # ids only


def test_a_message_is_recorded_once(db, org, listener):
    _patient(org.id, "MRN-1")
    token = _connection(org.id)
    message = siu(token, "S12", "DUP-1", "MRN-1")
    with MllpClient(listener) as client:
        assert client.exchange(message)["code"] == "AA"
        again = client.exchange(message)  # the sender did not see the first ACK and sends it again
        assert again["code"] == "AA" and again["control_id"] == "DUP-1"
        other = client.exchange(siu(token, "S12", "DUP-1", "MRN-1", appointment_id="APT2"))
        assert other["code"] == "AE" and other["err_code"] == "205" and "MSH-10" in other["text"]
        assert other["err_location"] == "MSH^1^10"
    assert len(_events(org.id)) == 1
    [kept] = _messages(org.id, "error")
    assert kept.reason_code == "duplicate_control_id" and kept.control_id is None
    assert "APT2" in _raw(kept) and b"APT2" not in kept.raw_enc  # kept, encrypted


def test_msa_2_is_msh_10_as_sent(db, org, listener):
    """An MSH-10 holding escape sequences (or separators) comes back in MSA-2 exactly as it was on
    the wire — not resolved and escaped a second time — whatever the answer: AA, AA to a resend,
    AE (error queue), AE for a message that cannot be read, AR (unknown sender), the commit and
    application ACKs of enhanced mode; from a sender with other encoding characters, written with
    the ACK's own so that it reads the same."""
    from tests.ehr_messages import ts

    _patient(org.id, "MRN-ESC")
    token = _connection(org.id)
    ids = ["ESC\\T\\1\\F\\2", "ESC\\E\\3", "ESC\\X41\\4\\H\\b\\N\\", "ESC^5~6&7"]
    with MllpClient(listener) as client:
        sent = [adt(token, "A08", control_id, "MRN-ESC") for control_id in ids]
        for control_id, message in zip(ids, sent, strict=True):
            answer = client.exchange(message)
            assert (answer["code"], answer["control_id"]) == ("AA", control_id), answer["raw"]
        resent = client.exchange(sent[0])
        assert (resent["code"], resent["control_id"]) == ("AA", ids[0]), resent["raw"]
        unmatched = client.exchange(adt(token, "A08", "ESC\\T\\404", "MRN-404"))
        assert (unmatched["code"], unmatched["control_id"]) == ("AE", "ESC\\T\\404"), unmatched["raw"]
        key_id = token.split(".")[0]
        forged = client.exchange(adt(f"{key_id}.{'x' * 28}", "A08", "ESC\\S\\AR", "MRN-ESC"))
        assert (forged["code"], forged["control_id"]) == ("AR", "ESC\\S\\AR"), forged["raw"]
        two_msh = adt(token, "A08", "ESC\\R\\2MSH", "MRN-ESC")
        unreadable = client.exchange(two_msh + two_msh.split("\r")[0] + "\r")
        assert (unreadable["code"], unreadable["err_code"]) == ("AE", "100"), unreadable["raw"]
        assert unreadable["control_id"] == "ESC\\R\\2MSH"
        first, _, rest = adt(token, "A08", "ESC\\T\\EN", "MRN-ESC").partition("\r")
        client.send(f"{first}|||AL|AL\r{rest}")
        commit, application = parse_ack(client.receive()), parse_ack(client.receive())
        assert [(a["code"], a["control_id"]) for a in (commit, application)] == [("CA", "ESC\\T\\EN"),
                                                                                  ("AA", "ESC\\T\\EN")]
        # Component $, repetition %, escape /, subcomponent *: /T/ is the subcomponent separator
        # (\T\ in the ACK) and & is plain text there (escaped in the ACK, where it is a separator).
        other = "\r".join([f"MSH|$%/*|EPICADT|NORTHCLINIC|CAREPOST|CAREPOST|{ts()}|{token}|ADT$A08$ADT_A01|"
                            "OE/T/1&2/E/3|P|2.5.1", f"EVN|A08|{ts()}", "PID|1||MRN-ESC$$$NORTH$MR", "PV1|1|O"]) + "\r"
        answer = client.exchange(other)
        assert (answer["code"], answer["control_id"]) == ("AA", "OE\\T\\1\\T\\2\\E\\3"), answer["raw"]
    assert len(_events(org.id)) == len(ids) + 2
    assert {r.control_id for r in _messages(org.id)} >= set(ids)  # stored as sent, as before


def test_malformed_messages_are_answered_naming_the_problem(db, org, listener):
    _patient(org.id, "MRN-2")
    token = _connection(org.id)
    good = adt(token, "A01", "BAD-0", "MRN-2").split("\r")
    cases = [
        # (message, code, ERR code, words in the text, kept in the error queue)
        ("PID|1||MRN-2^^^NORTH^MR\r" + "\r".join(good), "AR", "100", "MSH", False),  # MSH missing at the start
        (good[0].replace("|^~\\&|", "|^~|", 1) + "\r" + "\r".join(good[1:]), "AR", "102", "encoding", False),
        ("\r".join([good[0], good[2], good[1], good[3]]), "AE", "100", "order", True),  # PID before EVN
        (adt(token, "A05", "BAD-3", "MRN-2"), "AR", "201", "trigger", True),  # a pre-admission: not taken
        (msh(token, "R01", "BAD-4", message_type="ORU") + "\rPID|1||MRN-2^^^NORTH^MR\r", "AR", "200", "ADT and SIU",
         True),
        ("\r".join([good[0].replace("BAD-0", "BAD-5"), good[1], "PID|1||||Testpatient^Ann", good[3]]), "AE", "101",
         "PID-3", True),
        ("\r".join([good[0].replace("BAD-0", "BAD-6"), good[1], good[2]]), "AE", "100", "PV1", True),
        (good[0].replace("BAD-0", "BAD-7").replace("|P|2.5.1", "|P|3.0") + "\r" + "\r".join(good[1:]), "AR", "203",
         "MSH-12", True),
        (siu(token, "S12", "BAD-8", "MRN-2").replace("TQ1|1||||||", "TQ1|1||||||2026-13-45"), "AE", "102",
         "TQ1-7", True),
    ]
    with MllpClient(listener) as client:
        for message, code, err_code, words, _ in cases:
            answer = client.exchange(message)
            assert (answer["code"], answer["err_code"]) == (code, err_code), (words, answer["raw"])
            assert words.lower() in answer["text"].lower(), answer["raw"]
            assert "MRN-2" not in answer["raw"] and "Testpatient" not in answer["raw"]
        # The connection still works after all that.
        assert client.exchange(adt(token, "A01", "GOOD-1", "MRN-2"))["code"] == "AA"
    assert [e.name for e in _events(org.id)] == ["patient.admitted"]
    kept = _messages(org.id, "error")
    assert len(kept) == sum(1 for c in cases if c[4])
    assert {k.reason_code for k in kept} >= {"segment_order", "unsupported_trigger", "unsupported_type",
                                              "required_field", "missing_segment", "version", "bad_date"}
    for row in kept:
        assert row.raw_enc and b"Testpatient" not in row.raw_enc and "MRN-2" not in (row.reason or "")
        assert "Testpatient" in _raw(row) or "MRN-2" in _raw(row)


def test_unknown_senders_and_facilities_are_refused(db, org, listener):
    _patient(org.id, "MRN-3")
    token = _connection(org.id, facilities=("NORTHCLINIC",))
    with MllpClient(listener) as client:
        wrong_facility = client.exchange(adt(token, "A01", "F-1", "MRN-3", facility="SOUTHCLINIC"))
        assert wrong_facility["code"] == "AR" and wrong_facility["err_location"] == "MSH^1^4"
        key_id = token.split(".")[0]
        forged = client.exchange(adt(f"{key_id}.{'x' * 28}", "A01", "F-2", "MRN-3"))
        assert forged["code"] == "AR" and forged["err_location"] == "MSH^1^8"
        anonymous = client.exchange(adt("", "A01", "F-3", "MRN-3"))
        assert anonymous["code"] == "AR" and "credential" in anonymous["text"]
    assert _events(org.id) == [] and _messages(org.id) == []  # no organization: nothing stored


def test_unmatched_patients_wait_in_the_error_queue_and_are_retried(db, org, listener, client, sender):
    token = _connection(org.id)
    with MllpClient(listener) as mllp:
        answer = mllp.exchange(siu(token, "S12", "UNM-1", "MRN-404"))
    assert answer["code"] == "AE" and answer["err_code"] == "204" and answer["err_location"] == "PID^1^3"
    assert "MRN-404" not in answer["raw"]
    [row] = _messages(org.id, "error")
    assert row.reason_code == "patient_not_found" and row.error_field == "PID-3" and "MRN-404" not in row.reason
    assert "MRN-404" in _raw(row) and token.split(".")[1] not in _raw(row)  # kept without the MSH-8 credential
    assert _events(org.id) == []

    key = sender.key("phi:read_masked", "phi:write")
    listed = client.get("/api/v1/ehr/messages", headers=key)
    assert listed.status_code == 200, listed.text
    [item] = listed.json()
    assert item["id"] == row.id and item["reason_code"] == "patient_not_found" and item["field"] == "PID-3"
    assert "MRN-404" not in listed.text and "raw" not in item
    still = client.post(f"/api/v1/ehr/messages/{row.id}/retry", headers=key)
    assert still.status_code == 200 and still.json()["still_failing"] == 1

    cid = _patient(org.id, "MRN-404")
    retried = client.post(f"/api/v1/ehr/messages/{row.id}/retry", headers=key)
    assert retried.status_code == 200, retried.text
    assert retried.json()["recorded"] == 1 and retried.json()["messages"][0]["status"] == "recorded"
    [event] = _events(org.id)
    assert event.name == "appointment.booked" and event.contact_id == cid
    [row] = _messages(org.id)
    assert row.status == "recorded" and row.raw_enc is None and row.attempts == 3
    # The sender retrying the same message now gets AA for the one event.
    with MllpClient(listener) as mllp:
        assert mllp.exchange(siu(token, "S12", "UNM-1", "MRN-404"))["code"] == "AA"
    assert len(_events(org.id)) == 1
    # A resend of a queued message is processed again: the sender's own retry succeeds too.
    with MllpClient(listener) as mllp:
        assert mllp.exchange(adt(token, "A04", "UNM-2", "MRN-405"))["code"] == "AE"
        _patient(org.id, "MRN-405", email="bo@valid.test")
        assert mllp.exchange(adt(token, "A04", "UNM-2", "MRN-405"))["code"] == "AA"
    assert [e.name for e in _events(org.id)] == ["appointment.booked", "patient.registered"]
    # Discarding destroys the content.
    with MllpClient(listener) as mllp:
        assert mllp.exchange(adt(token, "A08", "UNM-3", "MRN-406"))["code"] == "AE"
    [queued] = _messages(org.id, "error")
    gone = client.post(f"/api/v1/ehr/messages/{queued.id}/discard", headers=key)
    assert gone.status_code == 200 and gone.json()["status"] == "discarded"
    [queued] = _messages(org.id, "discarded")
    assert queued.raw_enc is None
    assert client.get("/api/v1/ehr/messages", headers=sender.key("analytics:read")).status_code == 403


def test_another_organizations_patient_is_never_recorded(db, org, listener, session):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    _patient(other.id, "MRN-B1", email="b@valid.test")
    token_a = _connection(org.id)
    _connection(other.id)
    with MllpClient(listener) as client:
        answer = client.exchange(adt(token_a, "A01", "X-1", "MRN-B1"))
    assert answer["code"] == "AE" and answer["err_code"] == "204"
    assert _events(org.id) == [] and _events(other.id) == []
    assert [m.reason_code for m in _messages(org.id, "error")] == ["patient_not_found"]
    assert _messages(other.id) == []


def test_concurrent_connections(db, org, listener):
    _patient(org.id, "MRN-C")
    token = _connection(org.id)
    answers: list[str] = []

    def send(n: int) -> None:
        with MllpClient(listener) as client:
            for i in range(15):
                trigger = ("S12", "S14")[i % 2]
                answers.append(client.exchange(siu(token, trigger, f"C{n}-{i}", "MRN-C"))["code"])

    threads = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers.count("AA") == 60
    with read_only_session(org.id) as s:
        assert s.scalar(select(func.count()).select_from(ContactEvent).where(ContactEvent.org_id == org.id)) == 60


def test_every_aa_follows_the_audit_checkpoint_of_its_message(db, org, listener):
    """The listener writes a group's audit checkpoint while it stores the next group, but a
    group's ACKs wait for it: when an AA arrives, this machine's checkpoint file already covers
    the audit event of that message (carepost.audit.checkpoints: deleting the newest events must
    stay detectable for everything acknowledged)."""
    from carepost.audit import checkpoints
    from carepost.audit.models import AuditEvent

    _patient(org.id, "MRN-K")
    token = _connection(org.id)
    seen: list[tuple[str, int]] = []  # (control id, the checkpoint's seq when its AA arrived)

    def send(n: int) -> None:
        with MllpClient(listener) as client:
            for i in range(12):
                control_id = f"K{n}-{i}"
                answer = client.exchange(siu(token, "S12", control_id, "MRN-K"))
                assert answer["code"] == "AA"
                cp = checkpoints.read_local(org.id)
                seen.append((control_id, cp.seq if cp else 0))

    threads = [threading.Thread(target=send, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 72
    by_message = {row.id: row.control_id for row in _messages(org.id)}
    with read_only_session(org.id) as s:
        audited = {by_message[e.details["ehr_message_id"]]: e.seq for e in s.scalars(
            select(AuditEvent).where(AuditEvent.chain == org.id, AuditEvent.action == "contact_event.create"))
            if e.details.get("ehr_message_id") in by_message}
    assert len(audited) == 72
    for control_id, checkpoint_seq in seen:
        assert checkpoint_seq >= audited[control_id], control_id


def test_pipelined_frames_and_a_frame_too_large(db, org, listener):
    _patient(org.id, "MRN-P")
    token = _connection(org.id)
    with MllpClient(listener) as client:
        # Three frames in one write, with noise between them: three answers, in order.
        data = b"".join(b"junk\x0b" + adt(token, "A08", f"P-{i}", "MRN-P").encode() + b"\x1c\r" for i in range(3))
        client.sock.sendall(data)
        assert [client.receive().split("MSA|AA|")[1].split("\r")[0] for _ in range(3)] == ["P-0", "P-1", "P-2"]
        big = adt(token, "A08", "P-BIG", "MRN-P") + "NTE|1||" + "x" * (1024 * 1024 + 10) + "\r"
        client.send(big)
        answer = client.receive()
        assert "MSA|AR|P-BIG" in answer and "larger than" in answer
    assert len(_events(org.id)) == 3


def _certificate(directory: Path) -> tuple[Path, Path]:
    from carepost.delivery.submission import ensure_self_signed

    return ensure_self_signed(directory, ["localhost"])


def test_tls(db, org, storage, tmp_path):
    _patient(org.id, "MRN-T")
    token = _connection(org.id)
    cert, key = _certificate(tmp_path / "tls")
    port = free_port()
    proc = _start(storage, port, {"CAREPOST_MLLP_CERT_FILE": str(cert), "CAREPOST_MLLP_KEY_FILE": str(key)})
    try:
        _wait_for_port(proc, port)
        context = ssl.create_default_context(cafile=str(cert))
        with MllpClient(port, tls=context) as client:
            assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
            assert client.exchange(siu(token, "S12", "TLS-1", "MRN-T"))["code"] == "AA"
        # A plain-TCP client gets no answer from the TLS listener.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"\x0b" + adt(token, "A01", "TLS-2", "MRN-T").encode() + b"\x1c\r")
            raw.settimeout(10)
            try:
                reply = raw.recv(100)
            except (ConnectionResetError, TimeoutError, OSError):
                reply = b""
            assert b"MSA" not in reply
    finally:
        assert _stop(proc) == 0
    assert [e.name for e in _events(org.id)] == ["appointment.booked"]


def test_plain_mllp_only_on_loopback(storage):
    env = {**os.environ, **storage.env}
    result = subprocess.run([sys.executable, "-m", "carepost.cli", "mllp", "--host", "0.0.0.0", "--port",
                             str(free_port())], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 1 and "CAREPOST_MLLP_CERT_FILE" in result.stderr + result.stdout


def test_the_cli_lists_and_retries_the_error_queue(db, org, listener):
    from typer.testing import CliRunner

    from carepost.cli import app

    token = _connection(org.id)
    with MllpClient(listener) as client:
        assert client.exchange(adt(token, "A01", "CLI-1", "MRN-CLI"))["code"] == "AE"
    runner = CliRunner()
    listed = runner.invoke(app, ["ehr", "errors", "--org", org.id])
    assert listed.exit_code == 0, listed.output
    assert "CLI-1" in listed.output and "MRN-CLI" not in listed.output and "1 messages" in listed.output
    failing = runner.invoke(app, ["ehr", "retry", "--org", org.id])
    assert failing.exit_code == 1 and "0 recorded, 1 still" in failing.output
    _patient(org.id, "MRN-CLI")
    done = runner.invoke(app, ["ehr", "retry", "--org", org.id])
    assert done.exit_code == 0 and "1 recorded" in done.output, done.output
    assert [e.name for e in _events(org.id)] == ["patient.admitted"]


def test_pid_helper_is_synthetic():
    assert "Testpatient" in pid("X")


def test_an_hl7_appointment_starts_a_journey(db, org, listener):
    """An EHR drives journeys without custom code: SIU^S12 over MLLP -> appointment.booked (with its
    appointment_type property) -> a run of the live journey that enters on it."""
    from carepost.journeys.models import JourneyRun
    from tests.test_journeys_engine import make_journey

    cid = _patient(org.id, "MRN-J")
    token = _connection(org.id)
    with org_session(org.id) as s:
        journey_id, _ = make_journey(s, org.id, {
            "purpose": "treatment", "reentry": {"mode": "never"}, "start": "w",
            "entry": {"type": "event", "event": "appointment.booked", "where": {"appointment_type": "FOLLOWUP"}},
            "steps": {"w": {"type": "wait", "duration": "2d", "next": "x"}, "x": {"type": "exit"}}})
        s.commit()
    with MllpClient(listener) as client:
        assert client.exchange(siu(token, "S12", "J-1", "MRN-J"))["code"] == "AA"
    with read_only_session(org.id) as s:
        runs = s.scalars(select(JourneyRun).where(JourneyRun.org_id == org.id)).all()
    assert [(r.journey_id, r.contact_id) for r in runs] == [(journey_id, cid)]


# --------------------------------------------------------------------------- real-world shapes


def _pv1(**fields: str) -> str:
    values = [""] * 45
    for number, value in fields.items():
        values[int(number[1:]) - 1] = value
    return "PV1|" + "|".join(values).rstrip("|")


def test_real_world_messages_coded_elements_repetitions_escapes_and_z_segments(db, org, listener):
    """Messages shaped as interface engines send them: CE/CWE fields with code, text, coding system
    and alternate code; repeated PID-3 (an SSN first, an empty repetition), XCN and CWE fields;
    escape sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\X..\\ \\H\\ \\.br\\) resolved as the sender meant with the
    message's own separators (other encoding characters too); PD1/NK1/PV2/OBX/AL1/DG1/NTE and
    Z-segments between and after the segments CarePost reads are tolerated and nothing clinical is
    recorded from them."""
    from tests.ehr_messages import ts

    cid = _patient(org.id, "MRN&77")  # the MRN holds the subcomponent separator: sent escaped
    token = _connection(org.id)
    now = ts()
    adt_a01 = "\r".join([
        (f"MSH|^~\\&|EPICADT|NORTHCLINIC^2.16.840.1.113883.19.5^ISO|CAREPOST|CAREPOST|{now}|{token}|ADT^A01^ADT_A01|"
         "RW-1|P|2.5.1|||||USA"),
        f"EVN|A01|{ts(timedelta(minutes=-5))}|||JSMITH^Smith^John^^^^^^NORTH&1.2.3&ISO",
        ("PID|1||123-45-6789^^^SSA^SS~MRN\\T\\77^^^NORTH&2.16.840.1.113883.19.5&ISO^MR||O\\S\\Brien^Ann^Q~Annie^^^^^^A"
         "||19800101|F||2106-3^White^CDCREC|1 Main St^^Springfield^IL^62701"),
        "PD1|||NORTH CLINIC^^1234",
        "NK1|1|O\\S\\Brien^John|SPO^Spouse^HL70063",
        "ZPD|1|VIP^Very important^L|\\H\\flag\\N\\",
        _pv1(p1="1", p2="I", p3="4W\\F\\A^401^B^NORTH\\T\\HOSP&1.2&ISO",
             p7="1234567^Carter^Maya^^^DR~7777^Lee^Kim", p8="7654321^Ng^Lee", p10="MED^Medicine^HL70069",
             p17="1234567^Carter^Maya^^^DR", p44=ts(timedelta(hours=-30))),
        "PV2|||R10.9^Abdominal pain, unspecified^I10",
        "OBX|1|CWE|8661-1^Chief complaint^LN||R10.9^Abdominal pain\\E\\unspecified^I10^789.00^Abd pain^I9CM||||||F",
        "OBX|2|NM|8480-6^Systolic BP^LN||120|mm[Hg]^mmHg^UCUM|||||F",
        "AL1|1|DA|70618^Penicillin^RXNORM|SV|Hives\\R\\rash",
        "DG1|1||E11.9^Type 2 diabetes mellitus without complications^I10||20261203|A~W",
        "DG1|2||I10^Essential (primary) hypertension^I10||20261203|A",
        "ZPI|1|\\X41\\|line\\.br\\two",
    ]) + "\r"
    start = (datetime.now(UTC) + timedelta(days=5)).replace(hour=14, minute=0, second=0, microsecond=0)
    begin = start.strftime("%Y%m%d%H%M%S") + "+0000"
    end = (start + timedelta(minutes=30)).strftime("%Y%m%d%H%M%S") + "+0000"
    siu_s12 = "\r".join([
        f"MSH|^~\\&|EPICADT|NORTHCLINIC|CAREPOST|CAREPOST|{now}|{token}|SIU^S12^SIU_S12|RW-2|P|2.5.1",
        "SCH|PL1\\F\\2|APT\\T\\1|||||ROUTINE^Routine \\S\\ recheck^HL70277|FU^Follow\\T\\up visit^HL70276|30|min|"
        f"^^30^{begin}^{end}" + "|" * 14 + "Booked^Booked^HL70278",
        f"TQ1|1||||||{begin}|{end}",
        "NTE|1||Patient says \\F\\ bring the list",
        "PID|1||~MRN\\T\\77^^^NORTH^MR||O\\S\\Brien^Ann",
        "PV1|1|O",
        "RGS|1|A",
        f"AIS|1|A|99213^Office visit^CPT~G0438^Annual wellness visit^HCPCS|{begin}|||30|min",
        "AIL|1|A|CLINIC2^205^^NORTH\\T\\CLINIC",
        "AIP|1|A|1234567^Carter^Maya^^^DR~89^Ro^Al|ATT",
        "ZSC|custom|data~more",
    ]) + "\r"
    # The cancellation of that appointment from a sender with other encoding characters
    # (component $, repetition %, escape /, subcomponent *): & is plain text there, /F/ is |.
    siu_s15 = "\r".join([
        f"MSH|$%/*|EPICADT|NORTHCLINIC|CAREPOST|CAREPOST|{now}|{token}|SIU$S15$SIU_S12|RW-3|P|2.5.1",
        "SCH|PL1/F/2|APT&1|||||ROUTINE$Routine$HL70277|FU$Follow/T/up visit$HL70276|30|min|"
        f"$$30${begin}${end}" + "|" * 14 + "Cancelled",
        "PID|1||X9$$$OTHER$PN%MRN&77$$$NORTH*1.2*ISO$MR||Doe$Jane",
        "RGS|1|A",
        "AIL|1|A|CLINIC2$205$$NORTH&CLINIC",
    ]) + "\r"
    with MllpClient(listener) as client:
        for message, control_id in ((adt_a01, "RW-1"), (siu_s12, "RW-2"), (siu_s15, "RW-3")):
            answer = client.exchange(message)
            assert (answer["code"], answer["control_id"]) == ("AA", control_id), answer["raw"]
    admitted, booked, cancelled = _events(org.id)
    assert [e.name for e in (admitted, booked, cancelled)] == ["patient.admitted", "appointment.booked",
                                                               "appointment.cancelled"]
    assert {admitted.contact_id, booked.contact_id, cancelled.contact_id} == {cid}
    a = _properties(admitted)
    assert a["patient_class"] == "I" and a["hospital_service"] == "MED"
    assert a["location"] == {"point_of_care": "4W|A", "room": "401", "bed": "B", "facility": "NORTH&HOSP"}
    assert a["provider_ids"] == ["1234567", "7777", "7654321"]
    b = _properties(booked)
    assert (b["appointment_id"], b["placer_appointment_id"]) == ("APT&1", "PL1|2")
    assert (b["appointment_type"], b["appointment_type_text"], b["reason_code"]) == ("FU", "Follow&up visit",
                                                                                   "ROUTINE")
    assert b["status"] == "Booked" and b["service_codes"] == ["99213", "G0438"] and b["duration"] == 30
    assert b["location"] == {"point_of_care": "CLINIC2", "room": "205", "facility": "NORTH&CLINIC"}
    assert b["provider_ids"] == ["1234567", "89"] and b["start"] == start.isoformat().replace("+00:00", "Z")
    c = _properties(cancelled)
    assert (c["appointment_id"], c["placer_appointment_id"], c["status"]) == ("APT&1", "PL1|2", "Cancelled")
    assert (c["appointment_type_text"], c["location"]["facility"]) == ("Follow*up visit", "NORTH&CLINIC")
    rows = {r.control_id: r for r in _messages(org.id)}
    assert rows["RW-2"].resource_key == rows["RW-3"].resource_key  # one appointment, however it was written
    for props in (a, b, c):  # nothing clinical or identifying was taken from the other segments
        text = str(props)
        assert not any(word in text for word in ("Brien", "diabetes", "Penicillin", "Hives", "SSA", "123-45",
                                                 "Annie", "bring", "VIP", "custom", "8661", "E11"))


# --------------------------------------------------------------------------- MSH-18 character sets


def _with_charset(message: str, charset: str) -> str:
    first, _, rest = message.partition("\r")
    return first + "|" * 6 + charset + "\r" + rest


def test_msh_18_decides_how_a_message_is_read(db, org, listener):
    # MRNs that differ from what Latin-1 or UTF-8 would read from the same bytes: a match proves
    # the declared character set was used.
    cid = _patient(org.id, "MRN-Ł7")  # 8859/2: Ł is 0xA3 (Latin-1 would read £)
    cid_kr = _patient(org.id, "MRN-한1", email="kr@valid.test")  # KS X 1001 (EUC-KR bytes)
    token = _connection(org.id)
    with MllpClient(listener) as client:
        answer = client.exchange(_with_charset(adt(token, "A08", "CS-1", "MRN-Ł7"), "8859/2").encode("iso8859-2"))
        assert answer["code"] == "AA", answer["raw"]
        assert answer["msh"][17] == "8859/2"  # the ACK says the character set it is in
        answer = client.exchange(_with_charset(adt(token, "A08", "CS-2", "MRN-한1"), "KS X 1001").encode("euc_kr"))
        assert answer["code"] == "AA", answer["raw"]
        # UTF-8 declared: a name outside Latin-1 kept intact in the error queue (unknown MRN).
        text = _with_charset(adt(token, "A01", "CS-3", "MRN-NONE"), "UNICODE UTF-8").replace("Testpatient", "Łódź")
        assert client.exchange(text.encode("utf-8"))["code"] == "AE"
        # An unknown character set, and bytes that are not what MSH-18 says: AR naming MSH-18.
        for charset, data, code in (("EBCDIC", None, "103"), ("UNICODE UTF-16", None, "103"),
                                    ("UNICODE UTF-8", "ISO", "102")):
            message = _with_charset(adt(token, "A08", f"CS-{charset}", "MRN-Ł7"), charset)
            raw = message.encode("iso8859-2") if data else message.encode()
            answer = client.exchange(raw)
            assert (answer["code"], answer["err_location"], answer["err_code"]) == ("AR", "MSH^1^18", code), answer
            assert "MSH-18" in answer["text"]
    assert [(e.name, e.contact_id) for e in _events(org.id)] == [("patient.updated", cid), ("patient.updated", cid_kr)]
    [queued] = _messages(org.id, "error")
    assert "Łódź" in _raw(queued) and "UNICODE UTF-8" in _raw(queued)


# --------------------------------------------------------------------------- batches


def _segments(answer: str) -> list[list[str]]:
    return [s.split("|") for s in answer.split("\r") if s]


def _batch(*messages: str, bts: str | None = None, file: bool = True, batch_id: str = "B-1") -> str:
    parts = ([f"FHS|^~\\&|EPICADT|NORTHCLINIC|CAREPOST|CAREPOST|20261204100000||||F-{batch_id}"] if file else [])
    parts.append(f"BHS|^~\\&|EPICADT|NORTHCLINIC|CAREPOST|CAREPOST|20261204100000||||{batch_id}")
    parts.extend(m.rstrip("\r") for m in messages)
    parts.append(f"BTS|{len(messages) if bts is None else bts}")
    if file:
        parts.append("FTS|1")
    return "\r".join(parts) + "\r"


def test_batches_are_acknowledged_message_by_message(db, org, listener):
    cid = _patient(org.id, "MRN-B1")
    token = _connection(org.id)
    batch = _batch(adt(token, "A01", "BT-1", "MRN-B1"), adt(token, "A08", "BT-2", "MRN-UNKNOWN"),
                   siu(token, "S12", "BT-3", "MRN-B1"), adt(token, "A05", "BT-4", "MRN-B1"))
    with MllpClient(listener) as client:
        client.send(batch)
        segments = _segments(client.receive())
        ids = [s[0] for s in segments]
        assert ids == ["FHS", "BHS"] + ["MSH", "MSA", "MSH", "MSA", "ERR", "MSH", "MSA", "MSH", "MSA", "ERR"] + [
            "BTS", "FTS"]
        assert segments[0][11] == "F-B-1" and segments[1][11] == "B-1"  # FHS-12/BHS-12 refer to the sender's ids
        assert [(s[1], s[2]) for s in segments if s[0] == "MSA"] == [("AA", "BT-1"), ("AE", "BT-2"), ("AA", "BT-3"),
                                                                      ("AR", "BT-4")]
        assert segments[-2] == ["BTS", "4"] and segments[-1] == ["FTS", "1"]
        # Sent again (the sender did not see the answer): every message answered as before, nothing twice.
        client.send(batch)
        again = _segments(client.receive())
        assert [(s[1], s[2]) for s in again if s[0] == "MSA"] == [("AA", "BT-1"), ("AE", "BT-2"), ("AA", "BT-3"),
                                                                   ("AR", "BT-4")]
        # Two batches without a file header, then a single message on the same connection: in order.
        client.send(_batch(adt(token, "A08", "BT-5", "MRN-B1"), file=False, batch_id="B-2")
                    + _batch(file=False, batch_id="B-3"))
        two = _segments(client.receive())
        assert [s[0] for s in two] == ["BHS", "MSH", "MSA", "BTS", "BHS", "BTS"] and two[4][11] == "B-3"
        assert client.exchange(adt(token, "A08", "BT-6", "MRN-B1"))["code"] == "AA"
    assert [e.name for e in _events(org.id)] == ["patient.admitted", "appointment.booked", "patient.updated",
                                                 "patient.updated"]
    assert {e.contact_id for e in _events(org.id)} == {cid}
    assert sorted(m.control_id for m in _messages(org.id, "error")) == ["BT-2", "BT-4"]


def test_a_malformed_batch_is_refused_whole_naming_the_segment(db, org, listener):
    _patient(org.id, "MRN-B2")
    token = _connection(org.id)
    good = adt(token, "A01", "BX-1", "MRN-B2")
    cases = [
        (_batch(good, bts="3"), "BTS^1^1", "BTS-1"),  # the count says 3: a message was lost on the way
        (_batch(good).replace("FTS|1\r", ""), "FTS", "FTS"),
        (_batch(good).replace("BTS|1\r", ""), "BTS", "BTS"),
        (_batch(good).replace("FTS|1", "FTS|2"), "FTS^1^1", "FTS-1"),
        (_batch("EVN|A01|20261204\r" + good), "MSH", "neither BHS, MSH nor BTS"),
    ]
    with MllpClient(listener) as client:
        for frame, location, words in cases:
            answer = client.exchange(frame)
            assert (answer["code"], answer["err_location"]) == ("AR", location), (words, answer["raw"])
            assert words in answer["text"] and answer["control_id"] == "F-B-1", answer  # MSA-2: FHS-11
    assert _events(org.id) == [] and _messages(org.id) == []


# --------------------------------------------------------------------------- mutual TLS


def _client_certificate(ca, directory: Path, name: str) -> tuple[Path, Path]:
    """A client certificate (EKU clientAuth) issued by the test CA ``ca``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _refused(port: int, context: ssl.SSLContext, message: str) -> bool:
    """True when the listener gives no answer: the handshake fails, or (TLS 1.3, where the client
    finishes first) the connection is closed before any MSA."""
    try:
        with MllpClient(port, tls=context, timeout=20) as client:
            client.send(message)
            return "MSA" not in client.receive()
    except (ssl.SSLError, ConnectionError, OSError):
        return True


def test_mutual_tls_refuses_a_client_without_a_certificate(db, org, storage, tmp_path):
    from tests.fixtures.delivery import TlsCA

    _patient(org.id, "MRN-M")
    token = _connection(org.id)
    (tmp_path / "other").mkdir()
    ca, stranger = TlsCA(tmp_path), TlsCA(tmp_path / "other")
    server_cert, server_key = ca.issue(["localhost"])
    client_cert, client_key = _client_certificate(ca, tmp_path, "epic-interface")
    foreign_cert, foreign_key = _client_certificate(stranger, tmp_path, "someone-else")
    port = free_port()
    proc = _start(storage, port, {"CAREPOST_MLLP_CERT_FILE": str(server_cert), "CAREPOST_MLLP_KEY_FILE": str(server_key),
                                  "CAREPOST_MLLP_CLIENT_CA_FILE": str(ca.ca_file)})
    try:
        _wait_for_port(proc, port)
        with_cert = ssl.create_default_context(cafile=str(ca.ca_file))
        with_cert.load_cert_chain(str(client_cert), str(client_key))
        with MllpClient(port, tls=with_cert) as client:
            assert client.exchange(adt(token, "A01", "MTLS-1", "MRN-M"))["code"] == "AA"
        without = ssl.create_default_context(cafile=str(ca.ca_file))
        assert _refused(port, without, adt(token, "A08", "MTLS-2", "MRN-M"))
        foreign = ssl.create_default_context(cafile=str(ca.ca_file))
        foreign.load_cert_chain(str(foreign_cert), str(foreign_key))
        assert _refused(port, foreign, adt(token, "A08", "MTLS-3", "MRN-M"))
        # The same helper sees the answer a certified client gets (still served after the refusals).
        assert not _refused(port, with_cert, adt(token, "A08", "MTLS-4", "MRN-M"))
    finally:
        assert _stop(proc) == 0
    assert [m.control_id for m in _messages(org.id)] == ["MTLS-1", "MTLS-4"]


def test_client_certificates_need_tls(tmp_path):
    from carepost.core.config import Settings
    from carepost.ehr.mllp import Listener

    with pytest.raises(ValueError, match="CAREPOST_MLLP_CLIENT_CA_FILE"):
        Listener(Settings(mllp_client_ca_file=tmp_path / "ca.pem"))
