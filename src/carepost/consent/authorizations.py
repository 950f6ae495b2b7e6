"""HIPAA authorizations (45 CFR 164.508): versioned texts and the signed authorizations of patients.

* An :class:`AuthorizationText` holds every core element and required statement as a structured
  field, per language, plus the rendered plain text and a SHA-256 hash of both. Drafts may be
  incomplete; publishing refuses a text missing any element (:func:`check_completeness`).
  A published version never changes: editing makes a new draft version.
* An :class:`Authorization` records what was signed (text version and hash, language), the
  signature (typed name or drawn image), when, how, from where, by whom (personal
  representative and authority), and the expiry. Revocation is immediate: eligibility reads the
  row in the same database the revocation wrote, in the same transaction order.
* The patient gets a copy (164.508(c)(4)): an email through the delivery pipeline when a mailer
  is registered, and always a link to the copy page (``/t/authorizations/<token>``).

Functions take a session and flush; callers commit and write audit events for staff and API
callers (patient actions through links are audited here, where the patient is known).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from carepost.core import purposes
from carepost.consent.models import (
    AUTHORIZATION_METHODS,
    BACKDATE_WINDOW_DAYS,
    EXPIRATION_EVENTS,
    RECORDED_METHODS,
    SCAN_MAX_BYTES,
    SCAN_TYPES,
    WITNESSED_METHODS,
    Authorization,
    AuthorizationScan,
    AuthorizationText,
)
from carepost.consent.texts import DEFAULT_TEXTS, HEADINGS
from carepost.core import clock
from carepost.core.crypto import get_keyring
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id

# Elements in the order they are rendered, with the rule that requires each.
ELEMENTS: dict[str, str] = {
    "title": "plain-language title (164.508(c)(3))",
    "phi_description": "164.508(c)(1)(i): a specific and meaningful description of the information",
    "disclosers": "164.508(c)(1)(ii): who may make the disclosure",
    "recipients": "164.508(c)(1)(iii): who may receive the information",
    "purpose_description": "164.508(c)(1)(iv): a description of each purpose",
    "remuneration": "164.508(a)(3)(ii): a statement that the covered entity receives financial remuneration",
    "expiration": "164.508(c)(1)(v): an expiration date or event",
    "right_to_revoke": "164.508(c)(2)(i): the right to revoke in writing, and how",
    "conditioning": "164.508(c)(2)(ii): treatment, payment, enrollment or eligibility not conditioned on signing",
    "redisclosure": "164.508(c)(2)(iii): information disclosed may be re-disclosed and no longer protected",
    "copy_statement": "164.508(c)(4): the individual receives a copy (optional statement)",
    "signature_statement": "164.508(c)(1)(vi): signature and date; a representative's authority",
}
OPTIONAL_ELEMENTS = {"copy_statement", "remuneration"}
LANGUAGES = {"en": "English", "es": "Español"}
MIN_ELEMENT_CHARS = 15
MAX_ELEMENT_CHARS = 5000
SIGNATURE_IMAGE_MAX_BYTES = 200_000
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_PNG = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- texts


def required_elements(purpose: str) -> list[str]:
    req = purposes.requirements(purpose)
    return [e for e in ELEMENTS if e not in OPTIONAL_ELEMENTS or (e == "remuneration" and req.remuneration_statement_required)]


def _check_text_purpose(purpose: str) -> str:
    purposes.check_purpose(purpose)
    if purpose not in purposes.AUTHORIZATION_PURPOSES:
        raise ValidationFailed("This purpose needs no authorization, so it has no authorization text.", field="purpose")
    return purpose


def clean_elements(elements) -> dict[str, dict[str, str]]:
    """Structure check (drafts may be incomplete): {language: {element: text}}, known languages
    and elements only, text without control characters, within length limits."""
    if not isinstance(elements, dict) or not elements:
        raise ValidationFailed("Give the text's elements per language, e.g. {\"en\": {...}}.", field="elements")
    out: dict[str, dict[str, str]] = {}
    for lang, values in elements.items():
        if lang not in LANGUAGES:
            raise ValidationFailed(f"Languages available: {', '.join(LANGUAGES)}.", field="elements")
        if not isinstance(values, dict):
            raise ValidationFailed("Each language holds its elements as an object.", field=f"elements.{lang}")
        clean: dict[str, str] = {}
        for key, value in values.items():
            if key not in ELEMENTS:
                raise ValidationFailed("Unknown element.", field=f"elements.{lang}.{str(key)[:40]}")
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValidationFailed("Expected text.", field=f"elements.{lang}.{key}")
            text = value.strip().replace("\r\n", "\n")
            if len(text) > MAX_ELEMENT_CHARS:
                raise ValidationFailed(f"At most {MAX_ELEMENT_CHARS} characters.", field=f"elements.{lang}.{key}")
            if _CONTROL.search(text):
                raise ValidationFailed("Control characters are not allowed.", field=f"elements.{lang}.{key}")
            if text:
                clean[key] = text
        out[lang] = clean
    return out


def check_completeness(purpose: str, elements: dict) -> list[dict]:
    """Every missing element, per language: ``[{"language", "element", "rule", "message"}]``.
    English is required; every language offered must be complete."""
    _check_text_purpose(purpose)
    elements = clean_elements(elements) if elements else {}
    missing: list[dict] = []
    if "en" not in elements:
        missing.append({"language": "en", "element": "*", "rule": "plain language",
                        "message": "An English version is required."})
    for lang, values in elements.items():
        for element in required_elements(purpose):
            text = values.get(element, "")
            if len(text) < (3 if element == "title" else MIN_ELEMENT_CHARS):
                missing.append({"language": lang, "element": element, "rule": ELEMENTS[element],
                                "message": f"{LANGUAGES[lang]}: missing {ELEMENTS[element]}."})
    return missing


def render(elements: dict[str, str], language: str) -> str:
    """The plain text a patient reads and signs."""
    headings = HEADINGS.get(language, HEADINGS["en"])
    parts = [elements.get("title", "")]
    for key in ELEMENTS:
        if key != "title" and elements.get(key):
            parts.append(f"{headings[key]}\n{elements[key]}")
    return "\n\n".join(p for p in parts if p) + "\n"


def _hash(purpose: str, version: int, elements: dict, rendered: dict) -> str:
    blob = json.dumps({"purpose": purpose, "version": version, "elements": elements, "rendered": rendered},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def text_hash(text: AuthorizationText) -> str:
    """Recompute a text's hash (evidence exports compare it with what was signed)."""
    return _hash(text.purpose, text.version, text.elements, text.rendered)


def _fill(text: AuthorizationText, elements: dict) -> None:
    text.elements = elements
    text.rendered = {lang: render(values, lang) for lang, values in elements.items()}
    text.title = (elements.get("en") or next(iter(elements.values()), {})).get("title", "")[:200] or "Untitled"
    text.content_hash = _hash(text.purpose, text.version, text.elements, text.rendered)


def create_text(session: Session, org_id: str, purpose: str, elements: dict, *, created_by: str | None = None) -> AuthorizationText:
    """A new draft version of the purpose's text."""
    _check_text_purpose(purpose)
    clean = clean_elements(elements)
    version = (session.scalar(select(func.max(AuthorizationText.version)).where(
        AuthorizationText.org_id == org_id, AuthorizationText.purpose == purpose)) or 0) + 1
    text = AuthorizationText(id=new_id(), org_id=org_id, purpose=purpose, version=version, status="draft",
                             created_by=created_by, created_at=clock.now())
    _fill(text, clean)
    session.add(text)
    session.flush()
    return text


def update_text(session: Session, org_id: str, text_id: str, elements: dict) -> AuthorizationText:
    """Change a draft. A published or retired version never changes (patients signed it)."""
    text = get_text(session, org_id, text_id)
    if text.status != "draft":
        raise Conflict("A published text cannot change; create a new version.", field="text_id")
    _fill(text, clean_elements(elements))
    text.updated_at = clock.now()
    session.flush()
    return text


def publish_text(session: Session, org_id: str, text_id: str, *, published_by: str | None = None) -> AuthorizationText:
    """Make a draft the purpose's current text; refused while any element is missing."""
    text = get_text(session, org_id, text_id)
    if text.status == "published":
        return text
    if text.status != "draft":
        raise Conflict("Only a draft can be published.", field="text_id")
    missing = check_completeness(text.purpose, text.elements)
    if missing:
        first = missing[0]
        raise ValidationFailed(
            "The text cannot be published: " + "; ".join(m["message"] for m in missing[:5]),
            field=f"elements.{first['language']}.{first['element']}", code="incomplete_authorization_text",
        )
    session.execute(update(AuthorizationText).where(
        AuthorizationText.org_id == org_id, AuthorizationText.purpose == text.purpose,
        AuthorizationText.status == "published").values(status="retired"))
    text.status = "published"
    text.published_at = clock.now()
    text.published_by = published_by
    session.flush()
    return text


def get_text(session: Session, org_id: str, text_id: str, field: str = "text_id") -> AuthorizationText:
    text = session.get(AuthorizationText, text_id) if text_id and is_id(text_id) else None
    if text is None or text.org_id != org_id:
        raise NotFound("No such authorization text.", field=field)
    return text


def current_text(session: Session, org_id: str, purpose: str) -> AuthorizationText | None:
    return session.scalars(select(AuthorizationText).where(
        AuthorizationText.org_id == org_id, AuthorizationText.purpose == purpose,
        AuthorizationText.status == "published").order_by(AuthorizationText.version.desc())).first()


def list_texts(session: Session, org_id: str, purpose: str | None = None) -> list[AuthorizationText]:
    q = select(AuthorizationText).where(AuthorizationText.org_id == org_id)
    if purpose:
        q = q.where(AuthorizationText.purpose == purpose)
    return list(session.scalars(q.order_by(AuthorizationText.purpose, AuthorizationText.version.desc())))


def text_dict(text: AuthorizationText, *, full: bool = True) -> dict:
    out = {
        "id": text.id, "purpose": text.purpose, "version": text.version, "status": text.status, "title": text.title,
        "languages": sorted(text.elements), "content_hash": text.content_hash,
        "created_at": clock.aware(text.created_at).isoformat(),
        "published_at": clock.aware(text.published_at).isoformat() if text.published_at else None,
        "missing": check_completeness(text.purpose, text.elements) if text.status == "draft" else [],
    }
    if full:
        out["elements"] = text.elements
        out["rendered"] = text.rendered
    return out


def ensure_default_texts(session: Session, org_id: str) -> list[AuthorizationText]:
    """Give an organization a complete, published default text (English and Spanish) for each
    purpose that needs an authorization, for its compliance officer to review. Idempotent."""
    from carepost.accounts.models import Organization

    org = session.get(Organization, org_id)
    name = org.name if org else "the organization"
    made = []
    for purpose, langs in DEFAULT_TEXTS.items():
        exists = session.scalar(select(AuthorizationText.id).where(
            AuthorizationText.org_id == org_id, AuthorizationText.purpose == purpose).limit(1))
        if exists:
            continue
        elements = {lang: {k: v.replace("{organization}", name) for k, v in values.items()} for lang, values in langs.items()}
        text = create_text(session, org_id, purpose, elements, created_by="system:default")
        publish_text(session, org_id, text.id, published_by="system:default")
        made.append(text)
    return made


# --------------------------------------------------------------------------- signed authorizations


def _encrypt(session: Session, org_id: str, column: str, row_id: str, value: str | bytes) -> bytes:
    return get_keyring().encrypt(session, org_id, Authorization.__tablename__, column, row_id, value)


def _decrypt(session: Session, row: Authorization, column: str) -> bytes | None:
    blob = getattr(row, column + "_enc")
    if blob is None:
        return None
    return get_keyring().decrypt(session, row.org_id, Authorization.__tablename__, column, row.id, blob)


def _signature_image(data: str) -> bytes:
    """A drawn signature: a PNG as a ``data:image/png;base64,`` URL (what a canvas gives)."""
    prefix = "data:image/png;base64,"
    if not isinstance(data, str) or not data.startswith(prefix):
        raise ValidationFailed("A drawn signature must be a PNG data URL.", field="signature.image")
    try:
        raw = base64.b64decode(data[len(prefix):], validate=True)
    except ValueError:
        raise ValidationFailed("The drawn signature is not valid base64.", field="signature.image") from None
    if len(raw) > SIGNATURE_IMAGE_MAX_BYTES:
        raise ValidationFailed("The drawn signature is too large.", field="signature.image")
    if not raw.startswith(_PNG):
        raise ValidationFailed("The drawn signature is not a PNG image.", field="signature.image")
    return raw


def _clean_line(value, field: str, max_len: int = 200, required: bool = True) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValidationFailed("This field is required.", field=field)
        return None
    if not isinstance(value, str):
        raise ValidationFailed("Expected text.", field=field)
    text = " ".join(value.split())
    if len(text) > max_len:
        raise ValidationFailed(f"At most {max_len} characters.", field=field)
    if _CONTROL.search(text):
        raise ValidationFailed("Control characters are not allowed.", field=field)
    return text


def _language_for(contact, text: AuthorizationText, language: str | None) -> str:
    if language:
        if language not in text.elements:
            raise ValidationFailed("This text has no version in that language.", field="language")
        return language
    preferred = (contact.preferred_language or "en").split("-")[0].lower() if contact is not None else "en"
    return preferred if preferred in text.elements else ("en" if "en" in text.elements else next(iter(text.elements)))


def check_scan(content: bytes, content_type: str | None = None) -> str:
    """The scan of a paper authorization: PDF, PNG or JPEG as its first bytes say (a declared
    type must agree), at most :data:`SCAN_MAX_BYTES`. Returns the content type."""
    if not isinstance(content, (bytes, bytearray)) or not content:
        raise ValidationFailed("The scan is empty.", field="scan")
    if len(content) > SCAN_MAX_BYTES:
        raise ValidationFailed(f"The scan is larger than {SCAN_MAX_BYTES // (1024 * 1024)} MB.", field="scan")
    found = next((ctype for ctype, magic in SCAN_TYPES.items() if bytes(content[:16]).startswith(magic)), None)
    if found is None:
        raise ValidationFailed("The scan must be a PDF, PNG or JPEG file.", field="scan")
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared in ("image/jpg", "image/pjpeg"):
        declared = "image/jpeg"
    if declared and declared != "application/octet-stream" and declared != found:
        raise ValidationFailed(f"The scan's content is {found}, not {declared[:40]}.", field="scan")
    return found


def get_scan(session: Session, row: Authorization) -> tuple[bytes, AuthorizationScan]:
    """The decrypted scan of a paper authorization (PHI: the caller audits)."""
    stored = session.get(AuthorizationScan, row.scan_id) if row.scan_id else None
    if stored is None or stored.org_id != row.org_id:
        raise NotFound("This authorization has no scan.", field="authorization_id")
    content = get_keyring().decrypt(session, row.org_id, AuthorizationScan.__tablename__, "content", stored.id,
                                    stored.content_enc)
    return content, stored


def record_expiration_event(session: Session, org_id: str, authorization_id: str,
                            occurred_at: datetime | None = None) -> Authorization:
    """The expiration event an authorization names has happened: it ends then (and stays ended)."""
    row = get_authorization(session, org_id, authorization_id)
    if not row.expiration_event:
        raise ValidationFailed("This authorization expires on a date, not at an event.", field="authorization_id")
    if row.expiration_event_at is not None:
        raise Conflict("The expiration event was already recorded.", field="authorization_id")
    now = clock.now()
    at = clock.aware(occurred_at) if occurred_at else now
    if at > now + timedelta(minutes=5):
        raise ValidationFailed("The event cannot be in the future.", field="occurred_at")
    if at < clock.aware(row.signed_at):
        raise ValidationFailed("The event cannot come before the signing date.", field="occurred_at")
    row.expiration_event_at = now
    row.expires_at = at
    session.flush()
    return row


def record_authorization(
    session: Session,
    org_id: str,
    *,
    contact_id: str,
    purpose: str,
    method: str,
    text_id: str | None = None,
    topic_id: str | None = None,
    signature_name: str | None = None,
    signature_image: str | None = None,
    signed_at: datetime | None = None,
    expires_at: datetime | None = None,
    expiration_event: str | None = None,
    representative_name: str | None = None,
    representative_authority: str | None = None,
    language: str | None = None,
    ip: str | None = None,
    user_agent: str | None = None,
    created_by: str | None = None,
    send_copy: bool = True,
    backdate_reason: str | None = None,
    scan: bytes | None = None,
    scan_content_type: str | None = None,
) -> Authorization:
    """Record a signed authorization (every check first; nothing is stored when one fails).

    ``method`` is one of :data:`WITNESSED_METHODS` only when CarePost's own flow (a hosted form,
    the portal, an email confirmation link) witnessed the signing; ``ip`` and ``user_agent`` are
    then the patient's. For :data:`RECORDED_METHODS` (API and staff) they are the recording
    actor's own request facts, kept as such (``"of": "recorder"``); ``paper`` needs the ``scan``;
    a signing date more than :data:`BACKDATE_WINDOW_DAYS` back needs a ``backdate_reason`` and
    flags the row ``backdated``."""
    from carepost.consent import service

    contact = service._contact(session, contact_id)
    purposes.check_purpose(purpose)
    if purpose not in purposes.AUTHORIZATION_PURPOSES:
        raise ValidationFailed("This purpose needs no authorization.", field="purpose")
    if method not in AUTHORIZATION_METHODS:
        raise ValidationFailed(f"method must be one of {', '.join(RECORDED_METHODS)}.", field="method")
    witnessed = method in WITNESSED_METHODS
    scan_type = None
    if method == "paper":
        if not scan:
            raise ValidationFailed("A paper authorization needs the uploaded scan of the signed page "
                                   "(PDF, PNG or JPEG).", field="scan")
        scan_type = check_scan(scan, scan_content_type)
    elif scan is not None:
        raise ValidationFailed("A scan is kept only with a paper authorization (method paper).", field="scan")
    if text_id:
        text = get_text(session, org_id, text_id)
        if text.purpose != purpose:
            raise ValidationFailed("This text is for another purpose.", field="text_id")
        if text.status != "published":
            raise ValidationFailed("Only the published text of a purpose can be signed.", field="text_id")
    else:
        text = current_text(session, org_id, purpose)
        if text is None:
            raise ValidationFailed("This organization has no published authorization text for the purpose.", field="text_id")
    topic = service.get_topic(session, org_id, topic_id) if topic_id else None
    if (signature_name is None) == (signature_image is None):
        raise ValidationFailed("Sign with a typed name or a drawn signature (one of them).", field="signature.name")
    if signature_name is not None:
        sig_kind, sig_value = "typed", _clean_line(signature_name, "signature.name").encode()
    else:
        sig_kind, sig_value = "drawn", _signature_image(signature_image)
    now = clock.now()
    signed = clock.aware(signed_at) if signed_at else now
    if signed > now + timedelta(minutes=5):
        raise ValidationFailed("The signing date is in the future.", field="signature.signed_at")
    # CarePost's own flows set the signing time themselves (a form's is when it was sent, before
    # the email confirmation); a date an API client or staff enter is checked.
    backdated = not witnessed and signed < now - timedelta(days=BACKDATE_WINDOW_DAYS)
    reason = _clean_line(backdate_reason, "backdate_reason", 500, required=False)
    if backdated and reason is None:
        raise ValidationFailed(f"The signing date is more than {BACKDATE_WINDOW_DAYS} days ago: give a "
                               "backdate_reason (why it is recorded only now).", field="backdate_reason")
    if reason is not None and not backdated:
        raise ValidationFailed(f"Only a signing date more than {BACKDATE_WINDOW_DAYS} days ago takes a "
                               "backdate_reason.", field="backdate_reason")
    event = expiration_event.strip() if isinstance(expiration_event, str) and expiration_event.strip() else None
    if event is not None and event not in EXPIRATION_EVENTS:
        raise ValidationFailed("expiration_event must be one of " + ", ".join(EXPIRATION_EVENTS)
                               + " (or give expires_at).", field="expiration_event")
    if event is not None and expires_at is not None:
        raise ValidationFailed("Give an expiry date or an expiration event, not both.", field="expiration_event")
    if event == "age_of_majority" and not representative_name:
        raise ValidationFailed("age_of_majority ends an authorization a personal representative signed for a minor.",
                               field="expiration_event")
    if expires_at is not None:
        expires = clock.aware(expires_at)
        if expires <= signed:
            raise ValidationFailed("The expiry must come after the signing date.", field="expires_at")
        if expires <= now:
            raise ValidationFailed("This authorization would already have expired.", field="expires_at")
    elif event is None:
        # 164.508(c)(1)(v): an expiration date or event is a core element; the default texts say
        # "two years after the day you sign" (the organization's setting).
        months = service.consent_settings(session, org_id)["authorization_default_months"]
        expires = signed + timedelta(days=round(months * 30.4375))
    else:
        expires = None
    rep_name = _clean_line(representative_name, "representative.name", required=False)
    rep_authority = _clean_line(representative_authority, "representative.authority", required=False)
    if rep_name and not rep_authority:
        # 164.508(c)(1)(vi): a representative's signature comes with a description of their authority.
        raise ValidationFailed("Describe the representative's authority to act for the patient.", field="representative.authority")
    if rep_authority and not rep_name:
        raise ValidationFailed("Name the personal representative.", field="representative.name")
    lang = _language_for(contact, text, language)
    indexes = service.contact_email_indexes(session, org_id, [contact.id]).get(contact.id, [])
    row = Authorization(
        id=new_id(), org_id=org_id, contact_id=contact.id, subject_index=indexes[0] if indexes else None,
        purpose=purpose, topic_id=topic.id if topic else None, text_id=text.id, text_version=text.version,
        text_hash=text.content_hash, language=lang, signature_kind=sig_kind, signed_at=signed, method=method,
        expires_at=expires, expiration_event=event, status="active", created_by=created_by, created_at=now,
        backdated=backdated,
    )
    row.signature_enc = _encrypt(session, org_id, "signature", row.id, sig_value)
    if ip or user_agent:
        row.evidence_enc = _encrypt(session, org_id, "evidence", row.id, json.dumps(
            {"ip": ip, "user_agent": (user_agent or "")[:300], "of": "patient" if witnessed else "recorder"}))
    if reason is not None:
        row.backdate_reason_enc = _encrypt(session, org_id, "backdate_reason", row.id, reason)
    if scan_type is not None:
        stored = AuthorizationScan(id=new_id(), org_id=org_id, content_type=scan_type, size=len(scan),
                                   sha256=hashlib.sha256(scan).hexdigest(), created_by=created_by, created_at=now)
        stored.content_enc = get_keyring().encrypt(session, org_id, AuthorizationScan.__tablename__, "content",
                                                   stored.id, scan)
        session.add(stored)
        session.flush()
        row.scan_id = stored.id
    if rep_name:
        row.representative_enc = _encrypt(session, org_id, "representative", row.id,
                                          json.dumps({"name": rep_name, "authority": rep_authority}))
    session.add(row)
    session.flush()
    if send_copy:
        send_copy_to_patient(session, row, text)
    from carepost.consent.service import announce

    announce(session, "authorization.signed", org_id, _event_data(row))
    return row


def _event_data(row: Authorization) -> dict:
    """What an ``authorization.*`` webhook carries: ids, codes and dates, never the text or the
    signature."""
    def ts(value):
        return clock.aware(value).isoformat().replace("+00:00", "Z") if value else None

    return {"authorization_id": row.id, "contact_id": row.contact_id, "purpose": row.purpose, "topic_id": row.topic_id,
            "status": row.status, "method": row.method, "signed_at": ts(row.signed_at),
            "expires_at": ts(row.expires_at), "revoked_at": ts(row.revoked_at),
            "revoked_by_type": row.revoked_by_type}


def send_copy_to_patient(session: Session, row: Authorization, text: AuthorizationText | None = None) -> str:
    """164.508(c)(4): the patient gets a copy. By email through the delivery pipeline when one is
    registered (``copy_delivered = "email"``), else the copy link is what they get (``link``)."""
    from carepost.consent import service

    text = text or session.get(AuthorizationText, row.text_id)
    link = copy_url(session, row)
    body = (text.rendered.get(row.language) or text.rendered.get("en") or "")
    body += f"\n\nSigned: {clock.aware(row.signed_at):%Y-%m-%d}"
    if row.expires_at:
        body += f"\nExpires: {clock.aware(row.expires_at):%Y-%m-%d}"
    body += f"\n\nYour signed copy and the revocation form: {link}\n"
    message_id = None
    if row.contact_id:
        message_id = service.send_patient_email(session, service.PatientEmail(
            org_id=row.org_id, contact_id=row.contact_id, kind="authorization_copy",
            subject="Your copy of the authorization you signed", text=body))
    row.copy_delivered = "email" if message_id else "link"
    row.copy_message_id = message_id
    session.flush()
    return link


COPY_LINK_DAYS = 90


def copy_url(session: Session, row: Authorization) -> str:
    from carepost.consent import service, tokens

    token = tokens.make(session, "a", row.org_id, "a", row.id, expires_at=clock.now() + timedelta(days=COPY_LINK_DAYS))
    return service.public_url(f"/t/authorizations/{token}")


def revocation_url(session: Session, row: Authorization) -> str:
    """A revocation link that never expires (the right to revoke does not)."""
    from carepost.consent import service, tokens

    return service.public_url("/t/revoke/" + tokens.make(session, "r", row.org_id, "a", row.id))


def get_authorization(session: Session, org_id: str, authorization_id: str) -> Authorization:
    row = session.get(Authorization, authorization_id) if authorization_id and is_id(authorization_id) else None
    if row is None or row.org_id != org_id:
        raise NotFound("No such authorization.", field="authorization_id")
    return row


def revoke_authorization(session: Session, org_id: str, authorization_id: str, *, by_type: str, by: str | None,
                         method: str) -> tuple[Authorization, bool]:
    """Revoke at once (164.508(b)(5)). Returns (row, changed); revoking twice changes nothing."""
    if by_type not in ("patient", "staff", "api"):
        raise ValueError("by_type")
    row = get_authorization(session, org_id, authorization_id)
    if row.status == "revoked":
        return row, False
    now = clock.now()
    row.status = "revoked"
    row.revoked_at = now
    row.revoked_by_type = by_type
    row.revoked_by = by
    row.revocation_method = method[:12]
    session.flush()
    from carepost.consent.service import announce

    announce(session, "authorization.revoked", org_id, _event_data(row))
    return row, True


def state_at(row: Authorization, at: datetime | None = None) -> str:
    """valid | expired | revoked at ``at`` (now by default)."""
    at = at or clock.now()
    if row.status == "revoked" and row.revoked_at is not None and clock.aware(row.revoked_at) <= at:
        return "revoked"
    if row.expires_at is not None and clock.aware(row.expires_at) <= at:
        return "expired"
    return "valid"


def authorizations_of(session: Session, org_id: str, contact_id: str) -> list[Authorization]:
    return list(session.scalars(select(Authorization).where(
        Authorization.org_id == org_id, Authorization.contact_id == contact_id).order_by(Authorization.signed_at.desc())))


def authorization_dict(session: Session, row: Authorization, *, include_evidence: bool = False) -> dict:
    """References and dates; with ``include_evidence`` the decrypted signature, IP address, user
    agent and representative too (PHI: the caller audits)."""

    def ts(v):
        return clock.aware(v).isoformat() if v else None

    out = {
        "id": row.id, "contact_id": row.contact_id, "purpose": row.purpose, "topic_id": row.topic_id,
        "text_id": row.text_id, "text_version": row.text_version, "text_hash": row.text_hash,
        "language": row.language, "signature_kind": row.signature_kind, "signed_at": ts(row.signed_at),
        "method": row.method, "expires_at": ts(row.expires_at), "expiration_event": row.expiration_event,
        "status": state_at(row), "revoked_at": ts(row.revoked_at), "revoked_by_type": row.revoked_by_type,
        "revocation_method": row.revocation_method, "copy_delivered": row.copy_delivered,
        "signed_by_representative": row.representative_enc is not None, "created_at": ts(row.created_at),
        "expiration_event_recorded_at": ts(row.expiration_event_at),
        "backdated": bool(row.backdated), "scan": None,
    }
    if row.scan_id:
        stored = session.get(AuthorizationScan, row.scan_id)
        if stored is not None:
            out["scan"] = {"content_type": stored.content_type, "size": stored.size, "sha256": stored.sha256}
    if include_evidence:
        sig = _decrypt(session, row, "signature") or b""
        out["signature"] = (sig.decode() if row.signature_kind == "typed"
                            else "data:image/png;base64," + base64.b64encode(sig).decode())
        evidence = json.loads(_decrypt(session, row, "evidence") or b"{}")
        out["ip"] = evidence.get("ip")
        out["user_agent"] = evidence.get("user_agent")
        # Rows recorded before issue 9 item 12 carry no "of"; witnessed methods' are the patient's.
        out["evidence_of"] = evidence.get("of") or ("patient" if row.method in WITNESSED_METHODS else "unknown")
        reason = _decrypt(session, row, "backdate_reason")
        out["backdate_reason"] = reason.decode() if reason else None
        rep = json.loads(_decrypt(session, row, "representative") or b"{}")
        out["representative"] = rep or None
    return out


def evidence(session: Session, org_id: str, contact_id: str) -> dict:
    """Everything needed to prove a patient's consent history: each authorization with the exact
    text signed (and whether its hash still matches), signature and evidence, revocations,
    subscriptions and address-level opt-outs."""
    from carepost.consent import service

    contact = service._contact(session, contact_id)
    items = []
    for row in authorizations_of(session, org_id, contact.id):
        text = session.get(AuthorizationText, row.text_id)
        data = authorization_dict(session, row, include_evidence=True)
        data["text"] = text.rendered.get(row.language) or ""
        data["text_title"] = text.title
        data["hash_verified"] = text_hash(text) == row.text_hash
        items.append(data)
    indexes = service.contact_email_indexes(session, org_id, [contact.id]).get(contact.id, [])
    supp = []
    if indexes:
        from carepost.consent.models import Suppression

        supp = [{"reason": s.reason, "scope": s.scope, "topic_id": s.topic_id, "source": s.source,
                 "created_at": clock.aware(s.created_at).isoformat()}
                for s in session.scalars(select(Suppression).where(Suppression.org_id == org_id,
                                                                   Suppression.address_index.in_(indexes)))]
    return {
        "contact_id": contact.id, "generated_at": clock.now().isoformat(), "authorizations": items,
        "subscriptions": [service.subscription_dict(s) for s in service.subscriptions_of(session, org_id, contact.id)],
        "suppressions": supp,
        "topics": {t.id: t.name for t in service.list_topics(session, org_id, include_archived=True)},
    }


def evidence_html(session: Session, org_id: str, contact_id: str) -> str:
    """The evidence as one self-contained HTML page (no scripts, no remote assets)."""
    from carepost.web.rendering import templates

    data = evidence(session, org_id, contact_id)
    return templates.env.get_template("consent/evidence.html").render(
        data=data, purposes=purposes.PURPOSES, events=EXPIRATION_EVENTS, backdate_days=BACKDATE_WINDOW_DAYS)
