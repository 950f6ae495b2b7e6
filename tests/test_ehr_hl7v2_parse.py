"""The listener's HL7 v2 reader (``hl7v2.parse``) builds exactly what ``hl7.parse`` (python-hl7)
builds — the same container classes, separators, escape character and factory at every level —
for the messages the tests send, for other separators, empty and trailing fields, repetitions,
sub-components and escapes, and for random messages made of those characters."""

from __future__ import annotations

import random

import hl7
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carepost.ehr import hl7v2
from tests.ehr_messages import adt, siu

TOKEN = "m0123456789.abcdefghijklmnopqrstuvwxyz0"


def _same(a, b, path="message") -> None:
    assert type(a) is type(b), path
    if isinstance(a, str):
        assert a == b, path
        return
    assert (a.separator, a.esc, a.separators, a.factory) == (b.separator, b.esc, b.separators, b.factory), path
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        _same(x, y, f"{path}[{i}]")


MESSAGES = [
    adt(TOKEN, "A04", "C-1", "MRN-1"),
    adt(TOKEN, "A01", "C-2", "MRN-2", patient_class="O"),
    siu(TOKEN, "S12", "C-3", "MRN-3"),
    siu(TOKEN, "S15", "C-4", "MRN-4"),
    # repetitions, sub-components, escapes, empty and trailing fields
    "MSH|^~\\&|APP|FAC|CAREPOST|CAREPOST|20250101120000||ADT^A04^ADT_A01|X1|P|2.5.1|||AL|NE||UNICODE UTF-8\r"
    "EVN|A04|20250101120000\r"
    "PID|1||MRN-9^^^H&1.2.3&ISO^MR~123-45-6789^^^SSA^SS||Doe^Jane^Q\\T\\R^^Dr.||19700101|F|||1 Main St^^Town^ST^00000"
    "~^^^^^^M||\r"
    "PV1|1|O|||||||||||||||||||||||||||||||||||||||||||20250101120000|\r",
    # other separators (v2.7 truncation character too)
    "MSH#*@$%!#APP#FAC#R#R#20250101##ADT*A08#X2#P#2.7\rPID#1##A*B*C%D@E*F##N1*N2\rPV1#1#I",
    # a segment without fields and one that ends with a separator
    "MSH|^~\\&|A|B|C|D|20250101||SIU^S12|X3|T|2.5.1\rSCH|\rZZZ\rPID|||M^^^^MR|",
]


@pytest.mark.parametrize("text", MESSAGES)
def test_the_reader_builds_what_python_hl7_builds(text):
    text = text.replace("\n", "\r").strip("\r")
    _same(hl7v2.parse(text), hl7.parse(text))
    assert str(hl7v2.parse(text)) == str(hl7.parse(text))


def test_random_messages_are_read_as_python_hl7_reads_them():
    rng = random.Random(15)
    alphabet = "AB1 .|^~\\&|||^^~&"
    for _ in range(400):
        segments = ["MSH|^~\\&|" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))]
        for _ in range(rng.randint(0, 4)):
            segments.append(rng.choice(["PID", "PV1", "ZZZ", "SCH"]) + rng.choice(["", "|"]) +
                            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))))
        text = "\r".join(segments)
        _same(hl7v2.parse(text), hl7.parse(text), text)


def _outcome(parser, text):
    try:
        return parser(text)
    except Exception as exc:  # noqa: BLE001 - compared with what python-hl7 raises
        return type(exc)


@pytest.mark.parametrize("text", ["MSH|^&|A|B\rPID|1||X&Y^Z", "MSH|^~|A|B\rPID|1||X&Y^Z", "PID|1||X"])
def test_separators_python_hl7_completes_go_to_python_hl7(text):
    # fewer than four encoding characters: python-hl7 fills in defaults (in the first one a
    # separator repeats, which it refuses); not an MSH: refused as python-hl7 refuses it
    ours, theirs = _outcome(hl7v2.parse, text), _outcome(hl7.parse, text)
    if isinstance(theirs, type):
        assert ours is theirs
    else:
        _same(ours, theirs)


def test_read_message_uses_the_reader():
    msg = hl7v2.read_message(siu(TOKEN, "S12", "C-5", "MRN-5").encode())
    _same(msg.parsed, hl7.parse(msg.text))
    assert msg.control_id == "C-5" and msg.trigger == "S12"


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab|^~&\\", max_size=16))
def test_an_empty_element_is_what_writes_out_as_nothing(value):
    """``hl7v2._empty`` (what the field readers test before reading a field) is
    ``str(element) == ""`` for every field and repetition, without writing the element out."""
    segment = hl7v2.parse("MSH|^~\\&|A\rPID|" + value).segment("PID")
    for element in list(segment)[1:]:
        assert hl7v2._empty(element) == (str(element) == "")
        for part in ([] if isinstance(element, str) else element):
            assert hl7v2._empty(part) == (str(part) == "")
