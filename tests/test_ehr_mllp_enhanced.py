"""HL7 v2 enhanced acknowledgement mode over MLLP (issue 15 item 3, docs/ehr.md): with MSH-15
(accept acknowledgment type) or MSH-16 (application acknowledgment type) valued, the real
``carepost mllp`` process answers a commit ACK (CA/CE/CR) under MSH-15's condition and then an
application ACK (AA/AE/AR) under MSH-16's (AL, NE, ER, SU), on the same connection; an
unknown value is a commit reject naming the field. Original mode (both empty) is unchanged
(tests/test_ehr_mllp.py). Each case is followed by a message in original mode, so "nothing sent"
is seen as the next frame belonging to the next message, not as a timeout."""

from __future__ import annotations

import pytest

from tests.ehr_messages import MllpClient, adt, parse_ack
from tests.fixtures.delivery import free_port
from tests.test_ehr_mllp import (
    _batch,
    _connection,
    _events,
    _messages,
    _patient,
    _segments,
    _start,
    _stop,
    _wait_for_port,
)


@pytest.fixture(scope="module")
def listener(storage):
    port = free_port()
    proc = _start(storage, port)
    _wait_for_port(proc, port)
    yield port
    assert _stop(proc) == 0, proc.stdout.read().decode()[-3000:]


def _enhanced(message: str, accept: str, application: str) -> str:
    first, _, rest = message.partition("\r")
    return f"{first}|||{accept}|{application}\r{rest}"


def _answers(client: MllpClient, message: str, marker: str) -> list[dict]:
    """The frames answering ``message``: everything before the ACK of the original-mode marker
    sent right after it (on one connection answers come back in order)."""
    client.send(message)
    client.send(marker)
    out = []
    while True:
        answer = parse_ack(client.receive())
        if answer["control_id"] == marker.split("\r")[0].split("|")[9]:
            assert answer["code"] == "AA" and len(answer["msh"]) == 12, answer["raw"]  # original mode: one ACK
            return out
        out.append(answer)


def test_commit_and_application_acks_follow_msh_15_and_16(db, org, listener):
    _patient(org.id, "MRN-E")
    token = _connection(org.id)
    n = iter(range(1000))

    def marker() -> str:
        return adt(token, "A08", f"MARK-{next(n)}", "MRN-E")

    with MllpClient(listener) as client:
        first = _enhanced(adt(token, "A01", "EN-1", "MRN-E"), "AL", "AL")
        both = _answers(client, first, marker())
        assert [(a["code"], a["control_id"]) for a in both] == [("CA", "EN-1"), ("AA", "EN-1")]
        assert all(a["msh"][14] == "NE" and a["msh"][15] == "NE" and a["msh"][8] == "ACK^A01^ACK" for a in both)
        assert "ERR" not in both[0]["raw"]
        # NE: no commit ACK; AL: the application ACK.
        assert [a["code"] for a in _answers(client, _enhanced(adt(token, "A08", "EN-2", "MRN-E"), "NE", "AL"),
                                            marker())] == ["AA"]
        # AL / NE: the commit ACK only.
        assert [a["code"] for a in _answers(client, _enhanced(adt(token, "A08", "EN-3", "MRN-E"), "AL", "NE"),
                                            marker())] == ["CA"]
        # ER / ER and all goes well: nothing at all.
        assert _answers(client, _enhanced(adt(token, "A08", "EN-4", "MRN-E"), "ER", "ER"), marker()) == []
        # ER / ER and the patient is unknown: stored in the error queue (no commit ACK), AE.
        unknown = _answers(client, _enhanced(adt(token, "A08", "EN-5", "MRN-404"), "ER", "ER"), marker())
        assert [(a["code"], a["err_location"]) for a in unknown] == [("AE", "PID^1^3")]
        # SU / SU: only successes are acknowledged.
        assert [a["code"] for a in _answers(client, _enhanced(adt(token, "A08", "EN-6", "MRN-E"), "SU", "SU"),
                                            marker())] == ["CA", "AA"]
        assert [a["code"] for a in _answers(client, _enhanced(adt(token, "A08", "EN-7", "MRN-404"), "SU", "SU"),
                                            marker())] == ["CA"]
        # An empty MSH-16 beside a valued MSH-15 counts as AL.
        assert [a["code"] for a in _answers(client, _enhanced(adt(token, "A08", "EN-8", "MRN-E"), "AL", ""),
                                            marker())] == ["CA", "AA"]
        # The same message again: stored already, CA and AA, nothing recorded twice.
        assert [a["code"] for a in _answers(client, first, marker())] == ["CA", "AA"]
    assert [m.control_id for m in _messages(org.id, "error")] == ["EN-5", "EN-7"]
    recorded = [m.control_id for m in _messages(org.id, "recorded")]
    assert [c for c in recorded if c.startswith("EN-")] == ["EN-1", "EN-2", "EN-3", "EN-4", "EN-6", "EN-8"]
    assert len(_events(org.id)) == len(recorded)


def test_refusals_are_commit_rejects(db, org, listener):
    _patient(org.id, "MRN-R")
    token = _connection(org.id)
    marker = adt(token, "A08", "MARK-R", "MRN-R")
    with MllpClient(listener) as client:
        # No known sender: CR naming MSH-8, no application ACK (nothing was accepted).
        forged = _answers(client, _enhanced(adt("mabc.def", "A01", "CR-1", "MRN-R"), "AL", "AL"), marker)
        assert [(a["code"], a["err_location"], a["err_code"]) for a in forged] == [("CR", "MSH^1^8", "204")]
        # ER asks for the commit ACK on a reject too; SU does not.
        assert [a["code"] for a in _answers(client, _enhanced(adt("mabc.def", "A01", "CR-2", "MRN-R"), "ER", "AL"),
                                            marker.replace("MARK-R", "MARK-R2"))] == ["CR"]
        assert _answers(client, _enhanced(adt("mabc.def", "A01", "CR-3", "MRN-R"), "SU", "AL"),
                        marker.replace("MARK-R", "MARK-R3")) == []
        # An unknown MSH-15 or MSH-16 value: one CR naming the field (HL7 table 0155), whatever it asked.
        bad = _answers(client, _enhanced(adt(token, "A01", "CR-4", "MRN-R"), "XX", "AL"),
                       marker.replace("MARK-R", "MARK-R4"))
        assert [(a["code"], a["err_location"], a["err_code"]) for a in bad] == [("CR", "MSH^1^15", "103")]
        assert "MSH-15" in bad[0]["text"] and "AL, NE, ER or SU" in bad[0]["text"]
        bad = _answers(client, _enhanced(adt(token, "A01", "CR-5", "MRN-R"), "NE", "ALWAYS"),
                       marker.replace("MARK-R", "MARK-R5"))
        assert [(a["code"], a["err_location"]) for a in bad] == [("CR", "MSH^1^16")]
    # Nothing of the refused messages is recorded; the bad MSH-15/16 ones wait in the error queue.
    queued = _messages(org.id, "error")
    assert [(m.control_id, m.reason_code, m.error_field) for m in queued] == [("CR-4", "ack_type", "MSH-15"),
                                                                             ("CR-5", "ack_type", "MSH-16")]
    assert not [e for e in _events(org.id) if e.name == "patient.admitted"]


def test_batches_follow_each_messages_msh_15_and_16(db, org, listener):
    """In a batch each message gets in the acknowledgement batch the ACKs its own MSH-15/16 ask
    for (BHS/FHS have no acknowledgment type): original mode its application ACK, enhanced mode
    the commit and application ACKs of its conditions, possibly none; BTS-1 counts what is there.
    A batch of ``ER`` messages is acknowledged on an exception basis; one with nothing to
    acknowledge is answered ``BTS|0`` (every message accepted as asked)."""
    _patient(org.id, "MRN-B")
    token = _connection(org.id)
    batch = _batch(adt(token, "A01", "BE-1", "MRN-B"),  # original mode: AA
                   _enhanced(adt(token, "A08", "BE-2", "MRN-B"), "AL", "AL"),  # CA, AA
                   _enhanced(adt(token, "A08", "BE-3", "MRN-B"), "NE", "NE"),  # nothing
                   _enhanced(adt(token, "A08", "BE-4", "MRN-B"), "ER", "ER"),  # all well: nothing
                   _enhanced(adt(token, "A08", "BE-5", "MRN-404"), "ER", "ER"),  # error queue: AE only
                   _enhanced(adt(token, "A08", "BE-6", "MRN-404"), "SU", "SU"),  # CA only
                   _enhanced(adt(token, "A08", "BE-7", "MRN-B"), "NE", "AL"),  # AA
                   _enhanced(adt("mabc.def", "A08", "BE-8", "MRN-B"), "ER", "AL"),  # unknown sender: CR
                   _enhanced(adt(token, "A08", "BE-9", "MRN-B"), "XX", "NE"),  # not table 0155: CR 103
                   batch_id="B-E")
    with MllpClient(listener) as client:
        client.send(batch)
        segments = _segments(client.receive())
        acks = [(s[1], s[2]) for s in segments if s[0] == "MSA"]
        assert acks == [("AA", "BE-1"), ("CA", "BE-2"), ("AA", "BE-2"), ("AE", "BE-5"), ("CA", "BE-6"),
                        ("AA", "BE-7"), ("CR", "BE-8"), ("CR", "BE-9")], segments
        assert [s[0] for s in segments][:2] == ["FHS", "BHS"] and segments[1][11] == "B-E"
        assert segments[-2] == ["BTS", str(len(acks))] and segments[-1] == ["FTS", "1"]
        errs = [s[2] for s in segments if s[0] == "ERR"]
        assert errs == ["PID^1^3", "MSH^1^8", "MSH^1^15"]  # the AE, and the two commit rejects
        # Each ACK says which mode it answers: enhanced ones carry MSH-15/16 NE, the original one not.
        mshs = [s for s in segments if s[0] == "MSH"]
        assert len(mshs[0]) == 12 and all(m[14:16] == ["NE", "NE"] for m in mshs[1:])
        # Everything went well and every message says ER (or NE): an empty acknowledgement batch.
        client.send(_batch(_enhanced(adt(token, "A08", "BE-10", "MRN-B"), "ER", "ER"),
                           _enhanced(adt(token, "A08", "BE-11", "MRN-B"), "NE", "NE"), file=False, batch_id="B-F"))
        quiet = _segments(client.receive())
        assert [s[0] for s in quiet] == ["BHS", "BTS"] and quiet[0][11] == "B-F" and quiet[1] == ["BTS", "0"]
        # Sent again: answered the same way, nothing recorded twice.
        client.send(batch)
        assert [(s[1], s[2]) for s in _segments(client.receive()) if s[0] == "MSA"] == acks
    assert sorted(m.control_id for m in _messages(org.id, "error")) == ["BE-5", "BE-6", "BE-9"]
    recorded = sorted(m.control_id for m in _messages(org.id, "recorded"))
    assert recorded == ["BE-1", "BE-10", "BE-11", "BE-2", "BE-3", "BE-4", "BE-7"]
    assert len(_events(org.id)) == len(recorded)
