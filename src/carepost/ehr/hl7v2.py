"""HL7 v2 ADT and SIU messages: checked, read with the ``hl7`` library (python-hl7), mapped to
contact events, and answered with an ACK.

Nothing here touches the database: :func:`read_message` turns the text of one MLLP frame into a
:class:`Hl7Message` or raises :class:`Hl7Problem` naming the problem (an HL7 table 0357 error
code, the segment and field, and a sentence that never holds a value from the message — no PHI
in an answer or a log). :func:`map_event` turns a message into the event name, the patient's
identifiers (PID-3) and the event's properties. :func:`ack` builds the answer.

The message structures are HL7 v2.5.1's (ADT_A01 for A01/A04/A08, ADT_A03, SIU_S12 for
S12-S15), checked as far as CarePost reads them: MSH first and once; for ADT, EVN then PID then
PV1; for SIU, SCH before PID, and the resource segments (RGS, AIS, AIG, AIL, AIP) after SCH.
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
    ("ADT", "A03"): "patient.discharged",
    ("ADT", "A04"): "patient.registered",
    ("ADT", "A08"): "patient.updated",
    ("SIU", "S12"): "appointment.booked",
    ("SIU", "S13"): "appointment.rescheduled",
    ("SIU", "S14"): "appointment.modified",
    ("SIU", "S15"): "appointment.cancelled",
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
    state_hash: str | None = None


# --------------------------------------------------------------------------- framing


def frame(message: str | bytes) -> bytes:
    data = message.encode() if isinstance(message, str) else message
    return START_BLOCK + data + END_BLOCK


def decode(data: bytes) -> str:
    """The frame's text: UTF-8 (what MSH-18 ``UNICODE UTF-8`` says and what most senders use),
    else Latin-1 (ASCII and 8859/1, HL7's default character sets, always decode)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# --------------------------------------------------------------------------- reading


def _field(segment, number: int):
    """Field ``number`` of a segment (MSH counts the field separator as MSH-1, as the library does)."""
    try:
        return segment[number] if number < len(segment) else None
    except (IndexError, TypeError):
        return None


def _repetitions(value) -> list:
    """A field's repetitions as lists of components (strings)."""
    if value is None or str(value) == "":
        return []
    reps = value if isinstance(value, hl7.Field) and value and isinstance(value[0], hl7.Repetition) else [value]
    out = []
    for rep in reps:
        if isinstance(rep, str):
            out.append([rep])
            continue
        comps = []
        for comp in rep:
            comps.append(str(comp[0]) if isinstance(comp, list) and len(comp) == 1 else str(comp))
        out.append(comps)
    return out


def _first(value, index: int = 0) -> str:
    reps = _repetitions(value)
    if not reps or index >= len(reps[0]):
        return ""
    return reps[0][index]


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


def read_message(data: bytes | str) -> Hl7Message:
    """Check and parse one message (the bytes between the MLLP start and end blocks)."""
    text = decode(data) if isinstance(data, bytes) else data
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    check_encoding(text)
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
        raise Hl7Problem("AE", SEGMENT_SEQUENCE, "A message holds exactly one MSH segment (batches are not accepted).",
                         segment="MSH", reason_code="segment_order")
    try:
        parsed = hl7.parse("\r".join(segments))
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
    if not msg.version.startswith("2."):
        raise Hl7Problem("AR", UNSUPPORTED_VERSION, "MSH-12 (version id) is an HL7 v2 version such as 2.5.1.",
                         segment="MSH", field_no=12, reason_code="version")
    if msg.message_type not in SUPPORTED_TYPES:
        raise Hl7Problem("AR", UNSUPPORTED_TYPE, "MSH-9: only ADT and SIU messages are accepted.", segment="MSH",
                         field_no=9, reason_code="unsupported_type")
    if (msg.message_type, msg.trigger) not in EVENTS:
        accepted = "A01, A03, A04, A08" if msg.message_type == "ADT" else "S12, S13, S14, S15"
        raise Hl7Problem("AR", UNSUPPORTED_EVENT, f"MSH-9: the trigger event of an {msg.message_type} message is one of "
                         f"{accepted}.", segment="MSH", field_no=9, reason_code="unsupported_trigger")


def check_structure(msg: Hl7Message) -> None:
    """The segment order CarePost relies on (v2.5.1 message structures)."""
    ids = msg.segment_ids

    def first(seg: str) -> int:
        return ids.index(seg) if seg in ids else -1

    if msg.message_type == "ADT":
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


def patient_identifiers(msg: Hl7Message) -> list[tuple[str, str | None, str | None]]:
    """PID-3 repetitions as (id, assigning authority, identifier type code)."""
    pid = _segment(msg, "PID")
    out = []
    for comps in _repetitions(_field(pid, 3)):
        value = (comps[0] if comps else "").strip()
        if not value:
            continue
        authority = comps[3].split("&")[0].strip() if len(comps) > 3 and comps[3] else None
        type_code = comps[4].strip() if len(comps) > 4 and comps[4] else None
        out.append((value, authority or None, type_code or None))
    if not out:
        raise Hl7Problem("AE", REQUIRED_FIELD, "PID-3 (patient identifier list) is required: CarePost matches "
                         "patients by MRN.", segment="PID", field_no=3, reason_code="required_field")
    return out


def _ids(value) -> list[str]:
    """The ID component (1) of each repetition of an XCN or CE field."""
    return [c[0].strip()[:64] for c in _repetitions(value) if c and c[0].strip()]


def _location(value) -> dict | None:
    reps = _repetitions(value)
    if not reps:
        return None
    comps = reps[0]
    names = ("point_of_care", "room", "bed", "facility")
    out = {n: comps[i].split("&")[0][:64] for i, n in enumerate(names) if i < len(comps) and comps[i]}
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
                       state_hash=state_hash)


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


_ack_counter = [0]


def ack(*, code: str, control_id: str = "", sending_application: str = "", sending_facility: str = "",
        trigger: str = "", version: str = "2.5.1", problem: Hl7Problem | None = None,
        now: datetime | None = None) -> str:
    """An ACK: MSH (CarePost as the sender, the message's sender as the receiver), MSA echoing the
    control id, and for AE/AR an ERR naming the code, the place and the problem."""
    now = now or datetime.now(UTC)
    _ack_counter[0] = (_ack_counter[0] + 1) % 1_000_000
    own_id = f"CP{now:%Y%m%d%H%M%S}{_ack_counter[0]:06d}"
    version = version if re.match(r"^2\.[0-9.]{1,6}$", version or "") else "2.5.1"
    msh = "|".join([
        "MSH", "^~\\&", "CAREPOST", "CAREPOST", escape(sending_application[:180]), escape(sending_facility[:180]),
        now.strftime("%Y%m%d%H%M%S") + "+0000", "", f"ACK^{escape(trigger[:3])}^ACK" if trigger else "ACK",
        own_id, "P", version,
    ])
    text = escape(problem.text)[:200] if problem else ""
    segments = [msh, "|".join(["MSA", code, escape(control_id[:199]), text] if text else ["MSA", code, escape(control_id[:199])])]
    if problem is not None:
        location = f"{problem.segment}^1^{problem.field_no}" if problem.segment and problem.field_no else problem.segment
        severity = "E"
        segments.append("|".join(["ERR", "", location, f"{problem.error[0]}^{problem.error[1]}^HL70357", severity,
                                  "", "", "", text]))
    return "\r".join(segments) + "\r"
