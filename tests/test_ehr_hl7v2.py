"""The HL7 v2 reader and ACK writer on their own (no database): any bytes give a message or an
:class:`Hl7Problem` naming a field — never another exception; every ACK parses as HL7 and
echoes the control id; answers never quote the message."""

from __future__ import annotations

import hl7
from hypothesis import given, settings
from hypothesis import strategies as st

from carepost.ehr import hl7v2
from tests.ehr_messages import adt, siu

SEGMENT_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_give_a_message_or_a_named_problem(data):
    try:
        msg = hl7v2.read_message(data)
    except hl7v2.Hl7Problem as problem:
        assert problem.ack_code in ("AA", "AE", "AR") and problem.error[0].isdigit() and problem.text
        return
    assert msg.text.startswith("MSH")


@settings(max_examples=200, deadline=None)
@given(st.lists(SEGMENT_TEXT, min_size=1, max_size=8), st.sampled_from(["A01", "A03", "A04", "A08", "S12", "S15"]))
def test_mangled_messages_are_mapped_or_refused_naming_a_field(extra, trigger):
    base = (adt if trigger.startswith("A") else siu)("m1.secret", trigger, "C1", "MRN-1").rstrip("\r").split("\r")
    segments = base[:1] + [s.replace("\r", "") for s in extra] + base[1:]
    try:
        msg = hl7v2.read_message("\r".join(segments))
        hl7v2.check_header(msg)
        hl7v2.check_structure(msg)
        mapped = hl7v2.map_event(msg)
    except hl7v2.Hl7Problem as problem:
        assert problem.text and "MRN-1" not in problem.text
        return
    assert mapped.name == hl7v2.EVENTS[(msg.message_type, msg.trigger)] and mapped.mrns[0][0] == "MRN-1"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=20))
def test_every_ack_parses_and_echoes_the_control_id(control_id, facility, text):
    problem = hl7v2.Hl7Problem("AE", hl7v2.REQUIRED_FIELD, text or "x", segment="PID", field_no=3)
    answer = hl7v2.ack(code="AE", control_id=control_id, sending_facility=facility, trigger="A01", problem=problem)
    parsed = hl7.parse(answer)
    msa = parsed.segment("MSA")
    assert str(msa[1]) == "AE"
    assert hl7v2.unescape(str(msa[2])) == control_id.replace("\r", " ").replace("\n", " ")[:199]
    assert str(parsed.segment("ERR")[2]) == "PID^1^3"


def test_resends_stamped_anew_are_the_same_message():
    one = adt("m1.secret", "A01", "C1", "MRN-1")
    two = one.replace(one.split("|")[6], "20000101000000", 1).replace("m1.secret", "m1.other", 1)
    assert one != two and hl7v2.read_message(one).content_hash == hl7v2.read_message(two).content_hash
    changed = one.replace("MRN-1", "MRN-2")
    assert hl7v2.read_message(changed).content_hash != hl7v2.read_message(one).content_hash


def test_the_kept_message_has_no_credential():
    text = hl7v2.without_credential(adt("m1.secret", "A01", "C1", "MRN-1"))
    assert "m1.secret" not in text and text.split("|")[7] == "" and "MRN-1" in text
