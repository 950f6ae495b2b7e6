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
@given(st.text(max_size=80), st.text(max_size=40), st.text(max_size=20))
def test_every_ack_parses_and_echoes_the_control_id(value, facility, text):
    """MSA-2 is MSH-10 as it was on the wire (``ack`` is given it as sent): the same characters,
    escape sequences kept, read back as the sender's value; cut at 199 characters, never inside an
    escape sequence."""
    problem = hl7v2.Hl7Problem("AE", hl7v2.REQUIRED_FIELD, text or "x", segment="PID", field_no=3)
    wire = hl7v2.escape(value)  # how a sender writes the value in MSH-10
    answer = hl7v2.ack(code="AE", control_id=wire, sending_facility=facility, trigger="A01", problem=problem)
    parsed = hl7.parse(answer)
    msa = parsed.segment("MSA")
    assert str(msa[1]) == "AE"
    echoed = str(msa[2])
    if len(wire) <= 199:
        assert echoed == wire
    else:
        assert wire.startswith(echoed) and len(echoed) > 190
    assert value.replace("\r", " ").replace("\n", " ").startswith(hl7v2.unescape_text(echoed))
    assert str(parsed.segment("ERR")[2]) == "PID^1^3"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="|$%/*\r\n"), max_size=60))
def test_a_control_id_in_other_encoding_characters_is_echoed_in_the_acks(value):
    """From a sender whose encoding characters are ``$%/*``, MSA-2 is written with the ACK's
    ``^~\\&``: the same value (its ``^~\\&`` escaped), the sender's escape sequences kept."""
    assert hl7v2.unescape_text(hl7v2.echo(value, "|$%/*")) == value
    assert hl7v2.echo(value + "/T/1$2", "|$%/*") == hl7v2.escape(value) + "\\T\\1^2"
    assert hl7v2.echo(value) == value.replace("|", "\\F\\")  # the ACK's own encoding: unchanged


def test_resends_stamped_anew_are_the_same_message():
    one = adt("m1.secret", "A01", "C1", "MRN-1")
    two = one.replace(one.split("|")[6], "20000101000000", 1).replace("m1.secret", "m1.other", 1)
    assert one != two and hl7v2.read_message(one).content_hash == hl7v2.read_message(two).content_hash
    changed = one.replace("MRN-1", "MRN-2")
    assert hl7v2.read_message(changed).content_hash != hl7v2.read_message(one).content_hash


def test_the_kept_message_has_no_credential():
    text = hl7v2.without_credential(adt("m1.secret", "A01", "C1", "MRN-1"))
    assert "m1.secret" not in text and text.split("|")[7] == "" and "MRN-1" in text


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(set(hl7v2.CHARSETS) - {"ISO IR14", "ISO IR87", "ISO IR159"})),
       st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="|^~\\&"), max_size=30))
def test_msh_18_decodes_whatever_the_declared_set_encodes(charset, name):
    codec = hl7v2.CHARSETS[charset]
    first, _, rest = adt("m1.secret", "A08", "C1", "MRN-1").partition("\r")
    text = first + "|" * 6 + charset + "\r" + rest.replace("Testpatient", name)
    try:
        data = text.encode(codec)
    except UnicodeEncodeError:
        return  # a name the set cannot hold is not sent in it
    msg = hl7v2.read_message(data)
    assert msg.charset == charset and name in msg.text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=4), st.booleans())
def test_batches_split_into_their_messages_and_are_answered_per_message(sizes, with_file):
    batches, expected = [], []  # several BHS … BTS in a row, with or without FHS/FTS around them
    for b, size in enumerate(sizes):
        messages = [adt("m1.secret", "A08", f"C{b}-{i}", "MRN-1") for i in range(size)]
        expected.extend(m.encode() for m in messages)
        batches.append("\r".join([f"BHS|^~\\&|APP|FAC|||20261204||||B{b}", *[m.rstrip("\r") for m in messages],
                                  f"BTS|{size}"]))
    frame = "\r".join((["FHS|^~\\&|APP|FAC|||20261204||||F1"] if with_file else []) + batches
                      + ([f"FTS|{len(sizes)}"] if with_file else [])) + "\r"
    parsed = hl7v2.read_batch(frame.encode())
    assert parsed.problem is None and parsed.messages == expected
    acks = [hl7v2.ack(code="AA", control_id=hl7v2.read_message(m).control_id).encode() for m in parsed.messages]
    answer = hl7v2.batch_ack(parsed, acks).decode().rstrip("\r").split("\r")
    assert [s[:3] for s in answer].count("MSA") == len(expected)
    assert [s for s in answer if s.startswith("BTS")] == [f"BTS|{n}" for n in sizes]
    assert (answer[0].startswith("FHS") and answer[-1] == f"FTS|{len(sizes)}") == with_file
    # a count that does not match refuses the whole frame
    if with_file:
        broken = hl7v2.read_batch(frame.replace(f"FTS|{len(sizes)}", f"FTS|{len(sizes) + 1}").encode())
        assert broken.problem is not None and broken.problem.field == "FTS-1" and broken.messages == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_batch_bytes_give_messages_or_a_named_problem(data):
    parsed = hl7v2.read_batch(b"BHS|^~\\&|" + data)
    if parsed.problem is not None:
        assert parsed.problem.ack_code == "AR" and parsed.problem.text and parsed.messages == []
        assert hl7.parse(hl7v2.batch_ack(parsed, []).decode("utf-8", "replace")).segment("MSA")[1][0] == "AR"
    else:
        assert all(m.startswith(b"MSH") for m in parsed.messages)


def test_iso_2022_japanese_code_switching():
    first, _, rest = adt("m1.secret", "A08", "C1", "MRN-1").partition("\r")
    text = first + "|" * 6 + "~ISO IR87" + "\r" + rest.replace("Testpatient^Ann", "山田^太郎")
    msg = hl7v2.read_message(text.encode("iso2022_jp"))
    assert "山田^太郎" in msg.text and msg.charset == "~ISO IR87"
    assert hl7v2.ack(code="AA", control_id="C1", charset=msg.charset).split("\r")[0].endswith("|~ISO IR87")
    try:
        hl7v2.read_message((first + "|" * 6 + "8859/1~ISO IR87\r" + rest).encode())
    except hl7v2.Hl7Problem as problem:
        assert problem.field == "MSH-18" and problem.ack_code == "AR"
    else:
        raise AssertionError("code switching from 8859/1 is not read")


@settings(max_examples=300, deadline=None)
@given(SEGMENT_TEXT)
def test_escaped_values_read_back_as_written(value):
    """escape then unescape_text gives the value back (CR/LF become spaces in a field); the
    sequences CarePost does not render are dropped, an unclosed escape is kept, nothing raises."""
    expected = value.replace("\r", " ").replace("\n", " ")
    assert hl7v2.unescape_text(hl7v2.escape(value)) == expected
    assert hl7v2.unescape_text("a\\X41C3A9\\b\\H\\c\\N\\d\\.br\\e\\Zx\\f\\XZZ\\g\\") == "aAébcd efg\\"
    assert hl7v2.unescape_text("1/F/2/T/3/E/", "/", "\r|%$*") == "1|2*3/"
