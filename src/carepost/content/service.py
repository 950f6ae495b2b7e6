"""Message templates: create, change (a new immutable version each time), list, diff, render.

Plain functions taking a session; callers commit. ``render_template`` is what the transactional
API (``POST /api/v1/messages`` with ``template_id`` and ``data``) calls; campaigns and journeys
point at a version id and call :func:`render_for_contacts`, which binds the merge-field helpers
to each contact's data (loaded set-wise), picks the contact's language and shows the dynamic
blocks the planner chose. Nothing rendered is stored here.

What rendering a version needs that depends only on the version's text — its parts per language,
the helpers and observation codes its merge fields need, its dynamic blocks — is worked out once
per version and kept (:func:`prepare_version`, a bounded cache keyed by the version id *and* a
hash of its text, so a changed row is never served from an older entry). It holds template text
only, never a contact's data; each render still runs in its own sandbox budget and output limit.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from types import MappingProxyType

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.content import authoring, blocks, helpers, link_guard, phi_lint, rendering
from carepost.content.models import MessageTemplate, MessageTemplateVersion
from carepost.content.schemas import TemplateIn
from carepost.core.errors import Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id
from carepost.core.purposes import check_purpose

MAX_DATA_BYTES = 64 * 1024
MAX_DATA_DEPTH = 12
TEMPLATE_FIELDS = ("name", "subject", "preheader", "html", "text", "contains_phi", "purpose")
# What one version holds per language, and what else it holds once.
LANGUAGE_PARTS = ("subject", "preheader", "html", "text", "mjml", "from_name", "portal_notice")
VERSION_FIELDS = ("name", "source_format", "language", "contains_phi", "purpose", "data_uses", *LANGUAGE_PARTS,
                  "variants")
DIFF_PARTS = ("name", "purpose", "contains_phi", "data_uses", *LANGUAGE_PARTS)


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
    version_id: str | None = None
    language: str | None = None
    masked: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- checking a template


def _languages(data: dict) -> dict[str, dict]:
    """``{language: parts}`` with every variant's empty parts taken from the default language."""
    default = {part: data.get(part) or "" for part in LANGUAGE_PARTS}
    out = {data["language"]: default}
    for lang, variant in (data.get("variants") or {}).items():
        out[lang] = {part: (variant.get(part) or default[part]) for part in LANGUAGE_PARTS}
        if data["source_format"] == "mjml" and variant.get("mjml"):
            out[lang]["html"] = ""  # compiled from the variant's own MJML below
    return out


def _field(lang: str, default_lang: str, part: str) -> str:
    return f"template.{part}" if lang == default_lang else f"variants.{lang}.{part}"


def _check_parts(data: dict) -> tuple[list[dict], list[dict]]:
    """Every part of every language: parses, compiles (MJML), keeps PHI out of headers, uses only
    helpers its purpose allows; returns (helpers used, lint warnings)."""
    default_lang = data["language"]
    used: dict[str, tuple[str, int]] = {}
    warnings: list[dict] = []
    for lang, parts in _languages(data).items():
        where = (lambda part, lang=lang: _field(lang, default_lang, part))
        if data["source_format"] == "mjml":
            source = parts["mjml"]
            if not source.strip():
                raise ValidationFailed("A template authored in MJML needs its MJML source.", field=where("mjml"))
            parts["html"] = authoring.compile_mjml(source, field=where("mjml"))
            if lang == default_lang:
                data["html"] = parts["html"]
            else:
                data["variants"][lang]["html"] = parts["html"]
        if not parts["html"].strip() and not parts["text"].strip():
            raise ValidationFailed("A template needs an HTML or a text body (or both).", field=where("html"))
        # The link guard (issue 13 item 3): no merge field and no email address in any URL.
        link_guard.check_template_links(parts, prefix="template." if lang == default_lang else f"variants.{lang}.")
        try:
            rendering.check_template(parts, contains_phi=data["contains_phi"])
            for part in ("from_name", "portal_notice"):
                if rendering.variables("text", parts[part]):
                    raise ValidationFailed(f"The {part.replace('_', ' ')} may not use template variables: it is shown "
                                           "outside the protected content.", field=f"template.{part}")
        except ValidationFailed as exc:
            if lang != default_lang and (exc.field or "").startswith("template."):
                exc.field = f"variants.{lang}." + exc.field.split(".", 1)[1]
            raise
        for part, what in (("subject", "subject"), ("preheader", "preheader"), ("from_name", "from-name"),
                           ("portal_notice", "portal notice")):
            if data["contains_phi"] or part in ("from_name", "portal_notice"):
                static = authoring._JINJA.sub(" ", parts[part])
                phi_lint.check_header_text(static, where(part), f"{what} of a template")
        for part in rendering.PARTS:
            source = parts[part]
            names = rendering.variables(part, source)
            for name, args, line in rendering.helper_calls(part, source):
                if name not in helpers.HELPERS:
                    raise ValidationFailed(
                        f"Unknown helper {name}() in {part} at line {line}; helpers: {', '.join(helpers.HELPERS)}.",
                        field=where(part), code="unknown_helper")
                if helpers.HELPERS[name].callable and (len(args) != 1 or not isinstance(args[0], str) or ":" not in args[0]):
                    raise ValidationFailed(f'{name} needs one code as a literal string ("loinc:4548-4") '
                                           f"({part}, line {line}).", field=where(part))
            for name in sorted(names & set(helpers.HELPERS)):
                if part in rendering.HEADER_PARTS and helpers.HELPERS[name].category != "demographics":
                    raise ValidationFailed(f"The {part} may not use the helper {name}: subjects and preheaders are "
                                           "shown outside the protected content.", field=where(part),
                                           code="phi_beyond_purpose")
                used.setdefault(name, (where(part), _line_of(source, name)))
            for condition in rendering.block_conditions(part, source).values():
                blocks.check_condition(condition, where(part))
        warnings += authoring.lint(parts["html"], where("html"))
    phi_lint.check_helpers(used, purpose=data["purpose"], declared=data["data_uses"])
    return ([{"name": n, "category": helpers.HELPERS[n].category, "field": f} for n, (f, _) in sorted(used.items())],
            warnings)


def _line_of(source: str, name: str) -> int:
    at = source.find(name)
    return source.count("\n", 0, at) + 1 if at >= 0 else 1


def _clean(values: TemplateIn) -> dict:
    data = values.model_dump()
    data["name"] = " ".join(data["name"].split())
    if not data["name"]:
        raise ValidationFailed("name may not be blank.", field="name")
    if data["purpose"] is not None:
        check_purpose(data["purpose"])
    data["language"] = helpers.check_language(data["language"], "language")
    variants = {}
    for tag, variant in (data.get("variants") or {}).items():
        lang = helpers.check_language(tag, f"variants.{tag}")
        if lang == data["language"]:
            raise ValidationFailed(f"The variant {tag} is the template's default language.", field=f"variants.{tag}")
        variants[lang] = dict(variant)
    data["variants"] = variants
    if data["data_uses"] is not None:
        for i, name in enumerate(data["data_uses"]):
            if name not in helpers.HELPERS:
                raise ValidationFailed(f"Unknown helper {name!r}; helpers: {', '.join(helpers.HELPERS)}.",
                                       field=f"data_uses.{i}", code="unknown_helper")
        data["data_uses"] = sorted(set(data["data_uses"]))
    if data["source_format"] == "html":
        if data["mjml"].strip() or any(v.get("mjml", "").strip() for v in variants.values()):
            raise ValidationFailed("MJML source was given but source_format is html.", field="mjml")
    data["_helpers"], data["lint"] = _check_parts(data)
    return data


# --------------------------------------------------------------------------- storing


def _name_taken(session: Session, org_id: str, name: str, except_id: str | None = None) -> bool:
    query = select(MessageTemplate.id).where(MessageTemplate.org_id == org_id, MessageTemplate.name == name)
    if except_id:
        query = query.where(MessageTemplate.id != except_id)
    return session.scalar(query) is not None


def _add_version(session: Session, template: MessageTemplate, data: dict, number: int,
                 created_by: str | None) -> MessageTemplateVersion:
    version = MessageTemplateVersion(org_id=template.org_id, template_id=template.id, version=number,
                                     created_by=created_by, lint=data["lint"],
                                     **{k: data[k] for k in VERSION_FIELDS})
    session.add(version)
    session.flush()
    for key in TEMPLATE_FIELDS:
        setattr(template, key, data[key])
    template.version = number
    template.current_version_id = version.id
    session.flush()
    return version


def create_template(session: Session, org_id: str, values: TemplateIn, *, created_by: str | None = None) -> MessageTemplate:
    data = _clean(values)
    if _name_taken(session, org_id, data["name"]):
        raise Conflict("A template with this name exists already.", field="name")
    template = MessageTemplate(org_id=org_id, created_by=created_by, version=1,
                               **{k: data[k] for k in TEMPLATE_FIELDS})
    session.add(template)
    session.flush()
    _add_version(session, template, data, 1, created_by)
    return template


def _version_values(version: MessageTemplateVersion) -> dict:
    return {k: getattr(version, k) for k in VERSION_FIELDS}


def update_template(session: Session, template: MessageTemplate, values: TemplateIn, *,
                    created_by: str | None = None) -> MessageTemplate:
    """A new version when anything changed; the versions before it stay as they were."""
    data = _clean(values)
    if data["name"] != template.name and _name_taken(session, template.org_id, data["name"], template.id):
        raise Conflict("A template with this name exists already.", field="name")
    current = current_version(session, template)
    if current is not None and _version_values(current) == {k: data[k] for k in VERSION_FIELDS}:
        return template
    _add_version(session, template, data, (template.version or 0) + 1, created_by)
    return template


def get_template(session: Session, org_id: str, template_id: str, field: str = "template_id") -> MessageTemplate:
    template = session.get(MessageTemplate, template_id) if is_id(template_id or "") else None
    if template is None or template.org_id != org_id:
        raise NotFound("No such template.", field=field)
    return template


def list_templates(session: Session, org_id: str) -> list[MessageTemplate]:
    return list(session.scalars(select(MessageTemplate).where(MessageTemplate.org_id == org_id).order_by(MessageTemplate.name)))


def delete_template(session: Session, template: MessageTemplate) -> None:
    for version in session.scalars(select(MessageTemplateVersion).where(MessageTemplateVersion.template_id == template.id)):
        session.delete(version)
    session.delete(template)
    session.flush()


# --------------------------------------------------------------------------- versions


def current_version(session: Session, template: MessageTemplate) -> MessageTemplateVersion | None:
    if template.current_version_id:
        return session.get(MessageTemplateVersion, template.current_version_id)
    return None


def list_versions(session: Session, template: MessageTemplate) -> list[MessageTemplateVersion]:
    return list(session.scalars(select(MessageTemplateVersion).where(
        MessageTemplateVersion.template_id == template.id).order_by(MessageTemplateVersion.version.desc())))


def get_version(session: Session, template: MessageTemplate, number: int, field: str = "version") -> MessageTemplateVersion:
    version = session.scalar(select(MessageTemplateVersion).where(
        MessageTemplateVersion.template_id == template.id, MessageTemplateVersion.version == number))
    if version is None:
        raise NotFound(f"The template has no version {number}.", field=field)
    return version


def get_version_by_id(session: Session, org_id: str, version_id: str, field: str = "template_version_id") -> MessageTemplateVersion:
    """What a campaign or journey step holds: a version id, scoped to the organization."""
    version = session.get(MessageTemplateVersion, version_id) if is_id(version_id or "") else None
    if version is None or version.org_id != org_id:
        raise NotFound("No such template version.", field=field)
    return version


def version_summary(version: MessageTemplateVersion) -> dict:
    return {"id": version.id, "version": version.version, "name": version.name, "purpose": version.purpose,
            "contains_phi": version.contains_phi, "source_format": version.source_format,
            "language": version.language, "languages": [version.language, *sorted(version.variants or {})],
            "created_by": version.created_by, "created_at": version.created_at}


def _diff_value(version: MessageTemplateVersion, part: str, lang: str | None) -> str:
    if lang and lang != version.language:
        value = (version.variants or {}).get(lang, {}).get(part, "")
    else:
        value = getattr(version, part)
    if isinstance(value, (list, bool)) or value is None:
        return json.dumps(value)
    return value or ""


def diff_versions(old: MessageTemplateVersion, new: MessageTemplateVersion) -> dict:
    """A unified diff (difflib) of every part that changed, per language."""
    languages = sorted({old.language, new.language, *(old.variants or {}), *(new.variants or {})})
    parts: dict[str, str] = {}
    for lang in languages:
        for part in DIFF_PARTS:
            if part not in LANGUAGE_PARTS and lang != languages[0]:
                continue
            a, b = _diff_value(old, part, lang), _diff_value(new, part, lang)
            if a == b:
                continue
            key = part if part not in LANGUAGE_PARTS else f"{lang}.{part}"
            parts[key] = "\n".join(difflib.unified_diff(a.splitlines(), b.splitlines(), fromfile=f"v{old.version}/{key}",
                                                      tofile=f"v{new.version}/{key}", lineterm="")) + "\n"
    return {"from": old.version, "to": new.version, "parts": parts}


# --------------------------------------------------------------------------- reading


def template_variables(template: MessageTemplate) -> list[str]:
    names: set[str] = set()
    for part in rendering.PARTS:
        names |= rendering.variables(part, getattr(template, part) or "")
    return sorted(names)


def version_helpers(version: MessageTemplateVersion) -> list[dict]:
    used: dict[str, str] = {}
    for lang, parts in _version_languages(version).items():
        for part in rendering.PARTS:
            for name in sorted(rendering.variables(part, parts[part]) & set(helpers.HELPERS)):
                used.setdefault(name, part)
    return [{"name": n, "category": helpers.HELPERS[n].category} for n in sorted(used)]


def version_blocks(version: MessageTemplateVersion) -> dict[str, str]:
    """``{block key: condition}`` over every part and language of a version."""
    found: dict[str, str] = {}
    for parts in _version_languages(version).values():
        for part in rendering.PARTS:
            found.update(rendering.block_conditions(part, parts[part]))
    return found


def template_dict(template: MessageTemplate, version: MessageTemplateVersion | None = None) -> dict:
    out = {key: getattr(template, key) for key in TEMPLATE_FIELDS}
    out.update(id=template.id, version=template.version, variables=template_variables(template),
               created_at=template.created_at, updated_at=template.updated_at)
    if version is not None:
        out.update({k: getattr(version, k) for k in VERSION_FIELDS if k not in TEMPLATE_FIELDS},
                   version_id=version.id, version=version.version, lint=version.lint or [],
                   helpers=version_helpers(version),
                   blocks=[{"key": k, "condition": c} for k, c in version_blocks(version).items()])
        for key in TEMPLATE_FIELDS:
            out[key] = getattr(version, key)
    return out


# --------------------------------------------------------------------------- rendering


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


def _version_languages(version: MessageTemplateVersion) -> dict[str, dict]:
    default = {part: getattr(version, part) or "" for part in LANGUAGE_PARTS}
    out = {version.language: default}
    for lang, variant in (version.variants or {}).items():
        out[lang] = {part: (variant.get(part) or default[part]) for part in LANGUAGE_PARTS}
    return out


def render_version(version: MessageTemplateVersion, data: dict, *, language: str | None = None,
                   visible_blocks=None, masked: bool = False) -> Rendered:
    """One rendering of a version: the language variant chosen (exact, primary, default), CSS
    inlined, and a text part made from the HTML when the template has none."""
    languages = _version_languages(version)
    lang = helpers.choose_language(language, version.language, languages)
    return _render_language(version, languages[lang], lang, data, visible_blocks=visible_blocks, masked=masked)


def _render_language(version: MessageTemplateVersion, parts, lang: str, data: dict, *, visible_blocks,
                     masked: bool) -> Rendered:
    """The render of one language's parts (each part within its own sandbox budget and size limit)."""
    out = rendering.render_parts(parts, data, visible_blocks=visible_blocks)
    html = authoring.inline_css(out.html)
    text = out.text or (authoring.text_from_html(html) if html else "")
    return Rendered(subject=out.subject, html=html, text=text, preheader=out.preheader,
                    contains_phi=version.contains_phi, purpose=version.purpose, template_id=version.template_id,
                    version=version.version, version_id=version.id, language=lang, masked=masked)


@dataclass(frozen=True)
class PreparedVersion:
    """What rendering a version needs that depends only on the version's text (no contact data):
    the parts of each language (read-only), the helpers and codes to load, the dynamic blocks."""

    languages: MappingProxyType
    needs: helpers.Needs
    blocks: MappingProxyType

    def language_for(self, preferred: str | None, default: str) -> str:
        return helpers.choose_language(preferred, default, self.languages)


PREPARED_VERSIONS = 64  # versions kept prepared per process (least recently used dropped first)
_prepared: OrderedDict[tuple[str | None, str], PreparedVersion] = OrderedDict()
_prepared_lock = threading.Lock()


def _version_fingerprint(version: MessageTemplateVersion) -> str:
    """A hash of everything :class:`PreparedVersion` is made from: a version row is immutable, but
    the cache must never serve text the row does not hold (an unsaved legacy version has no id)."""
    text = json.dumps([version.language, [getattr(version, part) or "" for part in LANGUAGE_PARTS],
                       version.variants or {}], sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def prepare_version(version: MessageTemplateVersion) -> PreparedVersion:
    """The version's :class:`PreparedVersion`, made once per version id and text hash (templates
    are parsed once, not once per recipient or per batch)."""
    key = (version.id, _version_fingerprint(version))
    with _prepared_lock:
        found = _prepared.get(key)
        if found is not None:
            _prepared.move_to_end(key)
            return found
    languages = {lang: MappingProxyType(parts) for lang, parts in _version_languages(version).items()}
    prepared = PreparedVersion(languages=MappingProxyType(languages), needs=needs_of(version),
                               blocks=MappingProxyType(version_blocks(version)))
    with _prepared_lock:
        _prepared[key] = prepared
        while len(_prepared) > PREPARED_VERSIONS:
            _prepared.popitem(last=False)
    return prepared


def clear_prepared_versions() -> None:
    with _prepared_lock:
        _prepared.clear()


def _legacy_version(template: MessageTemplate) -> MessageTemplateVersion:
    """A template written before versions were stored: its row read as a version (not saved)."""
    return MessageTemplateVersion(org_id=template.org_id, template_id=template.id, version=template.version,
                                  name=template.name, source_format="html", mjml="", subject=template.subject,
                                  preheader=template.preheader, html=template.html, text=template.text,
                                  from_name="", portal_notice="", language="en", variants={},
                                  contains_phi=template.contains_phi, purpose=template.purpose, data_uses=None)


def render(template: MessageTemplate, data, *, session: Session | None = None, language: str | None = None) -> Rendered:
    data = check_data(data)
    version = None
    if session is not None and template.current_version_id:
        version = session.get(MessageTemplateVersion, template.current_version_id)
    return render_version(version or _legacy_version(template), data, language=language)


def render_template(session: Session, org_id: str, template_id: str, data, *, language: str | None = None) -> Rendered:
    """Renders an organization's template with ``data``; errors name ``template_id``, ``data.*``
    or ``template.<part>``."""
    return render(get_template(session, org_id, template_id), data, session=session, language=language)


def needs_of(version: MessageTemplateVersion) -> helpers.Needs:
    names: set[str] = set()
    codes: set[str] = set()
    for parts in _version_languages(version).values():
        for part in rendering.PARTS:
            names |= rendering.variables(part, parts[part]) & set(helpers.HELPERS)
            codes |= {str(args[0]).lower() for name, args, _ in rendering.helper_calls(part, parts[part])
                      if name == "last_observation" and args and isinstance(args[0], str)}
    return helpers.Needs(frozenset(names), frozenset(codes))


def render_for_contacts(session: Session, org_id: str, version: MessageTemplateVersion, contact_ids: list[str], *,
                        visible: dict[str, frozenset[str]] | None = None, masked: bool = False,
                        language: str | None = None) -> dict[str, Rendered]:
    """Each contact's message from a version: helpers bound to that contact's data (loaded for
    the whole chunk at once), the contact's language, the dynamic blocks ``visible`` says (from
    :func:`carepost.content.blocks.plan`; planned here when not given)."""
    if version.org_id != org_id:
        raise NotFound("No such template version.", field="template_version_id")
    prepared = prepare_version(version)
    needs = prepared.needs
    facts = helpers.load_merge_data(session, org_id, list(contact_ids), needs)
    if needs.helpers & helpers.CONSENT_HELPERS and facts:
        for contact_id, extra in helpers.load_consent_data(session, org_id, list(facts)).items():
            facts[contact_id].update(extra)
    if visible is None:
        visible = blocks.plan(session, org_id, dict(prepared.blocks), list(facts))
    chosen: dict[str | None, str] = {}  # preferred language -> variant, for this call's contacts
    out = {}
    for contact_id, contact_facts in facts.items():
        data = helpers.bind(contact_facts, needs)
        if masked:
            data = helpers.masked(data)
        preferred = language or (contact_facts.get("contact") or {}).get("preferred_language")
        lang = chosen.get(preferred)
        if lang is None:
            lang = chosen[preferred] = prepared.language_for(preferred, version.language)
        out[contact_id] = _render_language(version, prepared.languages[lang], lang, data,
                                           visible_blocks=visible.get(contact_id, frozenset()), masked=masked)
    return out


# --------------------------------------------------------------------------- preview


def version_for(session: Session, template: MessageTemplate, number: int | None) -> MessageTemplateVersion:
    if number is not None:
        return get_version(session, template, number)
    return current_version(session, template) or _legacy_version(template)


def preview(session: Session, principal, template_id: str, body, *, context: dict | None = None) -> dict:
    """Render with the request's data, or as a stored contact (audited; masked unless the viewer
    holds ``phi:read_unmasked``; needs ``phi:read_masked`` at least)."""
    from carepost.accounts.permissions import Permission
    from carepost.audit.service import record
    from carepost.core.errors import PermissionDenied

    template = get_template(session, principal.org_id, template_id)
    version = version_for(session, template, body.version)
    if body.language is not None:
        helpers.check_language(body.language, "language")
    if not body.contact_id:
        return render_version(version, check_data(body.data), language=body.language).as_dict()
    if body.data:
        raise ValidationFailed("Give data or a contact_id, not both.", field="data")
    unmasked = principal.can(Permission.PHI_READ_UNMASKED)
    if not unmasked and not principal.can(Permission.PHI_READ_MASKED):
        raise PermissionDenied("Previewing as a contact reads their data: it needs phi:read_masked or "
                               "phi:read_unmasked.", field="contact_id")
    if not is_id(body.contact_id):
        raise NotFound("No such contact.", field="contact_id")
    rendered = render_for_contacts(session, principal.org_id, version, [body.contact_id], masked=not unmasked,
                                   language=body.language).get(body.contact_id)
    if rendered is None:
        raise NotFound("No such contact.", field="contact_id")
    record(session, org_id=principal.org_id, actor_type=principal.kind, actor_id=principal.actor_id,
           on_behalf_of=principal.on_behalf_of, action="template.preview", target_type="contact",
           target_id=body.contact_id, details={"template_id": template.id, "version": version.version,
                                               "masked": not unmasked,
                                               "helpers": [h["name"] for h in version_helpers(version)]},
           **(context or {}))
    return rendered.as_dict()


def check_purpose_fit(session: Session, org_id: str, version_id: str, purpose: str, *, field: str = "purpose") -> None:
    """A message, campaign or journey step may give a version another purpose than its own; the
    helpers it uses must still be within what that purpose allows (minimum necessary)."""
    version = get_version_by_id(session, org_id, version_id)
    allowed = helpers.PURPOSE_CATEGORIES.get(purpose or "", helpers.DEFAULT_CATEGORIES)
    for used in version_helpers(version):
        if used["category"] not in allowed:
            raise ValidationFailed(
                f"The template uses the helper {used['name']}, which reveals {used['category'].replace('_', ' ')}; "
                f"a message with the purpose {purpose} may not (allowed: {', '.join(allowed)}).",
                field=field, code="phi_beyond_purpose")
