"""Events in from clinical systems: MLLP connections, the ingestion of HL7 v2 messages and FHIR
resources into contact events, and the error queue.

* **Who sends.** An HL7 v2 message names its organization by the credential of an
  :class:`~carepost.ehr.models.MllpConnection` in MSH-8 (``<key id>.<secret>``; the secret is
  stored as an HMAC, shown once) *and* one of that connection's sending facilities in MSH-4. A
  message without a known credential or from another facility is rejected (AR) before anything
  in it is read or stored: it belongs to no organization. A FHIR resource comes through the API
  with an API credential (``phi:write``) and belongs to the credential's organization.
* **Whose patient.** PID-3 identifiers (type MR first, then PI/PT or untyped; never SS and the
  other government or account types) are looked up through the organization's MRN blind index
  (:func:`carepost.patients.service.find_contact_ids`), in the connection's MRN system or in
  every MRN system the organization holds. Blind indexes are keyed per organization, so another
  organization's patient is simply not found: the message goes to the error queue, nothing is
  recorded (tenant isolation, issue 15 "Bad input").
* **Once.** A message is recorded once per organization and control id (MSH-10; for FHIR the
  resource type, id and version). The same message again is answered as the first time without
  writing anything; the same control id with different content is an error (HL7 code 205) kept
  in the error queue. A message in the error queue sent again is processed again (a sender's
  retry after the patient was imported succeeds).
* **Nothing lost.** A message from a known sender that cannot be recorded — wrong segment order,
  unknown trigger, missing or unknown MRN, a bad date — is kept in ``ehr_messages`` with status
  ``error``, a reason code, a sentence naming the field (never a value from the message) and the
  raw message encrypted under the organization's data key; staff list, retry or discard it. The
  raw text is dropped once the message is recorded (minimum necessary).
* **Events** go through :func:`carepost.tracking.conversions.record_event` (properties encrypted
  there, idempotency key ``hl7v2:<control id>`` / ``fhir:<type>/<id>/_history/<version>``), so
  journeys and goals see them as any other event. Each recorded event and each queued error is
  audited (actor ``ehr_connection`` or the API credential), ids and codes only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.database import ALL_ORGANIZATIONS
from carepost.core.errors import (
    CarePostError,
    NotFound,
    TenantScopeError,
    ValidationFailed,
)
from carepost.core.ids import is_id, new_id
from carepost.ehr import hl7v2
from carepost.ehr.hl7v2 import Hl7Problem
from carepost.ehr.models import EhrMessage, MllpConnection

SOURCE_HL7 = "hl7v2"
SOURCE_FHIR = "fhir"
STATUSES = ("recorded", "ignored", "error", "discarded", "queued")  # queued: an id-only reference to fetch
MAX_FACILITIES = 20
KEY_ID_PREFIX = "m"
_SECRET_LABEL = b"carepost-mllp-connection-secret-v1"
CACHE_SECONDS = 5.0  # a revoked connection is refused by every listener within this bound
# PID-3 identifier types tried, in order (HL7 table 0203). Government and account numbers
# (SS, DL, PPN, AN...) are never used to match a patient.
MRN_TYPES = ("MR", "MRT", "PI", "PT", "PN", None)


# --------------------------------------------------------------------------- connections


def _hash_secret(key_id: str, secret: str) -> str:
    return hmac.new(_SECRET_LABEL, f"{key_id}\x00{secret}".encode(), hashlib.sha256).hexdigest()


def _check_facilities(values) -> list[str]:
    if not isinstance(values, list) or not values or len(values) > MAX_FACILITIES:
        raise ValidationFailed(f"sending_facilities is a list of 1 to {MAX_FACILITIES} MSH-4 namespace ids.",
                               field="sending_facilities")
    out = []
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value.strip() or len(value.strip()) > 180 or any(
                c in value for c in "|^~\\&\r\n"):
            raise ValidationFailed("A sending facility is the MSH-4 namespace id: 1 to 180 characters without HL7 "
                                   "delimiters.", field=f"sending_facilities.{i}")
        out.append(value.strip())
    return list(dict.fromkeys(out))


def _check_zone(value: str | None) -> str:
    value = value or "UTC"
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationFailed("time_zone is an IANA time zone such as America/Chicago.", field="time_zone") from None
    return value


def check_certificate_fingerprint(value: str | None, field: str = "client_cert_sha256") -> str | None:
    """A SHA-256 certificate fingerprint as 64 lower-case hex digits (``AB:CD:…`` as ``openssl x509
    -fingerprint -sha256`` prints it is accepted); None or '' clears the pin."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ValidationFailed("client_cert_sha256 is the SHA-256 fingerprint of the client certificate: 64 hex "
                               "digits, colons allowed.", field=field)
    text = value.strip().lower()
    if text.startswith("sha256 fingerprint="):
        text = text.split("=", 1)[1]
    text = text.replace(":", "")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValidationFailed("client_cert_sha256 is the SHA-256 fingerprint of the client certificate (of its DER "
                               "encoding): 64 hex digits, colons allowed.", field=field)
    return text


def certificate_fingerprint(pem_or_der: bytes) -> str:
    """The SHA-256 fingerprint of a certificate file's first certificate (PEM or DER)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        cert = x509.load_pem_x509_certificate(pem_or_der) if b"-----BEGIN" in pem_or_der \
            else x509.load_der_x509_certificate(pem_or_der)
    except ValueError:
        raise ValidationFailed("The file is not an X.509 certificate (PEM or DER).", field="client_cert") from None
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def create_connection(session: Session, org_id: str, *, name: str, sending_facilities: list[str],
                      mrn_system: str | None = None, time_zone: str | None = None,
                      created_by: str | None = None, client_cert_sha256: str | None = None) -> tuple[MllpConnection, str]:
    """A new MLLP connection and its credential ``<key id>.<secret>`` (shown once; 39 characters,
    so it fits MSH-8, an ST of 40). The caller commits."""
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > 120:
        raise ValidationFailed("name is 1 to 120 characters.", field="name")
    facilities = _check_facilities(sending_facilities)
    pin = check_certificate_fingerprint(client_cert_sha256)
    if mrn_system is not None and (not isinstance(mrn_system, str) or not mrn_system.strip() or len(mrn_system) > 255):
        raise ValidationFailed("mrn_system is an identifier system URI of at most 255 characters.", field="mrn_system")
    zone = _check_zone(time_zone)
    secret = secrets.token_urlsafe(21)  # 28 characters, no HL7 delimiter
    for _ in range(5):
        key_id = KEY_ID_PREFIX + secrets.token_hex(5)
        exists = session.scalar(select(MllpConnection.id).where(MllpConnection.key_id == key_id)
                                .execution_options(**ALL_ORGANIZATIONS))
        if not exists:
            break
    conn = MllpConnection(id=new_id(), org_id=org_id, name=name.strip(), key_id=key_id,
                          secret_hash=_hash_secret(key_id, secret), sending_facilities=facilities,
                          mrn_system=mrn_system.strip() if mrn_system else None, time_zone=zone, created_by=created_by,
                          client_cert_sha256=pin)
    session.add(conn)
    session.flush()
    return conn, f"{key_id}.{secret}"


def list_connections(session: Session, org_id: str) -> list[MllpConnection]:
    return list(session.scalars(select(MllpConnection).where(MllpConnection.org_id == org_id)
                                .order_by(MllpConnection.created_at, MllpConnection.id)))


def get_connection(session: Session, org_id: str, connection_id: str) -> MllpConnection:
    conn = session.get(MllpConnection, connection_id) if is_id(connection_id) else None
    if conn is None or conn.org_id != org_id:
        raise NotFound("No such MLLP connection.", field="connection_id")
    return conn


def pin_client_certificate(session: Session, conn: MllpConnection, fingerprint: str | None) -> None:
    """Bind the connection to one TLS client certificate (its SHA-256), or unbind it (None). Takes
    effect on every listener within :data:`CACHE_SECONDS`. The caller commits."""
    if conn.revoked_at is not None:
        raise ValidationFailed("The MLLP connection is revoked.", field="connection_id")
    conn.client_cert_sha256 = check_certificate_fingerprint(fingerprint)
    session.flush()
    with _cache_lock:
        _cache.pop(conn.key_id, None)


def revoke_connection(session: Session, conn: MllpConnection) -> None:
    if conn.revoked_at is None:
        conn.revoked_at = clock.now()
        session.flush()
    with _cache_lock:
        _cache.pop(conn.key_id, None)


def connection_out(conn: MllpConnection) -> dict:
    return {"id": conn.id, "name": conn.name, "key_id": conn.key_id, "sending_facilities": list(conn.sending_facilities),
            "mrn_system": conn.mrn_system, "time_zone": conn.time_zone, "client_cert_sha256": conn.client_cert_sha256,
            "created_at": _iso(conn.created_at), "revoked_at": _iso(conn.revoked_at)}


@dataclass(frozen=True)
class Sender:
    """What the listener keeps of an authenticated connection."""

    id: str
    org_id: str
    key_id: str
    secret_hash: str
    facilities: frozenset
    mrn_system: str | None
    zone: ZoneInfo
    cert_sha256: str | None = None  # the pinned TLS client certificate, if any


_cache: dict[str, tuple[Sender | None, float]] = {}
_cache_lock = threading.Lock()


def _load_sender(session: Session, key_id: str) -> Sender | None:
    with _cache_lock:
        hit = _cache.get(key_id)
    if hit is not None and hit[1] > time.monotonic():
        return hit[0]
    row = session.scalar(select(MllpConnection).where(MllpConnection.key_id == key_id)
                         .execution_options(**ALL_ORGANIZATIONS))
    sender = None
    if row is not None and row.revoked_at is None:
        sender = Sender(row.id, row.org_id, row.key_id, row.secret_hash, frozenset(row.sending_facilities),
                        row.mrn_system, ZoneInfo(row.time_zone or "UTC"), row.client_cert_sha256)
    with _cache_lock:
        if len(_cache) > 10000:
            _cache.clear()
        _cache[key_id] = (sender, time.monotonic() + CACHE_SECONDS)
    return sender


def forget_cached_connections() -> None:
    with _cache_lock:
        _cache.clear()


def authenticate(session: Session, security: str, facility: str) -> Sender:
    """The connection whose credential is in MSH-8, if MSH-4 is one of its facilities; else AR.
    The answer does not say which of the two was wrong for an unknown credential."""
    key_id, sep, secret = (security or "").strip().partition(".")
    if not sep or not key_id or not secret or len(key_id) > 16:
        raise Hl7Problem("AR", hl7v2.UNKNOWN_KEY, "MSH-8 must hold this connection's CarePost credential.",
                         segment="MSH", field_no=8, reason_code="unauthenticated")
    sender = _load_sender(session, key_id)
    if sender is None or not hmac.compare_digest(sender.secret_hash, _hash_secret(key_id, secret)):
        raise Hl7Problem("AR", hl7v2.UNKNOWN_KEY, "MSH-8 does not hold a valid CarePost credential.",
                         segment="MSH", field_no=8, reason_code="unauthenticated")
    if facility not in sender.facilities:
        raise Hl7Problem("AR", hl7v2.UNKNOWN_KEY, "MSH-4 (sending facility) is not a facility of this connection.",
                         segment="MSH", field_no=4, reason_code="unknown_facility")
    return sender


def check_client_certificate(sender: Sender, presented: str | None) -> None:
    """A connection pinned to a client certificate accepts messages only from a TLS session that
    presented that certificate (AR otherwise; the answer names MSH-8, never a fingerprint)."""
    if sender.cert_sha256 is None:
        return
    if presented is None:
        raise Hl7Problem("AR", hl7v2.UNKNOWN_KEY, "The MLLP connection named in MSH-8 requires a TLS client "
                         "certificate; this session presented none.", segment="MSH", field_no=8,
                         reason_code="client_cert_missing")
    if not hmac.compare_digest(sender.cert_sha256, presented):
        raise Hl7Problem("AR", hl7v2.UNKNOWN_KEY, "The TLS client certificate of this session is not the one pinned to "
                         "the MLLP connection named in MSH-8.", segment="MSH", field_no=8,
                         reason_code="client_cert_mismatch")


# --------------------------------------------------------------------------- patients


def match_patient(session: Session, org_id: str, identifiers: list[tuple[str, str | None, str | None]],
                  mrn_system: str | None, *, field: str = "PID-3") -> str:
    """The contact named by the identifiers (MRN types in order of :data:`MRN_TYPES`); raises
    :class:`PatientNotMatched` when none or more than one contact has them."""
    from carepost.patients import service as patients

    candidates = sorted((i for i in identifiers if i[2] in MRN_TYPES), key=lambda i: MRN_TYPES.index(i[2]))
    if not candidates:
        raise PatientNotMatched("no_mrn", f"{field} holds no medical record number (identifier type MR, PI or PT).",
                                field)
    for value, _authority, _type in candidates:
        ids = patients.find_contact_ids(session, org_id, mrn=value[:128], system=mrn_system)
        if len(ids) == 1:
            return ids[0]
        if len(ids) > 1:
            raise PatientNotMatched("ambiguous_patient", f"More than one patient has the MRN in {field}.", field)
    raise PatientNotMatched("patient_not_found", f"No patient of this organization has the MRN in {field}.", field)


class PatientNotMatched(Exception):
    def __init__(self, reason_code: str, text: str, field: str):
        super().__init__(text)
        self.reason_code, self.text, self.field = reason_code, text, field


# --------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """What became of one message: the answer's code, the stored row and event."""

    code: str  # AA | AE | AR
    status: str  # recorded | ignored | error | replayed | refused (not stored: no organization)
    org_id: str | None = None
    message_id: str | None = None
    event_id: str | None = None
    event_name: str | None = None
    contact_id: str | None = None
    reason_code: str | None = None
    text: str | None = None
    field: str | None = None
    problem: Hl7Problem | None = None
    created: bool = False
    merged_from: list[str] | None = None  # ADT^A40: the contacts whose MRNs moved to contact_id


def find_message(session: Session, org_id: str, source: str, control_id: str) -> EhrMessage | None:
    return session.scalar(select(EhrMessage).where(EhrMessage.org_id == org_id, EhrMessage.source == source,
                                                   EhrMessage.control_id == control_id))


def _store(session: Session, org_id: str, row: EhrMessage | None, *, source: str, connection_id: str | None,
           control_id: str | None, content_hash: str, message_type: str, status: str, ack_code: str,
           raw: str | None = None, event_name: str | None = None, reason_code: str | None = None,
           reason: str | None = None, error_field: str | None = None, contact_id: str | None = None,
           event_id: str | None = None, resource_key: str | None = None, state_hash: str | None = None) -> EhrMessage:
    if row is None:
        row = EhrMessage(id=new_id(), org_id=org_id, source=source, control_id=control_id, attempts=1,
                         received_at=clock.now())
        session.add(row)
    else:
        row.attempts = (row.attempts or 0) + 1
    row.connection_id, row.content_hash, row.message_type = connection_id, content_hash, message_type[:40]
    row.status, row.ack_code, row.event_name = status, ack_code, event_name
    row.reason_code, row.reason = reason_code, (reason or None) and reason[:300]
    row.error_field = (error_field or None) and error_field[:60]
    row.contact_id, row.event_id = contact_id, event_id
    row.resource_key, row.state_hash = resource_key, state_hash
    row.updated_at = clock.now()
    if status == "error" and raw is not None:
        row.raw_enc = get_keyring().encrypt(session, org_id, EhrMessage.__tablename__, "raw", row.id, raw)
    elif status != "error":
        row.raw_enc = None
    return row


def raw_text(session: Session, row: EhrMessage) -> str | None:
    return get_keyring().decrypt_text(session, row.org_id, EhrMessage.__tablename__, "raw", row.id, row.raw_enc)


def _event_time(value: datetime | None) -> datetime:
    """The event's time: the message's (EVN, PV1-44/45, MSH-7), not later than now (a sender's
    clock ahead of ours is not an error)."""
    now = clock.now()
    if value is None or value > now:
        return now
    return value


def record(session: Session, org_id: str, *, name: str, contact_id: str, occurred_at: datetime | None,
           properties: dict, idempotency_key: str, request_hash: str, created_by: str | None,
           field: str) -> tuple[str, bool]:
    """The event through tracking (encrypted properties, goals); (event id, created)."""
    from carepost.tracking import conversions

    try:
        event, created = conversions.record_event(
            session, org_id, name=name, contact_id=contact_id, occurred_at=_event_time(occurred_at),
            properties=properties, idempotency_key=idempotency_key[:200], request_hash=request_hash,
            created_by=created_by)
    except CarePostError as exc:
        raise EventRefused(exc.code or "invalid_event", exc.message, field) from None
    return event.id, created


class EventRefused(Exception):
    def __init__(self, reason_code: str, text: str, field: str):
        super().__init__(text)
        self.reason_code, self.text, self.field = reason_code, text, field


def _audit_item(org_id: str, actor_type: str, actor_id: str | None, outcome: Outcome, source: str,
                ip: str | None = None) -> dict:
    if outcome.status == "recorded":
        return {"org_id": org_id, "actor_type": actor_type, "actor_id": actor_id, "action": "contact_event.create",
                    "target_type": "contact", "target_id": outcome.contact_id, "ip": ip,
                    "details": {"event_id": outcome.event_id, "name": outcome.event_name, "source": source,
                             "ehr_message_id": outcome.message_id,
                             **({"merged_contact_ids": outcome.merged_from} if outcome.merged_from else {})}}
    return {"org_id": org_id, "actor_type": actor_type, "actor_id": actor_id, "action": "ehr_message.queue",
                "target_type": "ehr_message", "target_id": outcome.message_id, "ip": ip, "outcome": "failure",
                "details": {"source": source, "reason_code": outcome.reason_code, "field": outcome.field}}


# --------------------------------------------------------------------------- HL7 v2


def _best_effort_header(data: bytes) -> dict:
    """MSH-3, MSH-4, MSH-9.2, MSH-10 (as on the wire, with MSH-1/MSH-2 to echo it) and MSH-12 of a
    message that failed to parse, for its NAK."""
    text = hl7v2.decode(data[:4096]).replace("\n", "\r")
    first = text.split("\r", 1)[0]
    if not first.startswith("MSH") or len(first) < 4:
        return {}
    fields = first.split(first[3])
    get = (lambda i: fields[i - 1] if len(fields) >= i else "")
    comp = (lambda value, n: value.split("^")[n] if len(value.split("^")) > n else "")
    return {"sending_application": comp(get(3), 0), "sending_facility": comp(get(4), 0),
            "trigger": comp(get(9), 1), "control_id": get(10), "version": get(12),
            "charset": get(18) if hl7v2._readable(get(18)) else "",
            "accept_ack": comp(get(15), 0).strip(), "application_ack": comp(get(16), 0).strip(),
            "encoding": hl7v2.encoding_of(first)}


class Acks(bytes):
    """A message's answer: the bytes are its application ACK; ``frames`` are the ACKs the
    message asks for — that ACK in original mode, or in enhanced mode (MSH-15/16 valued) the
    commit ACK and the application ACK their conditions ask for, possibly none. The listener
    sends them as frames of their own for a message on its own, and puts them in the
    acknowledgement batch for a message of a batch (:func:`hl7v2.batch_ack`)."""

    frames: list[bytes]


def ack_for(outcome: Outcome, header: dict) -> bytes:
    """The answer to one message (:class:`Acks`).

    Enhanced mode (HL7 v2, chapter 2): the commit ACK says whether the message is safely kept —
    CA stored (recorded, already recorded, or kept in the error queue), CE not stored now (send it
    again: AE 207 in original mode), CR refused (no known sender, not readable; a bad MSH-15/16) —
    and is sent when MSH-15 asks (AL always, NE never, ER on CE/CR, SU on CA). The application ACK
    (AA/AE/AR, as in original mode) follows after a CA when MSH-16 asks (ER on AE/AR, SU on AA).
    Both are built after the transaction committed, so they go out together, commit first, on the
    same connection. An empty MSH-15 or MSH-16 beside a valued one counts as AL."""
    codec = hl7v2.ack_codec(header.get("charset") or "")
    application = hl7v2.ack(code=outcome.code, problem=outcome.problem, **header).encode(codec, errors="replace")
    answer = Acks(application)
    accept, app_type = header.get("accept_ack") or "", header.get("application_ack") or ""
    if not (accept or app_type):
        answer.frames = [application]
        return answer
    try:
        hl7v2.check_ack_types(accept, app_type)
    except Hl7Problem as bad:
        problem = outcome.problem if outcome.status == "refused" and outcome.problem is not None else bad
        answer.frames = [hl7v2.ack(code="CR", problem=problem, **header).encode(codec, errors="replace")]
        return answer
    if outcome.status == "refused":
        commit = "CE" if outcome.problem is not None and outcome.problem.error == hl7v2.INTERNAL else "CR"
    else:
        commit = "CA"
    frames = []
    if hl7v2.ack_wanted(accept, commit == "CA"):
        frames.append(hl7v2.ack(code=commit, problem=None if commit == "CA" else outcome.problem,
                                **header).encode(codec, errors="replace"))
    if commit == "CA" and hl7v2.ack_wanted(app_type, outcome.code == "AA"):
        frames.append(application)
    answer.frames = frames
    return answer


def ingest_hl7(session: Session, data: bytes, *, peer: str | None = None, audit: list | None = None) -> tuple[Outcome, dict]:
    """Process one message in the caller's transaction (the caller commits, then sends the ACK).
    Returns the outcome and the header fields its ACK echoes. Audit items are appended to
    ``audit`` (the listener writes a batch's at once) or written here."""
    refusal, header, sender, msg = _authenticated(session, data)
    if refusal is not None:
        return refusal, header
    session.info.pop("scope", None)
    session.info["org_id"] = sender.org_id
    outcome = process_hl7(session, sender, msg)
    item = _audit_item(sender.org_id, "ehr_connection", sender.id, outcome, SOURCE_HL7, ip=peer) \
        if outcome.status in ("recorded", "error") else None
    if item is not None:
        if audit is not None:
            audit.append(item)
        else:
            from carepost.audit.service import record_many

            record_many(session, [item])
    return outcome, header


@dataclass
class _Work:
    """A message between its checks and its event (the set-wise path holds a group of these)."""

    sender: Sender
    msg: hl7v2.Hl7Message
    row: EhrMessage | None
    control_id: str | None
    mapped: object = None
    contact_id: str | None = None


def _precheck(session: Session, sender: Sender, msg: hl7v2.Hl7Message, row: EhrMessage | None) -> Outcome | _Work:
    """The answer already known (a replay, a reused control id, a bad message: kept in the error
    queue), or the message mapped and waiting for its patient and event."""
    org_id = sender.org_id
    control_id = msg.control_id[:199] if msg.control_id else None
    known = session.info.get(_KNOWN)
    if row is None and control_id:
        if known is not None and (org_id, control_id) in known:
            row = known[(org_id, control_id)]
        elif known is None or org_id not in known.get("orgs", ()):
            row = find_message(session, org_id, SOURCE_HL7, control_id)
        if row is not None and row.status in ("recorded", "ignored"):
            if row.content_hash == msg.content_hash:
                return Outcome("AA", "replayed", org_id, row.id, row.event_id, row.event_name, row.contact_id)
            problem = Hl7Problem("AE", hl7v2.DUPLICATE_KEY, "MSH-10: this control id was used for another message.",
                                 segment="MSH", field_no=10, reason_code="duplicate_control_id")
            kept = _store(session, org_id, None, source=SOURCE_HL7, connection_id=sender.id, control_id=None,
                          content_hash=msg.content_hash, message_type=msg.type_label or "?", status="error",
                          ack_code="AE", raw=hl7v2.without_credential(msg.text), reason_code=problem.reason_code,
                          reason=problem.text,
                          error_field="MSH-10")
            return Outcome("AE", "error", org_id, kept.id, reason_code=problem.reason_code, text=problem.text,
                           field="MSH-10", problem=problem)
    work = _Work(sender, msg, row, control_id)
    try:
        hl7v2.check_header(msg)
        hl7v2.check_structure(msg)
        work.mapped = hl7v2.map_event(msg, sender.zone)
    except Hl7Problem as problem:
        return _fail(session, work, problem)
    return work


def _fail(session: Session, work: _Work, problem: Hl7Problem) -> Outcome:
    """Keep the message in the error queue; its AE/AR answer."""
    org_id, msg = work.sender.org_id, work.msg
    if getattr(work, "row_is_new", False):  # made for its event (_message_id), which was refused
        session.add(work.row)
        work.row_is_new = False
    kept = _store(session, org_id, work.row, source=SOURCE_HL7, connection_id=work.sender.id,
                  control_id=work.control_id, content_hash=msg.content_hash, message_type=msg.type_label or "?",
                  status="error", ack_code=problem.ack_code, raw=hl7v2.without_credential(msg.text),
                  reason_code=problem.reason_code, reason=problem.text, error_field=problem.field,
                  event_name=work.mapped.name if work.mapped else None)
    known = session.info.get(_KNOWN)
    if known is not None and work.control_id:
        known[(org_id, work.control_id)] = kept
    return Outcome(problem.ack_code, "error", org_id, kept.id, reason_code=problem.reason_code, text=problem.text,
                   field=problem.field, problem=problem)


def _unmatched(miss: PatientNotMatched) -> Hl7Problem:
    return Hl7Problem("AE", hl7v2.UNKNOWN_KEY, miss.text, segment="PID", field_no=3, reason_code=miss.reason_code)


def _refused(refused: EventRefused) -> Hl7Problem:
    seg, _, num = refused.field.partition("-")
    return Hl7Problem("AE", hl7v2.INTERNAL if refused.reason_code != "validation_failed" else hl7v2.DATA_TYPE,
                      "The event could not be recorded: " + refused.text, segment=seg,
                      field_no=int(num) if num.isdigit() else 0, reason_code="event_refused")


def _message_id(work: _Work) -> str:
    if work.row is None:
        work.row = EhrMessage(id=new_id(), org_id=work.sender.org_id, source=SOURCE_HL7, control_id=work.control_id,
                              attempts=0, received_at=clock.now())
        work.row_is_new = True
    return work.row.id


def _event_item(work: _Work) -> dict:
    mapped = work.mapped
    return {"name": mapped.name, "contact_id": work.contact_id, "occurred_at": _event_time(mapped.occurred_at),
            "properties": {**mapped.properties, "ehr_message_id": _message_id(work)},
            "idempotency_key": f"{SOURCE_HL7}:{work.control_id}"[:200], "request_hash": work.msg.content_hash,
            "created_by": work.sender.id}


def _recorded(session: Session, work: _Work, event_id: str, new_rows: list | None = None) -> Outcome:
    """The message recorded: its row (a new one goes to ``new_rows`` when given — the group inserts
    them in one Core statement — else into the session)."""
    org_id, msg, mapped = work.sender.org_id, work.msg, work.mapped
    row = work.row
    is_new = getattr(work, "row_is_new", False)
    if is_new and new_rows is None:
        session.add(row)
    kept = _store(session, org_id, row, source=SOURCE_HL7, connection_id=work.sender.id, control_id=work.control_id,
                  content_hash=msg.content_hash, message_type=msg.type_label, status="recorded", ack_code="AA",
                  event_name=mapped.name, contact_id=work.contact_id, event_id=event_id,
                  resource_key=mapped.resource_key, state_hash=mapped.state_hash)
    if is_new and new_rows is not None:
        new_rows.append({c: getattr(kept, c) for c in _MESSAGE_COLUMNS})
    known = session.info.get(_KNOWN)
    if known is not None and work.control_id:
        known[(org_id, work.control_id)] = kept  # read only from here on (a replay or a duplicate)
    return Outcome("AA", "recorded", org_id, kept.id, event_id, mapped.name, work.contact_id, created=True,
                   merged_from=mapped.properties.get("merged_contact_ids") if mapped.prior_mrns else None)


_MESSAGE_COLUMNS = ("id", "org_id", "source", "connection_id", "control_id", "content_hash", "message_type",
                    "event_name", "status", "ack_code", "reason_code", "reason", "error_field", "raw_enc",
                    "state_hash", "resource_key", "contact_id", "event_id", "attempts", "received_at", "updated_at")


def _merge(session: Session, work: _Work, *, dry_run: bool) -> None:
    """ADT^A40: the MRNs of MRG-1 (prior patient identifiers) now name the matched patient of
    PID-3 — their identifier rows move to that contact by blind index
    (:func:`carepost.patients.service.move_mrns`); the contacts they came from are named in the
    event's properties (``merged_contact_ids``: their own data is not merged). First with
    ``dry_run`` (which contacts: the event's property), then for real once the event is recorded,
    so a message kept in the error queue has moved nothing."""
    from carepost.patients import service as patients

    prior = [(value[:128], work.sender.mrn_system) for value, _authority, type_code in work.mapped.prior_mrns
             if type_code in MRN_TYPES]
    if not prior:
        raise Hl7Problem("AE", hl7v2.REQUIRED_FIELD, "MRG-1 holds no medical record number (identifier type MR, PI "
                         "or PT).", segment="MRG", field_no=1, reason_code="no_mrn")
    moved = patients.move_mrns(session, work.sender.org_id, prior, work.contact_id, dry_run=dry_run)
    if dry_run:
        work.mapped.properties["merged_contact_ids"] = moved


def process_hl7(session: Session, sender: Sender, msg: hl7v2.Hl7Message, row: EhrMessage | None = None,
                *, retry: bool = False) -> Outcome:
    """Check, map and record an authenticated message (or keep it in the error queue)."""
    work = _precheck(session, sender, msg, row)
    if isinstance(work, Outcome):
        return work
    try:
        try:
            work.contact_id = match_patient(session, sender.org_id, work.mapped.mrns, sender.mrn_system)
        except PatientNotMatched as miss:
            raise _unmatched(miss) from None
        if work.mapped.prior_mrns:
            _merge(session, work, dry_run=True)
        item = _event_item(work)
        try:
            event_id, _ = record(session, sender.org_id, name=item["name"], contact_id=work.contact_id,
                                 occurred_at=work.mapped.occurred_at, properties=item["properties"],
                                 idempotency_key=item["idempotency_key"], request_hash=msg.content_hash,
                                 created_by=sender.id, field="MSH-10")
        except EventRefused as refused:
            raise _refused(refused) from None
    except Hl7Problem as problem:
        return _fail(session, work, problem)
    if work.mapped.prior_mrns:
        _merge(session, work, dry_run=False)
    return _recorded(session, work, event_id)


def _match_many(session: Session, org_id: str, works: list[_Work]) -> dict[int, str | PatientNotMatched]:
    """:func:`match_patient` for a group (one blind-index query): index in ``works`` -> the contact
    id or why none."""
    from carepost.patients import service as patients

    wanted = []
    plans = []
    for work in works:
        ids = work.mapped.mrns
        candidates = sorted((i for i in ids if i[2] in MRN_TYPES), key=lambda i: MRN_TYPES.index(i[2]))
        plan = [(value[:128], work.sender.mrn_system) for value, _authority, _type in candidates]
        plans.append(plan)
        wanted += plan
    found = patients.find_contact_ids_by_mrns(session, org_id, wanted) if wanted else {}
    out: dict[int, str | PatientNotMatched] = {}
    field = "PID-3"
    for i, plan in enumerate(plans):
        if not plan:
            out[i] = PatientNotMatched("no_mrn", f"{field} holds no medical record number (identifier type MR, PI "
                                                 "or PT).", field)
            continue
        out[i] = PatientNotMatched("patient_not_found", f"No patient of this organization has the MRN in {field}.",
                                   field)
        for key in plan:
            ids = found.get(key) or []
            if len(ids) == 1:
                out[i] = ids[0]
                break
            if len(ids) > 1:
                out[i] = PatientNotMatched("ambiguous_patient", f"More than one patient has the MRN in {field}.",
                                           field)
                break
    return out


def _process_group(session: Session, org_id: str, works: list[_Work]) -> list[Outcome]:
    """Mapped messages of one organization, set-wise: their patients in one look-up, their events
    through :func:`carepost.tracking.conversions.record_events` (one idempotency query, one
    insert, journeys evaluated for the group), then their rows."""
    from carepost.tracking import conversions

    outcomes: list[Outcome | None] = [None] * len(works)
    matches = _match_many(session, org_id, works)
    todo = []
    for i, work in enumerate(works):
        match = matches[i]
        if isinstance(match, PatientNotMatched):
            outcomes[i] = _fail(session, work, _unmatched(match))
            continue
        work.contact_id = match
        if work.mapped.prior_mrns:  # a merge: the last message of its round (_ingest_all)
            try:
                _merge(session, work, dry_run=True)
            except Hl7Problem as problem:
                outcomes[i] = _fail(session, work, problem)
                continue
        todo.append(i)
    results = conversions.record_events(session, org_id, [_event_item(works[i]) for i in todo]) if todo else []
    # New rows of recorded messages: one Core INSERT (the organization's own rows, in its scope).
    new_rows: list | None = [] if session.info.get("org_id") == org_id else None
    for i, result in zip(todo, results, strict=True):
        if result.error is not None:
            exc = result.error
            outcomes[i] = _fail(session, works[i], _refused(EventRefused(exc.code or "invalid_event", exc.message,
                                                                         "MSH-10")))
        else:
            if works[i].mapped.prior_mrns:
                _merge(session, works[i], dry_run=False)
            outcomes[i] = _recorded(session, works[i], result.event.id, new_rows)
    if new_rows:
        if any(r["org_id"] != org_id for r in new_rows):
            raise TenantScopeError("an ehr_messages row of another organization in the group")
        session.connection().execute(EhrMessage.__table__.insert(), new_rows)
    return outcomes


def ingest_batch(frames: list[tuple[bytes, str | None]], certs: list[str | None] | None = None, *,
                 checkpoints: list | None = None) -> list[bytes]:
    """A group of messages (from any connections) in one transaction, then their ACKs in order.

    Group commit is what lets one listener answer hundreds of messages a second. Every ACK is
    built only after the transaction that stored its message committed. Should the group's
    transaction fail (a concurrent writer took the same control id, a lost connection), each
    message is processed again in a transaction of its own; one that still fails is answered
    AE 207 and nothing of it is stored — the sender keeps it and sends it again.

    ``checkpoints``: a list that receives the audit checkpoints of the committed transactions
    (:func:`carepost.audit.service.hand_over_checkpoints`) instead of their being written here; the
    caller must write them (``write_checkpoints``) before it sends any of the answers. Without
    it, they are written at each commit, before this returns."""
    from carepost.audit.service import hand_over_checkpoints
    from carepost.core.database import session_factory

    try:
        with session_factory()() as session:
            if checkpoints is not None:
                hand_over_checkpoints(session, checkpoints)
            answers = _ingest_all(session, frames, certs)
            session.commit()
            return answers
    except Exception:  # noqa: BLE001 - fall back to one transaction per message
        import structlog

        structlog.get_logger("carepost.ehr").warning("mllp_batch_retried_one_by_one", messages=len(frames))
    answers = []
    for n, (frame_data, peer) in enumerate(frames):
        try:
            with session_factory()() as session:
                if checkpoints is not None:
                    hand_over_checkpoints(session, checkpoints)
                [answer] = _ingest_all(session, [(frame_data, peer)], [certs[n]] if certs is not None else None)
                session.commit()
        except Exception as exc:  # noqa: BLE001
            import structlog

            structlog.get_logger("carepost.ehr").error("mllp_message_failed", error=type(exc).__name__)
            problem = Hl7Problem("AE", hl7v2.INTERNAL, "CarePost could not store the message now; send it again.",
                                 reason_code="internal")
            answer = ack_for(Outcome("AE", "refused", problem=problem), _best_effort_header(frame_data))
        answers.append(answer)
    return answers


def ingest_frames(frames: list[tuple[bytes, str | None]], certs: list[str | None] | None = None, *,
                  checkpoints: list | None = None) -> list[bytes]:
    """The listener's entry: MLLP frames, each a message or an HL7 batch (FHS/BHS … BTS/FTS),
    answered in order. A batch's messages join the group of single messages (one transaction,
    :func:`ingest_batch`); its answer is an acknowledgement batch (:func:`hl7v2.batch_ack`).
    ``certs``: per frame, the SHA-256 of the TLS client certificate its session presented (None:
    none), checked against a connection's pinned certificate. ``checkpoints``: as for
    :func:`ingest_batch` (the caller writes them before it sends an answer)."""
    flat: list[tuple[bytes, str | None]] = []
    flat_certs: list[str | None] = []
    batches: list[hl7v2.BatchFile | None] = []
    for n, (data, peer) in enumerate(frames):
        cert = certs[n] if certs is not None else None
        if hl7v2.is_batch(data):
            batch = hl7v2.read_batch(data)
            batches.append(batch)
            flat.extend((m, peer) for m in batch.messages)
            flat_certs.extend(cert for _ in batch.messages)
        else:
            batches.append(None)
            flat.append((data, peer))
            flat_certs.append(cert)
    answers = ingest_batch(flat, flat_certs, checkpoints=checkpoints) if flat else []
    out, at = [], 0
    for batch in batches:
        if batch is None:
            out.append(answers[at])
            at += 1
        else:
            count = len(batch.messages)
            out.append(hl7v2.batch_ack(batch, answers[at:at + count]))
            at += count
    return out


_KNOWN = "carepost_ehr_known_messages"


def _prefetch(session: Session, frames: list[tuple[bytes, str | None]]) -> None:
    """The rows already stored for a group's control ids, one query per organization instead of
    one per message (read before any credential is checked: only used once a message of that
    organization is authenticated)."""
    wanted: dict[str, set[str]] = {}
    session.info.pop("org_id", None)
    session.info["scope"] = "system"
    for data, _ in frames:
        first = hl7v2.decode(data[:2048]).replace("\n", "\r").split("\r", 1)[0]
        if not first.startswith("MSH") or len(first) < 4:
            continue
        fields = first.split(first[3])
        if len(fields) < 10 or not fields[9]:
            continue
        sender = _load_sender(session, fields[7].partition(".")[0][:16]) if "." in fields[7] else None
        if sender is not None:
            wanted.setdefault(sender.org_id, set()).add(fields[9][:199])
    known: dict = {"orgs": set(wanted)}
    from carepost.core.scoped_select import org_select

    for org_id, ids in wanted.items():
        # Which control ids are stored: a scoped Core statement in the organization's scope (the
        # usual answer is none); the ORM loads only those rows (replays, retries).
        session.info.pop("scope", None)
        session.info["org_id"] = org_id
        try:
            stored = sorted(org_select(session, _STORED_CONTROL_IDS, {"control_ids": sorted(ids)}).scalars())
            rows = session.scalars(select(EhrMessage).where(
                EhrMessage.org_id == org_id, EhrMessage.source == SOURCE_HL7,
                EhrMessage.control_id.in_(stored))) if stored else ()
            for row in rows:
                known[(org_id, row.control_id)] = row
        finally:
            session.info.pop("org_id", None)
            session.info["scope"] = "system"
    session.info[_KNOWN] = known


_STORED_CONTROL_IDS = select(EhrMessage.__table__.c.control_id).where(
    EhrMessage.__table__.c.source == SOURCE_HL7,
    EhrMessage.__table__.c.control_id.in_(bindparam("control_ids", expanding=True)))


def _authenticated(session: Session, data: bytes) -> tuple[Outcome | None, dict, Sender | None, object]:
    """Parse and authenticate one frame: (refusal or None, the ACK's header fields, sender, message)."""
    try:
        msg = hl7v2.read_message(data)
    except Hl7Problem as problem:
        return Outcome(problem.ack_code, "refused", reason_code=problem.reason_code, text=problem.text,
                       field=problem.field, problem=problem), _best_effort_header(data), None, None
    header = {"sending_application": msg.sending_application, "sending_facility": msg.sending_facility,
              "trigger": msg.trigger, "control_id": msg.control_id, "version": msg.version, "charset": msg.charset,
              "accept_ack": msg.accept_ack, "application_ack": msg.application_ack,
              "encoding": msg.encoding}
    session.info.pop("org_id", None)
    session.info["scope"] = "system"
    try:
        sender = authenticate(session, msg.security, msg.sending_facility)
    except Hl7Problem as problem:
        return Outcome(problem.ack_code, "refused", reason_code=problem.reason_code, text=problem.text,
                       field=problem.field, problem=problem), header, None, None
    return None, header, sender, msg


def _certificate_refusal(sender: Sender, presented: str | None, audit: list[dict], ip: str | None) -> Outcome | None:
    """AR for a message whose TLS session did not present the certificate pinned to the connection
    it claims (nothing of it stored; audited for that organization as ``ehr_message.refuse``)."""
    try:
        check_client_certificate(sender, presented)
    except Hl7Problem as problem:
        audit.append({"org_id": sender.org_id, "actor_type": "ehr_connection", "actor_id": sender.id,
                      "action": "ehr_message.refuse", "target_type": "mllp_connection", "target_id": sender.id,
                      "ip": ip, "outcome": "failure",
                      "details": {"source": SOURCE_HL7, "reason": problem.reason_code, "field": problem.field}})
        return Outcome(problem.ack_code, "refused", sender.org_id, reason_code=problem.reason_code, text=problem.text,
                       field=problem.field, problem=problem)
    return None


def _ingest_all(session: Session, frames: list[tuple[bytes, str | None]],
                certs: list[str | None] | None = None) -> list[bytes]:
    """A group's messages, set-wise (the listener's path; one message goes the same way).

    Messages are read and authenticated one by one (cheap), then handled per organization in
    rounds: a round ends where a control id repeats, so a message sent twice in one group is
    answered as a replay of the first, exactly as one by one. Within a round, each organization's
    mapped messages are matched and recorded together (:func:`_process_group`)."""
    from carepost.audit.service import append_many

    audit: list[dict] = []
    outcomes: list[tuple[Outcome, dict] | None] = [None] * len(frames)
    _prefetch(session, frames)
    peers = [peer for _, peer in frames]
    try:
        parsed = []
        for i, (frame_data, _peer) in enumerate(frames):
            refusal, header, sender, msg = _authenticated(session, frame_data)
            if refusal is None:
                refusal = _certificate_refusal(sender, certs[i] if certs is not None else None, audit, peers[i])
            if refusal is not None:
                outcomes[i] = (refusal, header)
            else:
                parsed.append((i, header, sender, msg))
        rounds: list[list] = [[]]
        seen: set = set()
        for item in parsed:
            key = (item[2].org_id, item[3].control_id[:199] if item[3].control_id else None)
            if key[1] is not None and key in seen:
                rounds.append([])
                seen = set()
            seen.add(key)
            rounds[-1].append(item)
            if item[3].trigger == "A40" and item[3].message_type == "ADT":
                # A merge moves MRNs: the messages after it are matched once it is done, as one by one.
                rounds.append([])
                seen = set()
        for group in rounds:
            by_org: dict[str, list] = {}
            for item in group:
                by_org.setdefault(item[2].org_id, []).append(item)
            for org_id, items in by_org.items():
                session.info.pop("scope", None)
                session.info["org_id"] = org_id
                works: list[tuple[int, dict, _Work]] = []
                for i, header, sender, msg in items:
                    work = _precheck(session, sender, msg, None)
                    if isinstance(work, Outcome):
                        outcomes[i] = (work, header)
                    else:
                        works.append((i, header, work))
                if works:
                    for (i, header, _), outcome in zip(works, _process_group(session, org_id, [w for _, _, w in works]),
                                                       strict=True):
                        outcomes[i] = (outcome, header)
                for i, _header, sender, _msg in items:
                    outcome = outcomes[i][0]
                    if outcome.status in ("recorded", "error"):
                        audit.append(_audit_item(org_id, "ehr_connection", sender.id, outcome, SOURCE_HL7,
                                                 ip=peers[i]))
    finally:
        session.info.pop(_KNOWN, None)
    by_org_audit: dict[str, list[dict]] = {}
    for item in audit:
        by_org_audit.setdefault(item["org_id"], []).append(item)
    for org_id, items in by_org_audit.items():
        session.info.pop("scope", None)
        session.info["org_id"] = org_id
        append_many(session, items)  # Core statements: one INSERT, the chain head locked once
    return [ack_for(outcome, header) for outcome, header in outcomes]


# --------------------------------------------------------------------------- the error queue


def list_messages(session: Session, org_id: str, *, status: str | None = "error", limit: int = 100,
                  before: str | None = None) -> list[EhrMessage]:
    if status is not None and status not in STATUSES:
        raise ValidationFailed(f"status is one of {', '.join(STATUSES)}.", field="status")
    q = select(EhrMessage).where(EhrMessage.org_id == org_id)
    if status:
        q = q.where(EhrMessage.status == status)
    if before:
        if not is_id(before):
            raise ValidationFailed("before is a message id.", field="before")
        anchor = session.get(EhrMessage, before)
        if anchor is None or anchor.org_id != org_id:
            raise NotFound("No such message.", field="before")
        q = q.where((EhrMessage.received_at < anchor.received_at)
                    | ((EhrMessage.received_at == anchor.received_at) & (EhrMessage.id < anchor.id)))
    return list(session.scalars(q.order_by(EhrMessage.received_at.desc(), EhrMessage.id.desc()).limit(limit)))


def get_message(session: Session, org_id: str, message_id: str) -> EhrMessage:
    row = session.get(EhrMessage, message_id) if is_id(message_id) else None
    if row is None or row.org_id != org_id:
        raise NotFound("No such EHR message.", field="message_id")
    return row


def message_out(row: EhrMessage) -> dict:
    """Ids, codes and the reason — never the message."""
    return {"id": row.id, "source": row.source, "message_type": row.message_type, "control_id": row.control_id,
            "status": row.status, "ack_code": row.ack_code, "event_name": row.event_name,
            "reason_code": row.reason_code, "reason": row.reason, "field": row.error_field,
            "contact_id": row.contact_id, "event_id": row.event_id, "connection_id": row.connection_id,
            "attempts": row.attempts, "next_attempt_at": _iso(row.next_attempt_at) if row.status == "queued" else None,
            "received_at": _iso(row.received_at), "updated_at": _iso(row.updated_at)}


def retry_message(session: Session, org_id: str, row: EhrMessage, *, actor_type: str, actor_id: str | None,
                  ip: str | None = None) -> Outcome:
    """Process a queued message again (after the patient was imported, a mapping fixed...). The
    caller commits; the retry is audited with its outcome."""
    from carepost.audit.service import record_many

    if row.status != "error" or row.raw_enc is None:
        raise ValidationFailed("Only a message in the error queue can be retried.", field="status")
    text = raw_text(session, row)
    if row.source == SOURCE_HL7:
        conn = session.get(MllpConnection, row.connection_id) if row.connection_id else None
        if conn is None or conn.org_id != org_id:
            raise ValidationFailed("The message's MLLP connection no longer exists.", field="connection_id")
        sender = Sender(conn.id, conn.org_id, conn.key_id, conn.secret_hash, frozenset(conn.sending_facilities),
                        conn.mrn_system, ZoneInfo(conn.time_zone or "UTC"))
        try:
            msg = hl7v2.read_message(text)
        except Hl7Problem as problem:
            outcome = Outcome(problem.ack_code, "error", org_id, row.id, reason_code=problem.reason_code,
                              text=problem.text, field=problem.field, problem=problem)
            row.attempts += 1
        else:
            if row.control_id is None and msg.control_id:
                # a duplicate control id kept aside: retried, it is still a duplicate unless the first went away
                existing = find_message(session, org_id, SOURCE_HL7, msg.control_id[:199])
                if existing is None:
                    row.control_id = msg.control_id[:199]
            outcome = process_hl7(session, sender, msg, row=row, retry=True) if row.control_id or not msg.control_id \
                else _still_duplicate(session, row)
    else:
        from carepost.ehr import fhir as ehr_fhir

        outcome = ehr_fhir.retry(session, org_id, row, text)
    item = _audit_item(org_id, actor_type, actor_id, outcome, row.source, ip=ip)
    if outcome.status != "recorded":
        item["action"] = "ehr_message.retry"
    record_many(session, [item])
    return outcome


def _still_duplicate(session: Session, row: EhrMessage) -> Outcome:
    row.attempts += 1
    row.updated_at = clock.now()
    return Outcome("AE", "error", row.org_id, row.id, reason_code=row.reason_code, text=row.reason,
                   field=row.error_field)


def discard_message(session: Session, row: EhrMessage) -> None:
    """Take a message out of the error queue for good (its raw text is destroyed)."""
    if row.status != "error":
        raise ValidationFailed("Only a message in the error queue can be discarded.", field="status")
    row.status, row.raw_enc, row.updated_at = "discarded", None, clock.now()
    session.flush()


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
