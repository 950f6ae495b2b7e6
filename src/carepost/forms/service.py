"""Secure forms: definitions, the hosted form's tokens, submissions and their effects.

Plain functions taking a session; callers commit. The rules that matter:

* **Everything a person types is encrypted at rest** (one JSON document per submission, plus the
  drawn signature as PNG), bound to the organization, table, column and row.
* **An unverified submission never changes an existing contact or signs anything on their
  behalf.** When the email address of a submission matches a contact (through the email blind
  index), the submission waits (``pending_confirmation``) until the person follows the signed,
  expiring link sent to that address; only then are the contact's fields updated and the
  authorization and subscriptions recorded. When it matches nobody, the contact is created at
  once (there is nobody whose data could be overwritten), but an authorization and
  subscriptions still wait for the confirmation: a signature is only worth something if it came
  from the owner of the address, and double opt-in is what mailbox providers expect.
* **Spam protection without third parties**: a honeypot field, a per-IP rate limit, and a
  minimum fill time measured from a signed render timestamp (``_rt``) the hosted form carries.
* **Survey mode** creates and changes no contact; choice and rating answers are tallied without a
  link to the submission, so results are computed in SQL and cannot be traced to a person.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from carepost.core import clock
from carepost.core.config import get_settings
from carepost.core.crypto import get_keyring
from carepost.core.database import ALL_ORGANIZATIONS
from carepost.core.errors import CarePostError, Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id, new_id
from carepost.core.logging import get_logger
from carepost.forms.models import Form, FormSubmission, SurveyTally
from carepost.forms.schemas import FormIn

log = get_logger("carepost.forms")

TABLE = "form_submissions"
HONEYPOT = "website"  # a name bots love to fill; hidden from people and from screen readers
RENDER_TOKEN = "_rt"
FIELD_PREFIX = "f_"
RATE_WINDOW_SECONDS = 600
MAX_SIGNATURE_PNG = 150_000
MAX_SIGNATURE_SIDE = 3000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CONTROL_LINE = re.compile(r"[\x00-\x1f\x7f]")


class LinkExpired(CarePostError):
    status_code = 410
    code = "link_expired"


class SpamSuspected(CarePostError):
    """The submission looks automated (too fast, or no valid render token)."""

    status_code = 422
    code = "spam_suspected"


# --------------------------------------------------------------------------- scoping helpers


def scope_to(session: Session, org_id: str) -> None:
    """Scope a public request's session to the organization that owns the form or link."""
    session.info.pop("scope", None)
    session.info["org_id"] = org_id


def public_url(form: Form) -> str:
    return f"{get_settings().base_url}/f/{form.slug or form.public_id}"


# --------------------------------------------------------------------------- consent hooks
#
# The consent capability (topics, authorization texts, authorizations, subscriptions) is
# reached only through its service; these wrappers keep the coupling in one place.


def _consent():
    from carepost.consent import service as consent_service

    return consent_service


def _authorizations():
    from carepost.consent import authorizations

    return authorizations


def check_topic(session: Session, org_id: str, topic_id: str, field_name: str) -> None:
    consent = _consent()
    try:
        consent.get_topic(session, org_id, topic_id, field_name)
    except NotFound:
        raise ValidationFailed("No such subscription topic in this organization.", field=field_name) from None


def check_authorization_block(session: Session, org_id: str, purpose: str, text_id: str | None, field_name: str) -> None:
    """The purpose must need an authorization (164.508(a)(3)) and a published text must exist."""
    from carepost.core import purposes

    if purpose not in purposes.PURPOSES:
        raise ValidationFailed("Unknown communication purpose.", field=f"{field_name}.purpose")
    if purpose not in purposes.AUTHORIZATION_PURPOSES:
        raise ValidationFailed("This purpose needs no authorization; choose a marketing purpose.", field=f"{field_name}.purpose")
    if authorization_text(session, org_id, purpose, text_id, field_name) is None:
        raise ValidationFailed("There is no published authorization text for this purpose.", field=f"{field_name}.text_id")


def authorization_text(session: Session, org_id: str, purpose: str, text_id: str | None, field_name: str = "authorization"):
    """The text an authorization block shows: the chosen version while it is published, else the
    purpose's current (published) text."""
    auth = _authorizations()
    if text_id:
        try:
            text = auth.get_text(session, org_id, text_id)
        except NotFound:
            raise ValidationFailed("No such authorization text.", field=f"{field_name}.text_id") from None
        if text.purpose != purpose:
            raise ValidationFailed("The authorization text is for another purpose.", field=f"{field_name}.text_id")
        if text.status != "published":
            raise ValidationFailed("This version of the authorization text is no longer published; choose the current one.",
                                   field=f"{field_name}.text_id")
        return text
    return auth.current_text(session, org_id, purpose)


def text_body(text, language: str) -> tuple[str, str]:
    """(language, plain text) of a text in the form's language, English otherwise."""
    rendered = text.rendered or {}
    lang = language if language in rendered else ("en" if "en" in rendered else next(iter(rendered), language))
    return lang, rendered.get(lang, "")


# --------------------------------------------------------------------------- definitions


def _check_definition(session: Session, org_id: str, data: FormIn) -> None:
    from carepost.accounts.service import normalize_email

    keys = [f.key for f in data.fields]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise ValidationFailed(f"Two fields use the key {key!r}.", field=f"fields.{i}.key")
    mapped: dict[str, int] = {}
    for i, f in enumerate(data.fields):
        if f.contact_field:
            if f.contact_field in mapped:
                raise ValidationFailed(f"Two fields fill the contact's {f.contact_field}.", field=f"fields.{i}.contact_field")
            mapped[f.contact_field] = i
    auth = [i for i, f in enumerate(data.fields) if f.type == "authorization"]
    consents = [i for i, f in enumerate(data.fields) if f.type == "consent"]
    if len(auth) > 1:
        raise ValidationFailed("A form holds at most one authorization block.", field=f"fields.{auth[1]}.type")
    if data.kind == "survey":
        for i, f in enumerate(data.fields):
            if f.type in ("consent", "authorization"):
                raise ValidationFailed("A survey records no consent or authorization; use a form.", field=f"fields.{i}.type")
            if f.contact_field:
                raise ValidationFailed("A survey creates no contact; remove contact_field.", field=f"fields.{i}.contact_field")
    elif (auth or consents or mapped) and "email" not in mapped:
        first = (auth or consents or list(mapped.values()))[0]
        raise ValidationFailed(
            "A form that signs, subscribes or fills contact fields needs an email field with contact_field 'email' "
            "(the confirmation link goes there).", field=f"fields.{first}.type")
    if "email" in mapped and not data.fields[mapped["email"]].required:
        raise ValidationFailed("The email field that identifies the person must be required.", field=f"fields.{mapped['email']}.required")
    for i in consents:
        check_topic(session, org_id, data.fields[i].topic_id, f"fields.{i}.topic_id")
    for i in auth:
        f = data.fields[i]
        check_authorization_block(session, org_id, f.purpose, f.text_id, f"fields.{i}")
    for i, address in enumerate(data.notify_emails):
        normalize_email(address, f"notify_emails.{i}")


def _slug_owner(session: Session, slug: str | None) -> str | None:
    """The form holding ``slug`` in any organization (the public address names none)."""
    if not slug:
        return None
    return session.scalar(select(Form.id).where(Form.slug == slug).execution_options(**ALL_ORGANIZATIONS))


def _apply(form: Form, data: FormIn) -> None:
    from carepost.accounts.service import normalize_email

    form.name = data.name
    form.description = data.description
    form.kind = data.kind
    form.language = data.language
    form.slug = data.slug
    form.fields = [f.model_dump(exclude_none=True, exclude_defaults=False) for f in data.fields]
    form.settings = {
        "notify_emails": [normalize_email(a) for a in data.notify_emails],
        "success_message": data.success_message,
    }


def create_form(session: Session, org_id: str, data: FormIn, *, created_by: str | None = None) -> Form:
    _check_definition(session, org_id, data)
    if _slug_owner(session, data.slug):
        raise Conflict("Another form already uses this address.", field="slug")
    form = Form(id=new_id(), org_id=org_id, public_id=_b64(secrets.token_bytes(15)), status="draft", version=1,
                created_by=created_by)
    _apply(form, data)
    session.add(form)
    _flush_slug(session)
    return form


def _flush_slug(session: Session) -> None:
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise Conflict("Another form already uses this address.", field="slug") from None


def update_form(session: Session, form: Form, data: FormIn) -> Form:
    """Replace the definition. A changed definition gets a new version number, so every
    submission records which version it answered."""
    _check_definition(session, form.org_id, data)
    taken = _slug_owner(session, data.slug)
    if taken and taken != form.id:
        raise Conflict("Another form already uses this address.", field="slug")
    before = (form.fields, form.kind, form.language)
    _apply(form, data)
    if (form.fields, form.kind, form.language) != before:
        form.version += 1
    form.updated_at = clock.now()
    _flush_slug(session)
    return form


def publish(session: Session, form: Form) -> Form:
    """Publish after re-checking what the definition points at (a topic or text may have gone)."""
    data = FormIn(name=form.name, description=form.description, kind=form.kind, language=form.language, slug=form.slug,
                  fields=form.fields, notify_emails=form.settings.get("notify_emails", []),
                  success_message=form.settings.get("success_message", ""))
    _check_definition(session, form.org_id, data)
    form.status = "published"
    form.published_at = clock.now()
    form.updated_at = clock.now()
    return form


def unpublish(session: Session, form: Form) -> Form:
    form.status = "unpublished"
    form.updated_at = clock.now()
    return form


def delete_form(session: Session, form: Form) -> None:
    """Only a form without submissions can be deleted; unpublish one that has them."""
    if submission_count(session, form.id):
        raise Conflict("This form has submissions; unpublish it instead of deleting it.", field="form_id")
    session.delete(form)
    session.flush()


def get_form(session: Session, form_id: str) -> Form:
    form = session.get(Form, form_id) if is_id(form_id) else None
    if form is None or (session.info.get("org_id") and form.org_id != session.info["org_id"]):
        raise NotFound("No such form.", field="form_id")
    return form


def list_forms(session: Session, org_id: str) -> list[Form]:
    return list(session.scalars(select(Form).where(Form.org_id == org_id).order_by(Form.created_at.desc())))


def submission_count(session: Session, form_id: str) -> int:
    return session.scalar(select(func.count()).select_from(FormSubmission).where(FormSubmission.form_id == form_id)) or 0


def submission_counts(session: Session, org_id: str) -> dict[str, int]:
    rows = session.execute(
        select(FormSubmission.form_id, func.count()).where(FormSubmission.org_id == org_id).group_by(FormSubmission.form_id)
    )
    return {form_id: n for form_id, n in rows}


def form_dict(form: Form, count: int | None = None) -> dict:
    return {
        "id": form.id,
        "public_id": form.public_id,
        "slug": form.slug,
        "url": public_url(form),
        "name": form.name,
        "description": form.description,
        "kind": form.kind,
        "status": form.status,
        "language": form.language,
        "version": form.version,
        "fields": form.fields,
        "notify_emails": form.settings.get("notify_emails", []),
        "success_message": form.settings.get("success_message", ""),
        "published_at": clock.aware(form.published_at),
        "created_at": clock.aware(form.created_at),
        "updated_at": clock.aware(form.updated_at),
        "submission_count": count or 0,
    }


def find_public_form(session: Session, key: str) -> Form:
    """The form behind ``/f/<key>`` (opaque public id or slug), any organization; scopes the
    session to its organization. Drafts and unpublished forms are not found."""
    key = (key or "")[:80]
    form = None
    if key:
        form = session.scalars(
            select(Form).where((Form.public_id == key) | (Form.slug == key)).execution_options(**ALL_ORGANIZATIONS)
        ).first()
    if form is None or form.status != "published":
        raise NotFound("This form does not exist or is closed.", field="form")
    scope_to(session, form.org_id)
    return form


# --------------------------------------------------------------------------- signed tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _mac(session: Session, org_id: str, purpose: str, payload: str, key: bytes | None = None) -> str:
    key = key or get_keyring().named_key(session, org_id, "forms")
    return _b64(hmac.new(key, f"{purpose}|{payload}".encode(), hashlib.sha256).digest())


def _mac_ok(session: Session, org_id: str, purpose: str, payload: str, mac: str) -> bool:
    """Under any live version of the forms secret (a page rendered before a rotation still submits)."""
    get_keyring().named_key(session, org_id, "forms")
    return any(hmac.compare_digest(mac, _mac(session, org_id, purpose, payload, key))
               for _v, key in get_keyring().named_keys(session, org_id, "forms"))


def render_token(session: Session, form: Form, at: datetime | None = None) -> str:
    """``<unix ms>.<mac>``: when the hosted form was rendered, signed for this form."""
    ms = int((at or clock.now()).timestamp() * 1000)
    return f"{ms}.{_mac(session, form.org_id, 'render', f'{form.id}|{ms}')}"


def check_render_token(session: Session, form: Form, token: str | None) -> float:
    """Seconds since the form was rendered; refuses a missing, forged, early or stale token."""
    settings = get_settings()
    stamp, _, mac = (token or "").partition(".")
    if not stamp.isdigit() or len(stamp) > 16 or not _mac_ok(session, form.org_id, "render", f"{form.id}|{stamp}", mac):
        raise SpamSuspected("This form could not be verified. Reload the page and submit again.", field=RENDER_TOKEN)
    age = clock.now().timestamp() - int(stamp) / 1000
    if age < settings.form_min_fill_seconds:
        raise SpamSuspected("The form was sent faster than a person can fill it. Check your answers and send it again.",
                            field=RENDER_TOKEN)
    if age > settings.form_render_token_hours * 3600:
        raise SpamSuspected("This page was open too long. Check your answers and send the form again.", field=RENDER_TOKEN)
    return age


def confirmation_token(session: Session, submission: FormSubmission) -> str:
    """``<submission id>.<expiry unix>.<mac>``: names a submission, never a person or a value."""
    exp = int(clock.aware(submission.confirm_expires_at).timestamp())
    return f"{submission.id}.{exp}.{_mac(session, submission.org_id, 'confirm', f'{submission.id}|{exp}')}"


def confirmation_url(session: Session, submission: FormSubmission) -> str:
    return f"{get_settings().base_url}/f/confirm/{confirmation_token(session, submission)}"


def resolve_confirmation(session: Session, token: str) -> FormSubmission:
    """The submission a confirmation link names, after checking its signature and expiry.
    Scopes the session to the submission's organization."""
    parts = (token or "")[:200].split(".")
    invalid = NotFound("This confirmation link is not valid. Use the link from the most recent email.", field="token")
    if len(parts) != 3 or not is_id(parts[0]) or not parts[1].isdigit() or len(parts[1]) > 12:
        raise invalid
    sub_id, exp, mac = parts
    sub = session.scalars(
        select(FormSubmission).where(FormSubmission.id == sub_id).execution_options(**ALL_ORGANIZATIONS)
    ).first()
    if sub is None or sub.confirm_expires_at is None:
        raise invalid
    if not _mac_ok(session, sub.org_id, "confirm", f"{sub.id}|{exp}", mac):
        raise invalid
    if int(exp) != int(clock.aware(sub.confirm_expires_at).timestamp()):
        raise invalid
    scope_to(session, sub.org_id)
    if sub.status == "confirmed":
        return sub
    if sub.status == "expired" or clock.now().timestamp() > int(exp):
        raise LinkExpired("This confirmation link has expired. Fill in the form again to receive a new one.", field="token")
    return sub


# --------------------------------------------------------------------------- spam protection


def rate_limit_key(ip: str | None) -> str:
    # The address itself never reaches Redis: a hash is enough to count.
    return "form-ip:" + hashlib.sha256((ip or "unknown").encode()).hexdigest()[:32]


def enforce_rate_limit(ip: str | None) -> None:
    from carepost.accounts.ratelimit import get_limiter
    from carepost.core.errors import RateLimited

    decision = get_limiter().hit(rate_limit_key(ip), get_settings().form_rate_limit_per_ip, RATE_WINDOW_SECONDS)
    if not decision.allowed:
        raise RateLimited("Too many forms were sent from your network. Try again in a few minutes.",
                          retry_after=decision.retry_after)


# --------------------------------------------------------------------------- parsing a submission


@dataclass
class Parsed:
    answers: dict[str, Any] = field(default_factory=dict)
    drawn_png: bytes | None = None
    errors: dict[str, str] = field(default_factory=dict)
    honeypot: bool = False
    render_token: str | None = None

    @property
    def first_error(self) -> tuple[str, str]:
        key = next(iter(self.errors))
        return key, self.errors[key]


def input_name(key: str, part: str | None = None) -> str:
    return f"{FIELD_PREFIX}{key}" + (f"__{part}" if part else "")


AUTH_PARTS = ("name", "drawn", "rep_name", "rep_authority", "text")


def allowed_names(fields: list[dict]) -> set[str]:
    names = {HONEYPOT, RENDER_TOKEN}
    for f in fields:
        names.add(input_name(f["key"]))
        if f["type"] == "authorization":
            names.update(input_name(f["key"], p) for p in AUTH_PARTS)
    return names


def parse_submission(fields: list[dict], items: Iterable[tuple[str, str]]) -> Parsed:
    """Check every posted value against the form's definition (server-side; the browser's checks
    are a convenience). Missing, unknown, repeated or malformed fields become errors keyed by
    field key; nothing is stored from a submission with errors."""
    out = Parsed()
    allowed = allowed_names(fields)
    values: dict[str, list[str]] = {}
    for name, value in items:
        if not isinstance(value, str):
            out.errors.setdefault("_form", "This form takes no file uploads.")
            continue
        if name not in allowed:
            out.errors.setdefault("_form", f"The form sent a field it does not have: {name[:60]}.")
            continue
        values.setdefault(name, []).append(value)
    out.honeypot = any(v.strip() for v in values.pop(HONEYPOT, []))
    token = values.pop(RENDER_TOKEN, [])
    out.render_token = token[0] if len(token) == 1 else None

    def one(name: str, key: str) -> str | None:
        got = values.get(name, [])
        if len(got) > 1:
            out.errors.setdefault(key, "This field was sent more than once.")
            return None
        return got[0] if got else None

    for f in fields:
        key, kind = f["key"], f["type"]
        name = input_name(key)
        required = f.get("required", False)
        if kind == "choice" and f.get("multiple"):
            chosen = [v.strip() for v in values.get(name, []) if v.strip()]
            bad = [v for v in chosen if v not in f["options"]]
            if bad:
                out.errors[key] = "Choose from the options shown."
            elif required and not chosen:
                out.errors[key] = "Choose at least one option."
            else:
                out.answers[key] = list(dict.fromkeys(chosen))
            continue
        raw = one(name, key)
        if key in out.errors:
            continue
        text = (raw or "").strip() if kind != "long_text" else (raw or "").replace("\r\n", "\n").strip()
        if kind == "authorization":
            _parse_authorization(f, text, one, out)
            continue
        if kind == "consent":
            if text not in ("", "yes"):
                out.errors[key] = "Tick the box or leave it empty."
            elif required and text != "yes":
                out.errors[key] = "Tick this box to continue."
            else:
                out.answers[key] = text == "yes"
            continue
        if not text:
            if required:
                out.errors[key] = "This field is required."
            else:
                out.answers[key] = None
            continue
        try:
            out.answers[key] = _parse_value(f, text)
        except ValidationFailed as exc:
            out.errors[key] = exc.message
    return out


def _parse_value(f: dict, text: str) -> Any:
    from carepost.accounts.service import normalize_email
    from carepost.patients.service import normalize_phone

    kind = f["type"]
    if kind in ("text", "long_text"):
        pattern = _CONTROL if kind == "long_text" else _CONTROL_LINE
        if pattern.search(text):
            raise ValidationFailed("This text holds characters that are not allowed.")
        if len(text) > f.get("max_length", 200):
            raise ValidationFailed(f"Use at most {f.get('max_length', 200)} characters.")
        return text
    if kind == "email":
        return normalize_email(text)
    if kind == "phone":
        return normalize_phone(text)
    if kind == "date":
        try:
            value = date.fromisoformat(text)
        except ValueError:
            raise ValidationFailed("Enter a date as YYYY-MM-DD.") from None
        if f.get("contact_field") == "birth_date" and not (date(1880, 1, 1) <= value <= clock.now().date()):
            raise ValidationFailed("Enter a birth date between 1880 and today.")
        return value.isoformat()
    if kind == "choice":
        if text not in f["options"]:
            raise ValidationFailed("Choose one of the options shown.")
        return text
    if kind == "rating":
        if not text.isdigit() or not 1 <= int(text) <= f.get("scale", 5):
            raise ValidationFailed(f"Choose a rating from 1 to {f.get('scale', 5)}.")
        return int(text)
    raise ValidationFailed("Unknown field type.")


def _parse_authorization(f: dict, ticked: str, one, out: Parsed) -> None:
    key = f["key"]
    name = (one(input_name(key, "name"), key) or "").strip()
    drawn = (one(input_name(key, "drawn"), key) or "").strip()
    rep_name = (one(input_name(key, "rep_name"), key) or "").strip()
    rep_authority = (one(input_name(key, "rep_authority"), key) or "").strip()
    shown_text = (one(input_name(key, "text"), key) or "").strip()
    if key in out.errors:
        return
    if ticked not in ("", "yes"):
        out.errors[key] = "Tick the box to sign, or leave it empty."
        return
    if ticked != "yes":
        if f.get("required"):
            out.errors[key] = "Tick the box and type your full name to sign."
        elif name or drawn:
            out.errors[key] = "Tick the box to sign, or clear your name."
        else:
            out.answers[key] = {"signed": False}
        return
    if not name:
        out.errors[key] = "Type your full name to sign."
        return
    for label, value in (("Your name", name), ("The representative's name", rep_name), ("The representative's authority", rep_authority)):
        if len(value) > 200 or _CONTROL_LINE.search(value):
            out.errors[key] = f"{label} must be at most 200 characters of text."
            return
    if rep_name and not rep_authority:
        out.errors[key] = "A personal representative must describe their authority to act for the patient."
        return
    if rep_authority and not rep_name:
        out.errors[key] = "Give the personal representative's name."
        return
    if drawn:
        if not f.get("drawn_signature"):
            out.errors[key] = "This form takes a typed signature only."
            return
        try:
            out.drawn_png = decode_signature_png(drawn)
        except ValidationFailed as exc:
            out.errors[key] = exc.message
            return
    if not is_id(shown_text):
        out.errors[key] = "The authorization text could not be identified. Reload the page and sign again."
        return
    out.answers[key] = {
        "signed": True,
        "name": name,
        "representative": {"name": rep_name, "authority": rep_authority} if rep_name else None,
        "drawn": out.drawn_png is not None,
        "text_id": shown_text,
    }


def decode_signature_png(data_url: str) -> bytes:
    """A drawn signature from the canvas: a ``data:image/png;base64,`` URL of a real, small PNG."""
    prefix = "data:image/png;base64,"
    if not data_url.startswith(prefix):
        raise ValidationFailed("The drawn signature is not a PNG image.")
    try:
        png = base64.b64decode(data_url[len(prefix):], validate=True)
    except (binascii.Error, ValueError):
        raise ValidationFailed("The drawn signature could not be read.") from None
    if len(png) > MAX_SIGNATURE_PNG:
        raise ValidationFailed("The drawn signature is too large.")
    if len(png) < 33 or not png.startswith(PNG_MAGIC) or png[12:16] != b"IHDR":
        raise ValidationFailed("The drawn signature is not a PNG image.")
    width, height = struct.unpack(">II", png[16:24])
    if not (1 <= width <= MAX_SIGNATURE_SIDE and 1 <= height <= MAX_SIGNATURE_SIDE):
        raise ValidationFailed("The drawn signature has an unexpected size.")
    return png


# --------------------------------------------------------------------------- storing a submission


def _encrypt(session: Session, sub: FormSubmission, column: str, value: bytes | str) -> bytes:
    return get_keyring().encrypt(session, sub.org_id, TABLE, column, sub.id, value)


def submission_data(session: Session, sub: FormSubmission) -> dict:
    return json.loads(get_keyring().decrypt(session, sub.org_id, TABLE, "data", sub.id, sub.data_enc))


def signature_png(session: Session, sub: FormSubmission) -> bytes | None:
    if sub.signature_png_enc is None:
        return None
    return get_keyring().decrypt(session, sub.org_id, TABLE, "signature_png", sub.id, sub.signature_png_enc)


def _contact_values(form: Form, answers: dict) -> dict[str, Any]:
    """The answers that fill contact fields, checked and typed as the contacts API would."""
    from pydantic import ValidationError

    from carepost.patients.schemas import ContactIn

    raw, key_of = {}, {}
    for f in form.fields:
        cf = f.get("contact_field")
        if cf and answers.get(f["key"]) not in (None, "", []):
            raw[cf] = answers[f["key"]]
            key_of[cf] = f["key"]
    try:
        return ContactIn(**raw).model_dump(exclude_unset=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else ""
        raise ValidationFailed(err.get("msg", "invalid").removeprefix("Value error, ").capitalize() + ".",
                               field=key_of.get(name, "_form")) from None


def _wanted_effects(form: Form, answers: dict) -> list[str]:
    effects = []
    if any(f["type"] == "authorization" and (answers.get(f["key"]) or {}).get("signed") for f in form.fields):
        effects.append("authorization")
    if any(f["type"] == "consent" and answers.get(f["key"]) for f in form.fields):
        effects.append("subscriptions")
    return effects


def submit(session: Session, form: Form, parsed: Parsed, *, ip: str | None, user_agent: str | None) -> FormSubmission:
    """Store a valid submission and apply what may be applied without confirmation."""
    from carepost.patients import service as patients

    if parsed.errors:
        key, message = parsed.first_error
        raise ValidationFailed(message, field=key)
    now = clock.now()
    sub = FormSubmission(id=new_id(), org_id=form.org_id, form_id=form.id, form_version=form.version, status="received",
                         effects=[], outcome={}, created_at=now)
    answers = parsed.answers
    _check_signed_texts(session, form, answers)
    if form.kind == "survey":
        _tally(session, form, answers)
    else:
        values = _contact_values(form, answers)
        effects = _wanted_effects(form, answers)
        if "email" in values:
            existing = patients.find_contact_ids(session, form.org_id, email=values["email"])
            if existing:
                # Somebody typed an address we know: change nothing of theirs until they confirm.
                sub.contact_id = existing[0]
                if set(values) - {"email"}:
                    effects.insert(0, "update_contact")
            else:
                result = patients.save_contact(session, form.org_id, values, source="form")
                sub.contact_id = result.contact.id
                sub.contact_created = True
        if effects:
            sub.status = "pending_confirmation"
            sub.effects = effects
            sub.confirm_expires_at = now + timedelta(hours=get_settings().form_confirmation_hours)
    document = {
        "answers": answers,
        "meta": {"ip": ip, "user_agent": (user_agent or "")[:300], "submitted_at": now.isoformat()},
    }
    sub.data_enc = _encrypt(session, sub, "data", json.dumps(document))
    if parsed.drawn_png is not None:
        sub.signature_png_enc = _encrypt(session, sub, "signature_png", parsed.drawn_png)
    session.add(sub)
    session.flush()
    return sub


def _check_signed_texts(session: Session, form: Form, answers: dict) -> None:
    """A signature counts only for the text the person read: the version shown must still be the
    one the block offers (a new version published meanwhile means reading and signing again)."""
    for f in form.fields:
        answer = answers.get(f["key"]) or {}
        if f["type"] != "authorization" or not answer.get("signed"):
            continue
        text = authorization_text(session, form.org_id, f["purpose"], f.get("text_id"), f["key"])
        if text is None or text.id != answer.get("text_id"):
            raise ValidationFailed("The authorization text was updated while the form was open. Read the new version and "
                                   "sign again.", field=f["key"])
        answer["text_version"] = text.version
        answer["text_hash"] = text.content_hash
        answer["language"] = text_body(text, form.language)[0]


def _tally(session: Session, form: Form, answers: dict) -> None:
    today = clock.now().date()
    for f in form.fields:
        if f.get("phi") or f["type"] not in ("choice", "rating"):
            continue
        value = answers.get(f["key"])
        if value in (None, [], ""):
            continue
        if f["type"] == "rating":
            session.add(SurveyTally(org_id=form.org_id, form_id=form.id, field_key=f["key"], number=float(value), day=today))
        else:
            for option in value if isinstance(value, list) else [value]:
                session.add(SurveyTally(org_id=form.org_id, form_id=form.id, field_key=f["key"], option=option, day=today))


# --------------------------------------------------------------------------- confirmation


def confirm(session: Session, sub: FormSubmission, *, ip: str | None, user_agent: str | None) -> FormSubmission:
    """Apply a pending submission's effects for the person who proved they own the address.
    Idempotent: a confirmed submission is returned unchanged."""
    from carepost.patients import service as patients

    if sub.status == "confirmed":
        return sub
    if sub.status != "pending_confirmation":
        raise LinkExpired("This confirmation link can no longer be used.", field="token")
    form = session.get(Form, sub.form_id)
    document = submission_data(session, sub)
    answers = document["answers"]
    if sub.contact_id is None:
        raise NotFound("The person this submission was for is no longer on file.", field="token")
    contact = patients.get_contact(session, sub.contact_id)
    outcome: dict[str, Any] = {}
    if "update_contact" in sub.effects:
        values = _contact_values(form, answers)
        values.pop("email", None)  # the address that matched stays as it is
        if "phone" in values:
            # the new number becomes the first; the numbers already on file stay
            new = values.pop("phone")
            digits = re.sub(r"\D", "", new)
            others = [{"value": p["value"], "use": p.get("use")}
                      for p in patients.contact_dict(session, contact)["phones"] if re.sub(r"\D", "", p["value"]) != digits]
            values["phones"] = [{"value": new}] + others
        patients.save_contact(session, sub.org_id, values, contact=contact)
        outcome["contact_updated"] = sorted(values)
    if "authorization" in sub.effects:
        outcome["authorization_ids"] = _record_authorizations(session, form, sub, document, contact.id, ip=ip, user_agent=user_agent)
    if "subscriptions" in sub.effects:
        outcome["subscription_ids"] = _record_subscriptions(session, form, sub, answers, contact.id)
    sub.status = "confirmed"
    sub.confirmed_at = clock.now()
    sub.outcome = {**(sub.outcome or {}), **outcome}
    session.flush()
    return sub


class ConfirmationFailed(CarePostError):
    status_code = 409
    code = "confirmation_failed"


def _record_authorizations(session: Session, form: Form, sub: FormSubmission, document: dict, contact_id: str, *,
                           ip: str | None, user_agent: str | None) -> list[str]:
    """Record each signed block through the consent capability, as signed when the form was
    sent, with the evidence gathered then (IP address and user agent of the signing)."""
    auth = _authorizations()
    ids = []
    signed_at = datetime.fromisoformat(document["meta"]["submitted_at"])
    drawn = signature_png(session, sub)
    for f in form.fields:
        answer = document["answers"].get(f["key"]) or {}
        if f["type"] != "authorization" or not answer.get("signed"):
            continue
        rep = answer.get("representative") or {}
        try:
            row = auth.record_authorization(
                session,
                form.org_id,
                contact_id=contact_id,
                purpose=f["purpose"],
                method="form",
                text_id=answer["text_id"],
                signature_name=None if drawn else answer["name"],
                signature_image=("data:image/png;base64," + base64.b64encode(drawn).decode()) if drawn else None,
                signed_at=signed_at,
                representative_name=rep.get("name") or None,
                representative_authority=rep.get("authority") or None,
                language=answer.get("language"),
                ip=document["meta"].get("ip"),
                user_agent=document["meta"].get("user_agent"),
                created_by=f"form:{sub.id}",
            )
        except ValidationFailed as exc:
            if exc.field == "text_id":
                raise ConfirmationFailed("The authorization text changed after you signed it, so this signature can no "
                                         "longer be recorded. Please fill in the form again.", field="token") from None
            raise
        ids.append(row.id)
    return ids


def _record_subscriptions(session: Session, form: Form, sub: FormSubmission, answers: dict, contact_id: str) -> list[str]:
    consent = _consent()
    ids = []
    for f in form.fields:
        if f["type"] == "consent" and answers.get(f["key"]):
            row = consent.resubscribe_contact(session, form.org_id, contact_id, f["topic_id"], source="form", confirmed=True)
            ids.append(row.id)
    return ids


def expire_pending(session: Session, now: datetime | None = None) -> int:
    """Mark pending submissions whose link ran out as expired; nothing of theirs is applied."""
    now = now or clock.now()
    rows = list(session.scalars(
        select(FormSubmission).where(FormSubmission.status == "pending_confirmation", FormSubmission.confirm_expires_at < now)
    ))
    for sub in rows:
        sub.status = "expired"
    session.flush()
    return len(rows)


def topic_name(session: Session, org_id: str, topic_id: str) -> str | None:
    try:
        return _consent().get_topic(session, org_id, topic_id).name
    except (NotFound, ValidationFailed):
        return None


# --------------------------------------------------------------------------- after a submission


def event_payload(form: Form, sub: FormSubmission) -> dict:
    """What a webhook receiver learns: ids and states, never an answer."""
    return {
        "form_id": form.id,
        "form_name": form.name,
        "submission_id": sub.id,
        "status": sub.status,
        "contact_id": sub.contact_id,
        "contact_created": sub.contact_created,
        "effects": list(sub.effects or []),
        "created_at": clock.aware(sub.created_at).isoformat(),
    }


EVENT_TYPES = {
    "form.submitted": "A hosted form was submitted (answers only to endpoints that receive PHI).",
    "form.confirmed": "A person confirmed a form submission through the link sent to their address.",
}


def _tracking():
    try:
        from carepost.tracking import service as tracking
    except ImportError:  # the tracking capability is not installed
        return None
    return tracking if hasattr(tracking, "emit") else None


def _emit(session: Session, form: Form, sub: FormSubmission, type_: str) -> None:
    """An outbound webhook event, written in the submission's transaction. The answers go only
    to endpoints set to receive PHI."""
    tracking = _tracking()
    if tracking is not None:
        tracking.emit(session, form.org_id, type_, event_payload(form, sub),
                      phi=lambda: {"answers": submission_data(session, sub)["answers"]})


def emit_submitted(session: Session, form: Form, sub: FormSubmission) -> None:
    _emit(session, form, sub, "form.submitted")


def emit_confirmed(session: Session, sub: FormSubmission) -> None:
    _emit(session, session.get(Form, sub.form_id), sub, "form.confirmed")


def after_confirm(sub: FormSubmission) -> None:
    """Nothing to queue: copies of signed authorizations are the consent capability's job."""
    log.info("form_submission_confirmed", submission_id=sub.id, effect_count=len(sub.effects or []))


CONFIRM_TEXT = {
    "en": (
        "Please confirm your request to {org}",
        "Someone, we hope you, filled in a form of {org} with this email address.\n\n"
        "To confirm it, open this link within {hours} hours:\n{url}\n\n"
        "If it was not you, ignore this email: nothing changes without your confirmation.\n",
    ),
    "es": (
        "Confirme su solicitud a {org}",
        "Alguien, esperamos que usted, llenó un formulario de {org} con esta dirección de correo.\n\n"
        "Para confirmarlo, abra este enlace en las próximas {hours} horas:\n{url}\n\n"
        "Si no fue usted, ignore este correo: nada cambia sin su confirmación.\n",
    ),
}


def confirmation_email(session: Session, form: Form, sub: FormSubmission) -> tuple[str, str]:
    """(subject, text) of the confirmation email. No PHI: it names the organization, not the
    form (a form's title may itself reveal a condition), and the link carries ids only."""
    from carepost.accounts.models import Organization

    org = session.get(Organization, sub.org_id)
    name = org.name if org else "CarePost"
    subject, body = CONFIRM_TEXT.get(form.language, CONFIRM_TEXT["en"])
    return subject.format(org=name), body.format(org=name, hours=get_settings().form_confirmation_hours,
                                                 url=confirmation_url(session, sub))


def request_confirmation(session: Session, form: Form, sub: FormSubmission) -> bool:
    """Queue the confirmation email to the contact's address on file through the delivery
    pipeline (the consent capability's patient mailer), in the submission's transaction. When no
    mailer is registered the worker sends it directly (``tasks.send_confirmation``)."""
    if sub.status != "pending_confirmation" or sub.contact_id is None:
        return False
    consent = _consent()
    subject, text = confirmation_email(session, form, sub)
    message_id = consent.send_patient_email(session, consent.PatientEmail(
        org_id=sub.org_id, contact_id=sub.contact_id, kind="form_confirmation", subject=subject, text=text))
    if message_id:
        sub.confirmation_sent_at = clock.now()
        sub.outcome = {**(sub.outcome or {}), "confirmation_message_id": message_id}
        return True
    return False


# --------------------------------------------------------------------------- reading submissions


def list_submissions(session: Session, form: Form, *, status: str | None = None, before: str | None = None,
                     limit: int = 50) -> tuple[list[FormSubmission], str | None]:
    if not 1 <= limit <= 200:
        raise ValidationFailed("limit must be between 1 and 200.", field="limit")
    q = select(FormSubmission).where(FormSubmission.form_id == form.id)
    if status:
        q = q.where(FormSubmission.status == status)
    if before:
        if not is_id(before):
            raise ValidationFailed("The cursor is not one this API returned.", field="cursor")
        q = q.where(FormSubmission.id < before)
    rows = list(session.scalars(q.order_by(FormSubmission.id.desc()).limit(limit + 1)))
    return rows[:limit], (rows[limit - 1].id if len(rows) > limit else None)


def get_submission(session: Session, form: Form, submission_id: str) -> FormSubmission:
    sub = session.get(FormSubmission, submission_id) if is_id(submission_id) else None
    if sub is None or sub.form_id != form.id or sub.org_id != form.org_id:
        raise NotFound("No such submission.", field="submission_id")
    return sub


def mask_answer(f: dict, value: Any) -> Any:
    from carepost.patients import masking

    if value is None:
        return None
    cf = f.get("contact_field")
    if f["type"] == "email" or cf == "email":
        return masking.mask_email(value)
    if f["type"] == "phone":
        return masking.mask_phone(value)
    if cf == "birth_date":
        return masking.mask_birth_date(value)
    if cf in ("given_name", "family_name"):
        return masking.mask_name(value)
    if f["type"] == "authorization":
        return {**value, "name": masking.mask_name(value.get("name")),
                "representative": ({"name": masking.mask_name(value["representative"]["name"]), "authority": masking.MASK}
                                   if value.get("representative") else None)}
    return masking.MASK


def submission_dict(session: Session, form: Form, sub: FormSubmission, *, unmasked: bool, with_answers: bool = True) -> dict:
    out = {
        "id": sub.id,
        "form_id": sub.form_id,
        "form_version": sub.form_version,
        "status": sub.status,
        "contact_id": sub.contact_id,
        "contact_created": sub.contact_created,
        "effects": list(sub.effects or []),
        "outcome": dict(sub.outcome or {}),
        "created_at": clock.aware(sub.created_at),
        "confirm_expires_at": clock.aware(sub.confirm_expires_at),
        "confirmed_at": clock.aware(sub.confirmed_at),
        "masked": not unmasked,
        "has_drawn_signature": sub.signature_png_enc is not None,
        "answers": None,
    }
    if with_answers:
        answers = submission_data(session, sub)["answers"]
        by_key = {f["key"]: f for f in form.fields}
        shown = {}
        for key, value in answers.items():
            f = by_key.get(key, {"key": key, "type": "text", "phi": True})
            shown[key] = value if unmasked or not f.get("phi") else mask_answer(f, value)
        out["answers"] = shown
    return out


# --------------------------------------------------------------------------- survey results


def survey_results(session: Session, form: Form) -> dict:
    """Counts per option and averages of ratings, computed in SQL over the tallies."""
    counts = {
        (key, option): n
        for key, option, n in session.execute(
            select(SurveyTally.field_key, SurveyTally.option, func.count())
            .where(SurveyTally.form_id == form.id, SurveyTally.option.is_not(None))
            .group_by(SurveyTally.field_key, SurveyTally.option)
        )
    }
    ratings = {
        key: (n, avg)
        for key, n, avg in session.execute(
            select(SurveyTally.field_key, func.count(), func.avg(SurveyTally.number))
            .where(SurveyTally.form_id == form.id, SurveyTally.number.is_not(None))
            .group_by(SurveyTally.field_key)
        )
    }
    distribution = {
        (key, int(number)): n
        for key, number, n in session.execute(
            select(SurveyTally.field_key, SurveyTally.number, func.count())
            .where(SurveyTally.form_id == form.id, SurveyTally.number.is_not(None))
            .group_by(SurveyTally.field_key, SurveyTally.number)
        )
    }
    fields = []
    for f in form.fields:
        if f.get("phi") or f["type"] not in ("choice", "rating"):
            continue
        if f["type"] == "choice":
            options = [{"option": o, "count": counts.get((f["key"], o), 0)} for o in f["options"]]
            # options removed from a later version still count
            options += [{"option": o, "count": n} for (k, o), n in counts.items() if k == f["key"] and o not in f["options"]]
            fields.append({"key": f["key"], "label": f["label"], "type": "choice", "options": options,
                           "responses": sum(o["count"] for o in options)})
        else:
            n, avg = ratings.get(f["key"], (0, None))
            fields.append({"key": f["key"], "label": f["label"], "type": "rating", "responses": n,
                           "average": round(float(avg), 2) if avg is not None else None,
                           "distribution": [{"option": str(i), "count": distribution.get((f["key"], i), 0)}
                                            for i in range(1, f.get("scale", 5) + 1)]})
    return {"form_id": form.id, "submissions": submission_count(session, form.id), "fields": fields}


# --------------------------------------------------------------------------- patients hooks


def forget_contact(session: Session, org_id: str, contact_id: str, _indexes: dict) -> None:
    """A deleted patient's form answers go with them (authorization evidence is kept by consent)."""
    session.execute(delete(FormSubmission).where(FormSubmission.org_id == org_id, FormSubmission.contact_id == contact_id))


def forget_contacts(session: Session, org_id: str, indexes_by_contact: dict) -> None:
    """:func:`forget_contact` for a set of contacts, in one statement."""
    if indexes_by_contact:
        session.execute(delete(FormSubmission).where(FormSubmission.org_id == org_id,
                                                     FormSubmission.contact_id.in_(sorted(indexes_by_contact))))


def export_section(session: Session, org_id: str, contact_id: str) -> list[dict]:
    rows = session.scalars(
        select(FormSubmission).where(FormSubmission.org_id == org_id, FormSubmission.contact_id == contact_id)
        .order_by(FormSubmission.created_at)
    )
    out = []
    for sub in rows:
        form = session.get(Form, sub.form_id)
        data = submission_dict(session, form, sub, unmasked=True)
        data["form_name"] = form.name
        for k in ("created_at", "confirm_expires_at", "confirmed_at"):
            data[k] = data[k].isoformat() if data[k] else None
        out.append(data)
    return out
