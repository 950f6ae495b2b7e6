"""HL7 v2 ADT and SIU messages: checked, read with the ``hl7`` library (python-hl7), mapped to
contact events, and answered with an ACK.

Nothing here touches the database: :func:`read_message` turns the text of one MLLP frame into a
:class:`Hl7Message` or raises :class:`Hl7Problem` naming the problem (an HL7 table 0357 error
code, the segment and field, and a sentence that never holds a value from the message — no PHI
in an answer or a log). :func:`map_event` turns a message into the event name, the patient's
identifiers (PID-3) and the event's properties. :func:`ack` builds the answer.

The frame's bytes are decoded as MSH-18 declares (:func:`decode_message`; HL7 table 0211), and
a batch frame (FHS/BHS … BTS/FTS) is split into its messages by :func:`read_batch` and answered
by :func:`batch_ack`.

The message structures are HL7 v2.5.1's (ADT_A01 for A01/A04/A08/A13, ADT_A02, ADT_A03,
ADT_A09 for A11, ADT_A39 for A40 with one PID/MRG pair, SIU_S12 for S12-S22 and S26), checked as
far as CarePost reads them: MSH first and once; for ADT, EVN then PID then PV1 (A40: EVN, PID,
MRG, PV1 optional); for SIU, SCH before PID, and the resource segments
(RGS, AIS, AIG, AIL, AIP) after SCH. SIU S23/S24 (blocked and opened time slots) name no
patient and are not taken.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo

import hl7

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"

# Trigger events -> event names (issue 15 item 3; docs/ehr.md).
EVENTS = {
    ("ADT", "A01"): "patient.admitted",
    ("ADT", "A02"): "patient.transferred",
    ("ADT", "A03"): "patient.discharged",
    ("ADT", "A04"): "patient.registered",
    ("ADT", "A08"): "patient.updated",
    ("ADT", "A11"): "patient.admission_cancelled",
    ("ADT", "A13"): "patient.discharge_cancelled",
    ("ADT", "A40"): "patient.merged",
    ("SIU", "S12"): "appointment.booked",
    ("SIU", "S13"): "appointment.rescheduled",
    ("SIU", "S14"): "appointment.modified",
    ("SIU", "S15"): "appointment.cancelled",
    ("SIU", "S16"): "appointment.discontinued",
    ("SIU", "S17"): "appointment.deleted",
    ("SIU", "S18"): "appointment.resource_added",
    ("SIU", "S19"): "appointment.resource_modified",
    ("SIU", "S20"): "appointment.resource_cancelled",
    ("SIU", "S21"): "appointment.resource_discontinued",
    ("SIU", "S22"): "appointment.resource_deleted",
    ("SIU", "S26"): "appointment.noshow",
}
SUPPORTED_TYPES = {"ADT", "SIU"}
PROCESSING_IDS = {"P", "T", "D"}
SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
SIU_RESOURCE_SEGMENTS = {"RGS", "AIS", "AIG", "AIL", "AIP"}

# HL7 table 0357 (message error condition codes).
SEGMENT_SEQUENCE = ("100", "Segment sequence error")
REQUIRED_FIELD = ("101", "Required field missing")
DATA_TYPE = ("102", "Data type error")
TABLE_VALUE = ("103", "Table value not found")
UNSUPPORTED_TYPE = ("200", "Unsupported message type")
UNSUPPORTED_EVENT = ("201", "Unsupported event code")
UNSUPPORTED_PROCESSING = ("202", "Unsupported processing id")
UNSUPPORTED_VERSION = ("203", "Unsupported version id")
UNKNOWN_KEY = ("204", "Unknown key identifier")
DUPLICATE_KEY = ("205", "Duplicate key identifier")
INTERNAL = ("207", "Application internal error")


class Hl7Problem(Exception):
    """Why a message was not accepted: ``ack_code`` AR (rejected: resending it unchanged will not
    help, or the sender is not known) or AE (an error in its content); ``location`` is
    ``SEG^seq^field`` for ERR-2; ``text`` says what is wrong without quoting the message."""

    def __init__(self, ack_code: str, error: tuple[str, str], text: str, *, segment: str = "", field_no: int = 0,
                 reason_code: str = "invalid"):
        super().__init__(text)
        self.ack_code = ack_code
        self.error = error
        self.text = text
        self.segment = segment
        self.field_no = field_no
        self.reason_code = reason_code

    @property
    def field(self) -> str | None:
        if not self.segment:
            return None
        return f"{self.segment}-{self.field_no}" if self.field_no else self.segment


@dataclass
class Hl7Message:
    """One parsed message and the MSH fields CarePost reads."""

    text: str
    parsed: hl7.Message
    segment_ids: list[str]
    sending_application: str
    sending_facility: str
    security: str
    message_type: str
    trigger: str
    control_id: str
    processing_id: str
    version: str
    sent_at: str
    content_hash: str = ""
    charset: str = ""  # MSH-18 as received ("" when not declared)
    accept_ack: str = ""  # MSH-15 (accept acknowledgment type); with MSH-16, "" in both: original mode
    application_ack: str = ""  # MSH-16 (application acknowledgment type)
    encoding: str = ""  # MSH-1 and MSH-2 as received (the field separator, then the encoding characters)

    @property
    def type_label(self) -> str:
        return f"{self.message_type}^{self.trigger}" if self.trigger else self.message_type


@dataclass
class MappedEvent:
    name: str
    mrns: list[tuple[str, str | None, str | None]]  # (value, assigning authority, identifier type)
    occurred_at: datetime | None
    properties: dict = field(default_factory=dict)
    resource_key: str | None = None  # the appointment this message is about (hash of SCH-2 or SCH-1)
    prior_mrns: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # A40: MRG-1
    state_hash: str | None = None


# --------------------------------------------------------------------------- framing


def frame(message: str | bytes) -> bytes:
    data = message.encode() if isinstance(message, str) else message
    return START_BLOCK + data + END_BLOCK


def decode(data: bytes) -> str:
    """Text without a declared character set: UTF-8 (what most senders use), else Latin-1
    (ASCII and 8859/1, HL7's default character sets, always decode)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# HL7 table 0211 (alternate character sets, MSH-18) -> Python codec. UTF-16/32 and UCS-2
# ("UNICODE") cannot be framed byte-wise with MLLP's delimiters and CNS 11643 has no codec: refused.
CHARSETS = {
    "ASCII": "ascii", "ISO IR6": "ascii",
    **{f"8859/{n}": f"iso8859-{n}" for n in range(1, 10)}, "8859/15": "iso8859-15",
    "ISO IR14": "iso2022_jp", "ISO IR87": "iso2022_jp", "ISO IR159": "iso2022_jp_2",
    "UNICODE UTF-8": "utf-8", "GB 18030-2000": "gb18030", "KS X 1001": "euc_kr", "BIG-5": "big5",
}
# Code switching (MSH-18 repeated): the ISO 2022 Japanese sets switched by escape sequences.
_ISO2022_JP = {"ISO IR14", "ISO IR87", "ISO IR159"}


def _msh_field(data: bytes, number: int) -> tuple[str, str]:
    """(MSH-n as text, the repetition separator) read from the raw bytes of the first segment."""
    first = data[:4096].split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1")
    if not first.startswith("MSH") or len(first) < 8:
        return "", "~"
    fields = first.split(first[3])
    return (fields[number - 1] if len(fields) >= number else ""), first[5]


def charset_codec(declared: str, repetition: str = "~") -> str | None:
    """The codec for MSH-18 (None: not declared), or :class:`Hl7Problem` naming MSH-18."""
    reps = [r.strip() for r in declared.split(repetition)] if declared else []
    if not any(reps):
        return None
    unknown = [r for r in reps if r and r not in CHARSETS]
    if unknown:
        raise Hl7Problem("AR", TABLE_VALUE, "MSH-18 (character set) is not one CarePost reads: ASCII, 8859/1-9, "
                         "8859/15, UNICODE UTF-8, GB 18030-2000, KS X 1001, BIG-5, ISO IR6/IR14/IR87/IR159.",
                         segment="MSH", field_no=18, reason_code="character_set")
    first, others = reps[0], [r for r in reps[1:] if r]
    if not others:
        return CHARSETS[first or "ASCII"]
    if first in ("", "ASCII", "ISO IR6") and set(others) <= _ISO2022_JP:
        return "iso2022_jp_2"
    raise Hl7Problem("AR", TABLE_VALUE, "MSH-18: a second character set (code switching) is read only for the "
                     "ISO 2022 Japanese sets (ISO IR14, ISO IR87, ISO IR159).", segment="MSH", field_no=18,
                     reason_code="character_set")


def decode_message(data: bytes) -> tuple[str, str]:
    """The text of one message decoded as its MSH-18 declares (undeclared: :func:`decode`), and
    MSH-18 as received (echoed in the ACK)."""
    declared, repetition = _msh_field(data, 18)
    codec = charset_codec(declared, repetition)
    if codec is None:
        return decode(data), ""
    try:
        return data.decode(codec), declared.strip()
    except UnicodeDecodeError:
        raise Hl7Problem("AR", DATA_TYPE, "The message's bytes are not valid in the character set MSH-18 declares.",
                         segment="MSH", field_no=18, reason_code="character_set") from None


def _readable(declared: str) -> bool:
    try:
        return charset_codec(declared) is not None
    except Hl7Problem:
        return False


def ack_codec(declared: str) -> str:
    """The codec an ACK is sent in: the message's own character set, else UTF-8."""
    try:
        return charset_codec(declared) or "utf-8"
    except Hl7Problem:
        return "utf-8"


# --------------------------------------------------------------------------- reading


def _field(segment, number: int):
    """Field ``number`` of a segment (MSH counts the field separator as MSH-1, as the library does)."""
    try:
        return segment[number] if number < len(segment) else None
    except (IndexError, TypeError):
        return None


_DEFAULT_SEPARATORS = "\r|~^&"


def unescape_text(value: str, esc: str = "\\", separators: str = _DEFAULT_SEPARATORS) -> str:
    """A value as the sender meant it (HL7 v2 chapter 2, escape sequences), for the message's own
    separators and escape character: ``\\F\\`` field, ``\\S\\`` component, ``\\T\\`` subcomponent,
    ``\\R\\`` repetition separator, ``\\E\\`` the escape character, ``\\Xhh…\\`` bytes in hex
    (UTF-8, else Latin-1), ``\\.br\\`` a line break (a space here); highlighting (``\\H\\``,
    ``\\N\\``), other formatting and code-switching sequences are dropped. An escape character
    without its closing one is kept as it is. Unlike python-hl7's ``unescape`` nothing is logged
    (it logs the value of a sequence it cannot read: PHI)."""
    if not esc or esc not in value:
        return value
    out: list[str] = []
    at = 0
    while True:
        start = value.find(esc, at)
        end = value.find(esc, start + 1) if start != -1 else -1
        if start == -1 or end == -1:
            out.append(value[at:])
            return "".join(out)
        out.append(value[at:start])
        body = value[start + 1:end]
        at = end + 1
        simple = {"F": separators[1], "R": separators[2], "S": separators[3], "T": separators[4], "E": esc}
        if body in simple:
            out.append(simple[body])
        elif body == ".br":
            out.append(" ")
        elif body[:1] == "X" and len(body) % 2 == 1 and len(body) > 1:
            try:
                raw = bytes.fromhex(body[1:])
            except ValueError:
                continue
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(raw.decode("latin-1"))
        # anything else (\\H\\, \\N\\, \\.sp\\, \\Cxxyy\\, \\Zxxx\\ ...) is dropped


def _empty(value) -> bool:
    """``str(value) == ""`` without writing the element out (python-hl7's ``__str__`` joins every
    level: 5% of the listener's store thread when every field read was written out first): a
    container is empty when it holds nothing, or one element that is empty — two or more always
    write a separator."""
    while not isinstance(value, str):
        if len(value) > 1:
            return False
        if not value:
            return True
        value = value[0]
    return value == ""


def _repetitions(value, *, first_subcomponent: bool = False) -> list:
    """A field's repetitions as lists of components (strings, escape sequences resolved with the
    message's own separators). A component with subcomponents is its subcomponents joined by
    ``&`` — or, with ``first_subcomponent``, the first alone (an HD's namespace id, a location's
    point of care), so an escaped ``&`` (``\\T\\``) inside it stays part of it."""
    if value is None or _empty(value):
        return []
    esc = getattr(value, "esc", None) or "\\"
    seps = getattr(value, "separators", None) or _DEFAULT_SEPARATORS
    if len(seps) != 5:
        seps = _DEFAULT_SEPARATORS
    reps = value if isinstance(value, hl7.Field) and value and isinstance(value[0], hl7.Repetition) else [value]
    out = []
    for rep in reps:
        if isinstance(rep, str):
            out.append([unescape_text(rep, esc, seps)])
            continue
        comps = []
        for comp in rep:
            if isinstance(comp, list):
                subs = [unescape_text(str(sub), esc, seps) for sub in comp] or [""]
                comps.append(subs[0] if first_subcomponent else "&".join(subs))
            else:
                comps.append(unescape_text(str(comp), esc, seps))
        out.append(comps)
    return out


def _first(value, index: int = 0) -> str:
    reps = _repetitions(value)
    if not reps or index >= len(reps[0]):
        return ""
    return reps[0][index]


def encoding_of(header_line: str) -> str:
    """MSH-1 and MSH-2 of a header segment (MSH, BHS, FHS) when they are valid, else '' (read as
    ``|^~\\&``): how the sender wrote the fields an ACK echoes (:func:`echo`)."""
    try:
        separator, characters = check_encoding("MSH" + header_line[3:])
    except Hl7Problem:
        return ""
    return separator + characters


def check_encoding(text: str) -> tuple[str, str]:
    """MSH must come first, with a field separator and four (or, from v2.7, five) encoding
    characters that are distinct, not letters or digits, not spaces and not the separator."""
    if not text.startswith("MSH"):
        raise Hl7Problem("AR", SEGMENT_SEQUENCE, "The message does not start with an MSH segment.", segment="MSH",
                         reason_code="missing_msh")
    if len(text) < 8:
        raise Hl7Problem("AR", REQUIRED_FIELD, "MSH is too short to hold its separators.", segment="MSH", field_no=2,
                         reason_code="bad_encoding_characters")
    sep = text[3]
    end = text.find(sep, 4)
    chars = text[4:end] if end != -1 else text[4:]
    bad = (not sep or sep.isalnum() or sep.isspace() or sep == "\r" or len(chars) not in (4, 5)
           or len(set(chars)) != len(chars) or sep in chars
           or any(c.isalnum() or c.isspace() for c in chars))
    if bad:
        raise Hl7Problem("AR", DATA_TYPE, "MSH-1/MSH-2: the field separator and encoding characters are not valid "
                         "(four distinct characters such as ^~\\& after the separator |).", segment="MSH", field_no=2,
                         reason_code="bad_encoding_characters")
    return sep, chars


def fingerprint(text: str) -> str:
    """SHA-256 of a message without MSH-7 (when it was sent) and MSH-8 (the credential): a
    sender's resend of the same message, stamped anew, is the same message."""
    first, sep, rest = text.partition("\r")
    fields = first.split(first[3])
    for index in (6, 7):  # fields[1] is MSH-2, so MSH-7 and MSH-8 are at 6 and 7
        if len(fields) > index:
            fields[index] = ""
    return hashlib.sha256((first[3].join(fields) + sep + rest).encode("utf-8", "surrogatepass")).hexdigest()


def without_credential(text: str) -> str:
    """The message with MSH-8 (the connection's credential) emptied: what the error queue keeps."""
    first, sep, rest = text.partition("\r")
    if not first.startswith("MSH") or len(first) < 4:
        return text
    fields = first.split(first[3])
    if len(fields) > 7:
        fields[7] = ""
    return first[3].join(fields) + sep + rest


_CONTAINERS = (hl7.Message, hl7.Segment, hl7.Field, hl7.Repetition, hl7.Component)
_HEADER_SEGMENTS = ("MSH", "BHS", "FHS")


def parse(text: str) -> hl7.Message:
    """What ``hl7.parse(text)`` returns — the same container classes, separators, escape
    character and factory, element for element — built directly: python-hl7 makes a parse plan
    object per element and runs each container's constructor chain and assertions, which was
    about 40% of a message's CPU in the listener's groups. Separators that are not five distinct
    characters (never after :func:`check_encoding`) go to ``hl7.parse`` itself.
    tests/test_ehr_hl7v2_parse.py compares the two."""
    strmsg = text.strip()
    plan = hl7.parser.create_parse_plan(strmsg)
    seps, esc, factory = plan.separators, plan.esc, plan.factory
    if len(set(seps)) != 5 or factory is not hl7.Factory:
        return hl7.parse(text)
    new, fill = list.__new__, list.__init__

    def make(level: int, sequence: list):
        obj = new(_CONTAINERS[level])
        fill(obj, sequence)
        obj.separator, obj.esc, obj.separators, obj.factory = seps[level], esc, seps, hl7.Factory
        return obj

    def split(part: str, level: int):
        if level == 5:
            return part
        for sep in seps[level:]:
            if sep in part:
                break
        else:
            return make(level, [part])
        data = []
        if level == 1 and part[:3] in _HEADER_SEGMENTS:
            sep0 = part[3]
            end = part.find(sep0, 4)
            data = [make(2, [part[:3]]), make(2, [sep0]), make(2, [part[4:end]])]
            part = part[end + 1:]
        if part:
            data += [split(x, level + 1) for x in part.split(seps[level])]
        return make(level, data)

    return split(strmsg, 0)


def read_message(data: bytes | str) -> Hl7Message:
    """Check and parse one message (the bytes between the MLLP start and end blocks)."""
    charset = ""
    if isinstance(data, bytes):
        text, charset = decode_message(data)
    else:
        text = data
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    separator, encoding_characters = check_encoding(text)
    if not isinstance(data, bytes):
        declared = text.split("\r", 1)[0].split(text[3])
        charset = declared[17].strip() if len(declared) > 17 else ""
        charset_codec(charset, text[5])  # a queued message is checked as when it came
    content_hash = fingerprint(text)
    if "\x0b" in text or "\x1c" in text:
        raise Hl7Problem("AR", DATA_TYPE, "The message holds MLLP block characters.", segment="MSH",
                         reason_code="bad_framing")
    segments = [s for s in text.split("\r") if s]
    ids = [s[:3] for s in segments]
    for position, seg in enumerate(segments):
        if not SEGMENT_ID.match(seg[:3]) or (len(seg) > 3 and seg[3] != text[3]):
            raise Hl7Problem("AE", SEGMENT_SEQUENCE, f"Segment {position + 1} does not start with a segment id "
                             "(three capital letters or digits) followed by the field separator.",
                             segment=seg[:3] if SEGMENT_ID.match(seg[:3]) else "", reason_code="bad_segment")
    if ids.count("MSH") != 1:
        raise Hl7Problem("AE", SEGMENT_SEQUENCE, "A message holds exactly one MSH segment (a batch starts with FHS "
                         "or BHS).",
                         segment="MSH", reason_code="segment_order")
    try:
        parsed = parse("\r".join(segments))
    except Exception:  # noqa: BLE001 - the library raises several types on malformed input
        raise Hl7Problem("AR", DATA_TYPE, "The message could not be parsed as HL7 v2.", segment="MSH",
                         reason_code="unparseable") from None
    msh = parsed.segment("MSH")
    message_type = _first(_field(msh, 9), 0)
    trigger = _first(_field(msh, 9), 1)
    out = Hl7Message(
        text=text, parsed=parsed, segment_ids=ids,
        sending_application=_first(_field(msh, 3), 0), sending_facility=_first(_field(msh, 4), 0),
        security=str(_field(msh, 8) or ""), message_type=message_type, trigger=trigger,
        control_id=str(_field(msh, 10) or ""), processing_id=_first(_field(msh, 11), 0),
        version=_first(_field(msh, 12), 0), sent_at=str(_field(msh, 7) or ""), content_hash=content_hash,
        charset=charset, accept_ack=_first(_field(msh, 15), 0).strip(), application_ack=_first(_field(msh, 16), 0).strip(),
        encoding=separator + encoding_characters,
    )
    return out


def check_header(msg: Hl7Message) -> None:
    """MSH fields every message needs (after the sender is known: their absence is an error in
    the message, kept in the error queue)."""
    if not msg.message_type:
        raise Hl7Problem("AR", REQUIRED_FIELD, "MSH-9 (message type) is required.", segment="MSH", field_no=9,
                         reason_code="required_field")
    if not msg.control_id:
        raise Hl7Problem("AR", REQUIRED_FIELD, "MSH-10 (message control id) is required.", segment="MSH", field_no=10,
                         reason_code="required_field")
    if len(msg.control_id) > 199:
        raise Hl7Problem("AR", DATA_TYPE, "MSH-10 (message control id) is at most 199 characters.", segment="MSH",
                         field_no=10, reason_code="bad_field")
    if msg.processing_id not in PROCESSING_IDS:
        raise Hl7Problem("AR", UNSUPPORTED_PROCESSING, "MSH-11 (processing id) is P, T or D.", segment="MSH",
                         field_no=11, reason_code="processing_id")
    check_ack_types(msg.accept_ack, msg.application_ack)
    if not msg.version.startswith("2."):
        raise Hl7Problem("AR", UNSUPPORTED_VERSION, "MSH-12 (version id) is an HL7 v2 version such as 2.5.1.",
                         segment="MSH", field_no=12, reason_code="version")
    if msg.message_type not in SUPPORTED_TYPES:
        raise Hl7Problem("AR", UNSUPPORTED_TYPE, "MSH-9: only ADT and SIU messages are accepted.", segment="MSH",
                         field_no=9, reason_code="unsupported_type")
    if (msg.message_type, msg.trigger) not in EVENTS:
        accepted = ", ".join(trigger for kind, trigger in EVENTS if kind == msg.message_type)
        raise Hl7Problem("AR", UNSUPPORTED_EVENT, f"MSH-9: the trigger event of an {msg.message_type} message is one of "
                         f"{accepted}.", segment="MSH", field_no=9, reason_code="unsupported_trigger")


ACK_CONDITIONS = ("AL", "NE", "ER", "SU")  # HL7 table 0155


def check_ack_types(accept: str, application: str) -> None:
    """MSH-15 and MSH-16 are empty or one of HL7 table 0155 (AL, NE, ER, SU)."""
    for value, number, name in ((accept, 15, "accept"), (application, 16, "application")):
        if value and value not in ACK_CONDITIONS:
            raise Hl7Problem("AR", TABLE_VALUE, f"MSH-{number} ({name} acknowledgment type) is AL, NE, ER or SU "
                             "(HL7 table 0155), or empty.", segment="MSH", field_no=number, reason_code="ack_type")


def ack_wanted(condition: str, successful: bool) -> bool:
    """Whether an acknowledgement is sent under an MSH-15/16 condition (empty in enhanced mode:
    always)."""
    return condition in ("", "AL") or (condition == "ER" and not successful) or (condition == "SU" and successful)


def check_structure(msg: Hl7Message) -> None:
    """The segment order CarePost relies on (v2.5.1 message structures)."""
    ids = msg.segment_ids

    def first(seg: str) -> int:
        return ids.index(seg) if seg in ids else -1

    if msg.message_type == "ADT" and msg.trigger == "A40":
        evn, pid, mrg = first("EVN"), first("PID"), first("MRG")
        for seg, at in (("EVN", evn), ("PID", pid), ("MRG", mrg)):
            if at == -1:
                raise Hl7Problem("AE", SEGMENT_SEQUENCE, f"An ADT^A40 message needs the {seg} segment.",
                                 segment=seg, reason_code="missing_segment")
        if not (0 < evn < pid < mrg):
            raise Hl7Problem("AE", SEGMENT_SEQUENCE, "Segments of an ADT^A40 message come in the order MSH, EVN, PID, "
                             "MRG.", segment="PID" if pid < evn else "MRG", reason_code="segment_order")
        if ids.count("PID") > 1 or ids.count("MRG") > 1:
            raise Hl7Problem("AE", SEGMENT_SEQUENCE, "CarePost takes one merge per ADT^A40 message (one PID and one "
                             "MRG segment).", segment="PID", reason_code="segment_order")
    elif msg.message_type == "ADT":
        evn, pid, pv1 = first("EVN"), first("PID"), first("PV1")
        for seg, at in (("EVN", evn), ("PID", pid), ("PV1", pv1)):
            if at == -1:
                raise Hl7Problem("AE", SEGMENT_SEQUENCE, f"An ADT^{msg.trigger} message needs the {seg} segment.",
                                 segment=seg, reason_code="missing_segment")
        if not (0 < evn < pid < pv1):
            raise Hl7Problem("AE", SEGMENT_SEQUENCE, "Segments of an ADT message come in the order MSH, EVN, PID, PV1.",
                             segment="PID" if pid < evn else "PV1", reason_code="segment_order")
        if ids.count("PID") > 1:
            raise Hl7Problem("AE", SEGMENT_SEQUENCE, "An ADT message names one patient (one PID segment).",
                             segment="PID", reason_code="segment_order")
    else:
        sch, pid = first("SCH"), first("PID")
        for seg, at in (("SCH", sch), ("PID", pid)):
            if at == -1:
                raise Hl7Problem("AE", SEGMENT_SEQUENCE, f"An SIU^{msg.trigger} message needs the {seg} segment.",
                                 segment=seg, reason_code="missing_segment")
        if pid < sch:
            raise Hl7Problem("AE", SEGMENT_SEQUENCE, "In an SIU message the SCH segment comes before PID.",
                             segment="PID", reason_code="segment_order")
        if any(ids[i] in SIU_RESOURCE_SEGMENTS for i in range(sch)):
            raise Hl7Problem("AE", SEGMENT_SEQUENCE, "In an SIU message the resource segments (RGS, AIS, AIG, AIL, AIP) "
                             "come after SCH.", segment="SCH", reason_code="segment_order")
        if ids.count("PID") > 1:
            raise Hl7Problem("AE", SEGMENT_SEQUENCE, "CarePost takes one patient per SIU message (one PID segment).",
                             segment="PID", reason_code="segment_order")


# --------------------------------------------------------------------------- times

_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,4})?([+-]\d{4})?$")


def parse_dtm(value: str, default_zone: tzinfo = UTC, field_name: str = "", segment: str = "",
              field_no: int = 0) -> datetime | None:
    """An HL7 DTM/TS (``YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]``, component 1 of a TS) as an aware
    datetime; without an offset, in the connection's time zone. '' is None; a bad one an error."""
    value = (value or "").strip()
    if not value:
        return None
    match = _DTM.match(value)
    if not match:
        raise Hl7Problem("AE", DATA_TYPE, f"{field_name or segment} is not an HL7 date/time (YYYYMMDDHHMM[SS][+ZZZZ]).",
                         segment=segment, field_no=field_no, reason_code="bad_date")
    year, month, day, hour, minute, second, offset = match.groups()
    try:
        zone = default_zone
        if offset:
            sign = 1 if offset[0] == "+" else -1
            zone = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
        return datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0),
                        tzinfo=zone)
    except ValueError:
        raise Hl7Problem("AE", DATA_TYPE, f"{field_name or segment} is not a valid date/time.", segment=segment,
                         field_no=field_no, reason_code="bad_date") from None


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


# --------------------------------------------------------------------------- mapping


def _segment(msg: Hl7Message, seg_id: str):
    try:
        return msg.parsed.segment(seg_id)
    except KeyError:
        return None


def _segments(msg: Hl7Message, seg_id: str) -> list:
    try:
        return list(msg.parsed.segments(seg_id))
    except KeyError:
        return []


def patient_identifiers(msg: Hl7Message, segment: str = "PID", field_no: int = 3) -> list[tuple[str, str | None, str | None]]:
    """PID-3 (or MRG-1, the prior identifiers of a merge) repetitions as (id, assigning
    authority, identifier type code)."""
    pid = _segment(msg, segment)
    out = []
    for comps in _repetitions(_field(pid, field_no), first_subcomponent=True):
        value = (comps[0] if comps else "").strip()
        if not value:
            continue
        authority = comps[3].strip() if len(comps) > 3 and comps[3] else None
        type_code = comps[4].strip() if len(comps) > 4 and comps[4] else None
        out.append((value, authority or None, type_code or None))
    if not out and segment == "MRG":
        raise Hl7Problem("AE", REQUIRED_FIELD, "MRG-1 (prior patient identifier list) is required: it names the MRN "
                         "merged into the patient of PID-3.", segment="MRG", field_no=1, reason_code="required_field")
    if not out:
        raise Hl7Problem("AE", REQUIRED_FIELD, "PID-3 (patient identifier list) is required: CarePost matches "
                         "patients by MRN.", segment="PID", field_no=3, reason_code="required_field")
    return out


def _ids(value) -> list[str]:
    """The ID component (1) of each repetition of an XCN or CE field."""
    return [c[0].strip()[:64] for c in _repetitions(value) if c and c[0].strip()]


def _location(value) -> dict | None:
    reps = _repetitions(value, first_subcomponent=True)
    if not reps:
        return None
    comps = reps[0]
    names = ("point_of_care", "room", "bed", "facility")
    out = {n: comps[i][:64] for i, n in enumerate(names) if i < len(comps) and comps[i]}
    return out or None


def _code(value) -> tuple[str | None, str | None]:
    reps = _repetitions(value)
    if not reps:
        return None, None
    comps = reps[0]
    code = comps[0].strip()[:64] if comps and comps[0] else None
    text = comps[1].strip()[:120] if len(comps) > 1 and comps[1] else None
    return code or None, text or None


def _text(value) -> str:
    return str(value or "").strip()


def map_event(msg: Hl7Message, zone: tzinfo = UTC) -> MappedEvent:
    """The event, the patient's identifiers and the properties (ids, codes and times only)."""
    name = EVENTS[(msg.message_type, msg.trigger)]
    mrns = patient_identifiers(msg)
    prior_mrns = patient_identifiers(msg, "MRG", 1) if msg.trigger == "A40" else []
    props: dict = {"source": "hl7v2", "message_type": msg.type_label}
    evn = _segment(msg, "EVN")
    occurred = None
    if evn is not None:
        occurred = parse_dtm(_first(_field(evn, 6), 0), zone, "EVN-6", "EVN", 6) or parse_dtm(
            _first(_field(evn, 2), 0), zone, "EVN-2", "EVN", 2)
    if occurred is None:
        occurred = parse_dtm(_first(_field(_segment(msg, "MSH"), 7), 0), zone, "MSH-7", "MSH", 7)
    resource_key = state_hash = None
    if msg.message_type == "ADT":
        pv1 = _segment(msg, "PV1")
        patient_class = _first(_field(pv1, 2), 0)
        if patient_class:
            props["patient_class"] = patient_class[:8]
        location = _location(_field(pv1, 3))
        if location:
            props["location"] = location
        prior = _location(_field(pv1, 6)) if msg.trigger == "A02" else None
        if prior:
            props["prior_location"] = prior  # PV1-6: where a transferred patient was
        providers = _ids(_field(pv1, 7)) + _ids(_field(pv1, 8)) + _ids(_field(pv1, 17))
        if providers:
            props["provider_ids"] = list(dict.fromkeys(providers))[:20]
        service = _first(_field(pv1, 10), 0)
        if service:
            props["hospital_service"] = service[:16]
        admitted = parse_dtm(_first(_field(pv1, 44), 0), zone, "PV1-44", "PV1", 44)
        discharged = parse_dtm(_first(_field(pv1, 45), 0), zone, "PV1-45", "PV1", 45)
        if admitted:
            props["admitted_at"] = _iso(admitted)
        if discharged:
            props["discharged_at"] = _iso(discharged)
        if msg.trigger == "A03" and discharged:
            occurred = discharged
        elif msg.trigger == "A01" and admitted:
            occurred = admitted
    else:
        sch = _segment(msg, "SCH")
        placer, filler = _first(_field(sch, 1), 0), _first(_field(sch, 2), 0)
        if filler:
            props["appointment_id"] = filler[:64]
        if placer:
            props["placer_appointment_id"] = placer[:64]
        key = filler or placer
        if key:
            resource_key = "SCH/" + hashlib.sha256(key.encode()).hexdigest()[:40]
        start = end = None
        tq1 = _segment(msg, "TQ1")
        if tq1 is not None:
            start = parse_dtm(_first(_field(tq1, 7), 0), zone, "TQ1-7", "TQ1", 7)
            end = parse_dtm(_first(_field(tq1, 8), 0), zone, "TQ1-8", "TQ1", 8)
        if start is None:  # SCH-11 (TQ): component 4 is the start, 5 the end
            timing = _field(sch, 11)
            start = parse_dtm(_first(timing, 3), zone, "SCH-11.4", "SCH", 11)
            end = end or parse_dtm(_first(timing, 4), zone, "SCH-11.5", "SCH", 11)
        for ais in _segments(msg, "AIS"):
            if start is None:
                start = parse_dtm(_first(_field(ais, 4), 0), zone, "AIS-4", "AIS", 4)
        if start:
            props["start"] = _iso(start)
            state_hash = hashlib.sha256(props["start"].encode()).hexdigest()
        if end:
            props["end"] = _iso(end)
        duration = _text(_field(sch, 9))
        if duration.isdigit():
            props["duration"] = int(duration)
            units = _first(_field(sch, 10), 0)
            if units:
                props["duration_units"] = units[:10]
        atype, atype_text = _code(_field(sch, 8))
        if atype:
            props["appointment_type"] = atype
        if atype_text:
            props["appointment_type_text"] = atype_text
        reason, _ = _code(_field(sch, 7))
        if reason:
            props["reason_code"] = reason
        status, _ = _code(_field(sch, 25))
        if status:
            props["status"] = status[:20]
        services = [s for ais in _segments(msg, "AIS") for s in _ids(_field(ais, 3))]
        if services:
            props["service_codes"] = list(dict.fromkeys(services))[:20]
        locations = [loc for ail in _segments(msg, "AIL") for loc in [_location(_field(ail, 3))] if loc]
        if locations:
            props["location"] = locations[0]
            if len(locations) > 1:
                props["locations"] = locations[:10]
        providers = [p for aip in _segments(msg, "AIP") for p in _ids(_field(aip, 3))]
        if providers:
            props["provider_ids"] = list(dict.fromkeys(providers))[:20]
        if msg.trigger == "S12" and start is None:
            raise Hl7Problem("AE", REQUIRED_FIELD, "A new appointment (S12) needs its start: TQ1-7, SCH-11.4 or AIS-4.",
                             segment="SCH", field_no=11, reason_code="required_field")
    return MappedEvent(name=name, mrns=mrns, occurred_at=occurred, properties=props, resource_key=resource_key,
                       state_hash=state_hash, prior_mrns=prior_mrns)


# --------------------------------------------------------------------------- answers

_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\"), ("\r", " "), ("\n", " "))


def escape(value: str) -> str:
    for raw, escaped in _ESCAPES:
        value = value.replace(raw, escaped)
    return value


_UNESCAPES = {"F": "|", "S": "^", "R": "~", "T": "&", "E": "\\"}


def unescape(value: str) -> str:
    """The inverse of :func:`escape` for the standard delimiters (\\F\\, \\S\\, \\R\\, \\T\\, \\E\\)."""
    return re.sub(r"\\([FSRTE])\\", lambda m: _UNESCAPES[m.group(1)], value)


ACK_ENCODING = "|^~\\&"  # the ACK's own field separator and encoding characters


def echo(wire: str, encoding: str = "", limit: int = 199) -> str:
    """A field as the sender wrote it on the wire (MSH-10, echoed in MSA-2), written with the ACK's
    encoding characters: character for character the same when the sender used ``|^~\\&``
    (escape sequences included — they are not resolved and escaped again); with other encoding
    characters, the sender's separators and escape character become the ACK's and a character that
    is a delimiter only in the ACK is escaped, so the value reads the same. Carriage returns and
    line feeds become spaces. At most ``limit`` characters, never cut inside an escape sequence."""
    encoding = encoding if len(encoding) >= 5 else ACK_ENCODING
    theirs = {encoding[1]: "^", encoding[2]: "~", encoding[4]: "&"}
    esc = encoding[3]
    out: list[str] = []
    size = at = 0
    while at < len(wire):
        char = wire[at]
        token = None
        if char == esc:
            end = wire.find(esc, at + 1)
            body = wire[at + 1:end] if end != -1 else None
            if body is not None and not any(c in body for c in "|^~\\&\r\n" + encoding):
                token, at = "\\" + body + "\\", end + 1  # an escape sequence, kept as it is
            else:
                token, at = "\\", at + 1  # an escape character without its closing one, as sent
        else:
            at += 1
            if char in theirs:
                token = theirs[char]
            elif char in "\r\n":
                token = " "
            elif char in ACK_ENCODING:
                token = escape(char)  # a delimiter of the ACK, plain text for the sender
            else:
                token = char
        if size + len(token) > limit:
            break
        out.append(token)
        size += len(token)
    return "".join(out)


_ack_counter = [0]


def ack(*, code: str, control_id: str = "", sending_application: str = "", sending_facility: str = "",
        trigger: str = "", version: str = "2.5.1", problem: Hl7Problem | None = None,
        now: datetime | None = None, charset: str = "", accept_ack: str = "", application_ack: str = "",
        encoding: str = "") -> str:
    """An ACK: MSH (CarePost as the sender, the message's sender as the receiver), MSA echoing the
    control id, and for AE/AR (CE/CR) an ERR naming the code, the place and the problem.
    ``control_id`` is MSH-10 as it was on the wire and ``encoding`` the message's MSH-1 and MSH-2
    (empty: ``|^~\\&``): MSA-2 is MSH-10 as sent (:func:`echo`), so a sender matching its ACKs by
    control id finds it whatever escape sequences the id holds.
    ``accept_ack``/``application_ack`` are the message's MSH-15/16: when either is valued (enhanced
    mode) the ACK's own MSH-15 and MSH-16 are ``NE`` (CarePost expects no acknowledgement of it)."""
    now = now or datetime.now(UTC)
    _ack_counter[0] = (_ack_counter[0] + 1) % 1_000_000
    own_id = f"CP{now:%Y%m%d%H%M%S}{_ack_counter[0]:06d}"
    version = version if re.match(r"^2\.[0-9.]{1,6}$", version or "") else "2.5.1"
    enhanced = ["", "", "NE", "NE"] if accept_ack or application_ack else []
    tail = (enhanced or ["", "", "", ""]) + ["", charset] if charset and _readable(charset) else enhanced
    msh = "|".join([
        "MSH", "^~\\&", "CAREPOST", "CAREPOST", escape(sending_application[:180]), escape(sending_facility[:180]),
        now.strftime("%Y%m%d%H%M%S") + "+0000", "", f"ACK^{escape(trigger[:3])}^ACK" if trigger else "ACK",
        own_id, "P", version,
    ] + tail)
    text = escape(problem.text)[:200] if problem else ""
    segments = [msh, "|".join(["MSA", code, echo(control_id, encoding), text] if text else ["MSA", code, echo(control_id, encoding)])]
    if problem is not None:
        location = f"{problem.segment}^1^{problem.field_no}" if problem.segment and problem.field_no else problem.segment
        severity = "E"
        segments.append("|".join(["ERR", "", location, f"{problem.error[0]}^{problem.error[1]}^HL70357", severity,
                                  "", "", "", text]))
    return "\r".join(segments) + "\r"


# --------------------------------------------------------------------------- batches (FHS/BHS ... BTS/FTS)


@dataclass
class Batch:
    """One ``BHS … BTS`` batch of a frame (or the messages of a file without BHS)."""

    header: list[str]  # BHS fields split on the separator (BHS-n at index n-1), [] when the file has no BHS
    messages: list[bytes] = field(default_factory=list)


@dataclass
class BatchFile:
    """A frame holding the HL7 batch protocol: ``[FHS] {[BHS] {MSH…} [BTS]} [FTS]``.

    ``problem`` set: the envelope is malformed and none of its messages is processed (the whole
    frame is answered with one ACK AR naming the segment); ``header`` holds the FHS fields, or
    the first BHS's, for that answer."""

    file_header: list[str] | None
    batches: list[Batch]
    problem: Hl7Problem | None = None
    header: list[str] = field(default_factory=list)

    @property
    def messages(self) -> list[bytes]:
        return [] if self.problem else [m for b in self.batches for m in b.messages]


def is_batch(data: bytes) -> bool:
    return data[:3] in (b"FHS", b"BHS")


def _envelope_fields(line: bytes) -> list[str]:
    text = line.decode("latin-1")
    return text.split(text[3]) if len(text) > 3 else [text]


def _count(fields: list[str], what: str, segment: str, actual: int) -> None:
    value = fields[1].strip() if len(fields) > 1 else ""
    if value and (not value.isdigit() or int(value) != actual):
        raise Hl7Problem("AR", DATA_TYPE, f"{segment}-1 ({what} count) does not match the {what}s in the frame.",
                         segment=segment, field_no=1, reason_code="batch_count")


def read_batch(data: bytes) -> BatchFile:
    """Split a batch frame into its messages (bytes, each starting with MSH). Segments are split
    on carriage returns (and line feeds), which no character set CarePost reads uses inside a
    character. The envelope is checked: FHS first and FTS last together, each BHS closed by a BTS,
    nothing but BHS, MSH or a trailer where a message may start, and the counts of BTS-1 and
    FTS-1 when given."""
    lines = [seg for seg in data.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r") if seg]
    out = BatchFile(None, [])
    try:
        if not lines:
            raise Hl7Problem("AR", SEGMENT_SEQUENCE, "The batch is empty.", segment="BHS", reason_code="batch_structure")
        for seg in lines:
            if seg[:3] in (b"FHS", b"BHS"):
                sep = seg[3:4].decode("latin-1")
                if not sep or sep.isalnum() or sep.isspace():
                    raise Hl7Problem("AR", DATA_TYPE, f"{seg[:3].decode()}-1/2: the field separator and encoding "
                                     "characters are not valid.", segment=seg[:3].decode(), field_no=2,
                                     reason_code="bad_encoding_characters")
        i = 0
        if lines[0][:3] == b"FHS":
            out.file_header = _envelope_fields(lines[0])
            out.header = out.file_header
            i = 1
            if lines[-1][:3] != b"FTS":
                raise Hl7Problem("AR", SEGMENT_SEQUENCE, "A file that starts with FHS ends with FTS.", segment="FTS",
                                 reason_code="batch_structure")
            end = len(lines) - 1
        else:
            end = len(lines)
            if lines[-1][:3] == b"FTS":
                raise Hl7Problem("AR", SEGMENT_SEQUENCE, "FTS closes a file that starts with FHS.", segment="FTS",
                                 reason_code="batch_structure")
        current: Batch | None = None
        message: list[bytes] | None = None

        def close_message() -> None:
            nonlocal message
            if message is not None:
                current.messages.append(b"\r".join(message) + b"\r")
                message = None

        while i < end:
            seg, seg_id = lines[i], lines[i][:3]
            if seg_id == b"BHS":
                if current is not None:
                    raise Hl7Problem("AR", SEGMENT_SEQUENCE, "A BHS comes after the BTS of the batch before it.",
                                     segment="BHS", reason_code="batch_structure")
                current = Batch(_envelope_fields(seg))
                out.header = out.header or current.header
            elif seg_id == b"BTS":
                if current is None:
                    current = Batch([])  # messages of a file without BHS end here
                close_message()
                _count(_envelope_fields(seg), "message", "BTS", len(current.messages))
                out.batches.append(current)
                current = None
            elif seg_id == b"MSH":
                if current is None:
                    if out.batches and not out.file_header:
                        raise Hl7Problem("AR", SEGMENT_SEQUENCE, "A message after BTS belongs to a new BHS.",
                                         segment="MSH", reason_code="batch_structure")
                    current = Batch([])
                close_message()
                message = [seg]
            elif seg_id in (b"FHS", b"FTS"):
                raise Hl7Problem("AR", SEGMENT_SEQUENCE, f"{seg_id.decode()} comes only "
                                 + ("first." if seg_id == b"FHS" else "last."), segment=seg_id.decode(),
                                 reason_code="batch_structure")
            elif message is None:
                raise Hl7Problem("AR", SEGMENT_SEQUENCE, f"Segment {i + 1} of the batch is neither BHS, MSH nor "
                                 "BTS where a message starts.", segment="MSH", reason_code="batch_structure")
            else:
                message.append(seg)
            i += 1
        if current is not None:
            if current.header:
                raise Hl7Problem("AR", SEGMENT_SEQUENCE, "A batch that starts with BHS ends with BTS.",
                                 segment="BTS", reason_code="batch_structure")
            close_message()
            out.batches.append(current)
        if out.file_header is not None:
            _count(_envelope_fields(lines[-1]), "batch", "FTS", len(out.batches))
    except Hl7Problem as problem:
        out.problem = problem
        if not out.header:
            out.header = _envelope_fields(lines[0]) if lines else []
    return out


def _envelope(segment: str, original: list[str], own_id: str, now: datetime) -> str:
    get = (lambda n: original[n - 1] if len(original) >= n else "")  # FHS-n/BHS-n (the separator is FHS-1)
    comp = (lambda v: v.split("^")[0])
    return "|".join([segment, "^~\\&", "CAREPOST", "CAREPOST", escape(comp(get(3))[:180]),
                     escape(comp(get(4))[:180]), now.strftime("%Y%m%d%H%M%S") + "+0000", "", "", "", own_id,
                     escape(get(11)[:20])])


def batch_ack(batch: BatchFile, answers: list[bytes], now: datetime | None = None) -> bytes:
    """The answer to a batch frame: a malformed envelope gets one ACK AR naming the segment;
    otherwise an acknowledgement batch mirroring the envelope — FHS/BHS with CarePost's own
    control ids and the original's in FHS-12/BHS-12 (reference control id), then per message, in
    the order received, the ACKs it asks for (BTS-1 the number of ACKs in the batch, FTS-1 the
    number of batches).

    Which ACKs a message asks for is its own MSH-15/16 (the batch protocol's BHS and FHS have no
    acknowledgment type field): in original mode (both empty) its application ACK, AA, AE or AR;
    in enhanced mode the commit ACK and application ACK their conditions ask for, as for a
    message on its own (``answers[i].frames``), possibly none. So a batch of messages that say
    ``ER`` is answered by an acknowledgement batch holding only the messages in error — the batch
    protocol's "acknowledged on an exception basis"; one with no ACK in it (``BTS|0``) says every
    message of the batch was accepted as asked."""
    now = now or datetime.now(UTC)
    get = (lambda n: batch.header[n - 1] if len(batch.header) >= n else "")
    if batch.problem is not None:
        return ack(code="AR", control_id=get(11), sending_application=get(3).split("^")[0],
                   sending_facility=get(4).split("^")[0], problem=batch.problem, now=now,
                   encoding=encoding_of("FHS|" + get(2))).encode()
    _ack_counter[0] = (_ack_counter[0] + 1) % 1_000_000
    stem = f"CP{now:%Y%m%d%H%M%S}{_ack_counter[0]:06d}"
    parts: list[bytes] = []
    if batch.file_header is not None:
        parts.append((_envelope("FHS", batch.file_header, stem + "F", now) + "\r").encode())
    at = 0
    for n, one in enumerate(batch.batches):
        mine = answers[at:at + len(one.messages)]
        at += len(one.messages)
        original = one.header or (batch.file_header or [])[:10]  # no BHS: FHS-3/4, no reference id
        parts.append((_envelope("BHS", original, f"{stem}B{n + 1}", now) + "\r").encode())
        acks = [part for answer in mine for part in getattr(answer, "frames", (answer,))]
        parts.extend(acks)
        parts.append(f"BTS|{len(acks)}\r".encode())
    if batch.file_header is not None:
        parts.append(f"FTS|{len(batch.batches)}\r".encode())
    return b"".join(parts)
