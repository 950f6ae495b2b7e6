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
from tests.ehr_messages import MllpClient, adt, msh, pid, siu
from tests.fixtures.delivery import free_port

ROOT = Path(__file__).resolve().parent.parent


def _wait_for_port(proc, port: int) -> None:
    deadline = time.monotonic() + 60
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


def test_malformed_messages_are_answered_naming_the_problem(db, org, listener):
    _patient(org.id, "MRN-2")
    token = _connection(org.id)
    good = adt(token, "A01", "BAD-0", "MRN-2").split("\r")
    cases = [
        # (message, code, ERR code, words in the text, kept in the error queue)
        ("PID|1||MRN-2^^^NORTH^MR\r" + "\r".join(good), "AR", "100", "MSH", False),  # MSH missing at the start
        (good[0].replace("|^~\\&|", "|^~|", 1) + "\r" + "\r".join(good[1:]), "AR", "102", "encoding", False),
        ("\r".join([good[0], good[2], good[1], good[3]]), "AE", "100", "order", True),  # PID before EVN
        (adt(token, "A02", "BAD-3", "MRN-2"), "AR", "201", "trigger", True),  # a transfer: not taken
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
                             str(free_port())], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=60,
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
