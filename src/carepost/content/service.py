"""Message templates: create, change, list, delete and render.

Plain functions taking a session; callers commit. ``render_template`` is what the transactional
API (``POST /api/v1/messages`` with ``template_id`` and ``data``), campaigns and journeys call:
it checks the data, renders each part in the sandbox (``content.rendering``) and returns the
result in memory only — nothing rendered is stored here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.core.purposes import check_purpose
from carepost.content import rendering
from carepost.content.models import MessageTemplate
from carepost.content.schemas import TemplateIn
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id

MAX_DATA_BYTES = 64 * 1024
MAX_DATA_DEPTH = 12
TEMPLATE_FIELDS = ("name", "subject", "preheader", "html", "text", "contains_phi", "purpose")


@dataclass(frozen=True)
class Rendered:
    subject: str
    html: str
    text: str
    preheader: str
    contains_phi: bool
    purpose: str | None
    template_id: str
    version: int

    def as_dict(self) -> dict:
        return asdict(self)


def _clean(values: TemplateIn) -> dict:
    data = values.model_dump()
    data["name"] = " ".join(data["name"].split())
    if not data["name"]:
        raise ValidationFailed("name may not be blank.", field="name")
    if not data["html"].strip() and not data["text"].strip():
        raise ValidationFailed("A template needs an HTML or a text body (or both).", field="html")
    if data["purpose"] is not None:
        check_purpose(data["purpose"])
    rendering.check_template(data, contains_phi=data["contains_phi"])
    return data


def _name_taken(session: Session, org_id: str, name: str, except_id: str | None = None) -> bool:
    query = select(MessageTemplate.id).where(MessageTemplate.org_id == org_id, MessageTemplate.name == name)
    if except_id:
        query = query.where(MessageTemplate.id != except_id)
    return session.scalar(query) is not None


def create_template(session: Session, org_id: str, values: TemplateIn, *, created_by: str | None = None) -> MessageTemplate:
    data = _clean(values)
    if _name_taken(session, org_id, data["name"]):
        raise Conflict("A template with this name exists already.", field="name")
    template = MessageTemplate(org_id=org_id, created_by=created_by, version=1, **data)
    session.add(template)
    session.flush()
    return template


def update_template(session: Session, template: MessageTemplate, values: TemplateIn) -> MessageTemplate:
    """Replaces the template's fields; the version grows only when something changed."""
    data = _clean(values)
    if data["name"] != template.name and _name_taken(session, template.org_id, data["name"], template.id):
        raise Conflict("A template with this name exists already.", field="name")
    changed = {k: v for k, v in data.items() if getattr(template, k) != v}
    if changed:
        for key, value in changed.items():
            setattr(template, key, value)
        template.version = (template.version or 1) + 1
        session.flush()
    return template


def get_template(session: Session, org_id: str, template_id: str, field: str = "template_id") -> MessageTemplate:
    template = session.get(MessageTemplate, template_id) if is_id(template_id or "") else None
    if template is None or template.org_id != org_id:
        raise NotFound("No such template.", field=field)
    return template


def list_templates(session: Session, org_id: str) -> list[MessageTemplate]:
    return list(session.scalars(select(MessageTemplate).where(MessageTemplate.org_id == org_id).order_by(MessageTemplate.name)))


def delete_template(session: Session, template: MessageTemplate) -> None:
    session.delete(template)
    session.flush()


def template_variables(template: MessageTemplate) -> list[str]:
    names: set[str] = set()
    for part in rendering.PARTS:
        names |= rendering.variables(part, getattr(template, part) or "")
    return sorted(names)


def template_dict(template: MessageTemplate) -> dict:
    out = {key: getattr(template, key) for key in TEMPLATE_FIELDS}
    out.update(id=template.id, version=template.version, variables=template_variables(template),
               created_at=template.created_at, updated_at=template.updated_at)
    return out


def _check_value(value, path: str, depth: int) -> None:
    if depth > MAX_DATA_DEPTH:
        raise ValidationFailed(f"{path} is nested too deeply (at most {MAX_DATA_DEPTH} levels).", field=path)
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationFailed(f"{path} must be a finite number.", field=path)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                raise ValidationFailed(f"{path} has a key that is not a non-empty string.", field=path)
            if key.startswith("_"):
                raise ValidationFailed(f"{path}.{key}: names may not start with an underscore.", field=f"{path}.{key}")
            _check_value(item, f"{path}.{key}", depth + 1)
        return
    raise ValidationFailed(
        f"{path} must be a string, number, boolean, null, list or object, not {type(value).__name__}.", field=path
    )


def check_data(data, field: str = "data") -> dict:
    """Render data must be a JSON object of scalars, lists and objects, at most 64 KiB."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValidationFailed(f"{field} must be a JSON object.", field=field)
    _check_value(data, field, 0)
    size = len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_DATA_BYTES:
        raise ValidationFailed(f"{field} is {size} bytes; at most {MAX_DATA_BYTES} are allowed.", field=field)
    return data


def render(template: MessageTemplate, data) -> Rendered:
    data = check_data(data)
    parts = rendering.render_parts({part: getattr(template, part) or "" for part in rendering.PARTS}, data)
    return Rendered(subject=parts.subject, html=parts.html, text=parts.text, preheader=parts.preheader,
                    contains_phi=template.contains_phi, purpose=template.purpose,
                    template_id=template.id, version=template.version)


def render_template(session: Session, org_id: str, template_id: str, data) -> Rendered:
    """Renders an organization's template with ``data``; errors name ``template_id``, ``data.*``
    or ``template.<part>``."""
    return render(get_template(session, org_id, template_id), data)
