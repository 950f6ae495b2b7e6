"""Web UI of authorization texts (``/app/consent/texts``): the compliance officer's editor.

Each purpose that needs an authorization (marketing, marketing with remuneration) has versioned
texts. The editor shows every element 45 CFR 164.508(c) requires as its own field, in English
and Spanish, with a checklist that marks each element present or missing per language (the
consent capability's ``check_completeness`` decides), and refuses to publish while anything is
missing. A published version never changes: "New draft" copies it into the next version.
The texts live in the consent capability; this module is only their editor.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core.errors import CarePostError, ValidationFailed
from carepost.web.rendering import render

router = APIRouter(prefix="/app/consent/texts", include_in_schema=False)
MANAGE = require(P.CONSENT_MANAGE)


def _auth():
    from carepost.consent import authorizations

    return authorizations


def _purposes():
    from carepost.core import purposes

    return purposes


def _headings() -> dict:
    from carepost.consent.texts import HEADINGS

    return HEADINGS


def _by(principal: Principal) -> str:
    return f"user:{principal.user_id}" if principal.user_id else f"{principal.kind}:{principal.actor_id}"


def elements_shown(purpose: str) -> list[tuple[str, str, bool]]:
    """(element, rule, required) in the order a patient reads them."""
    auth = _auth()
    required = set(auth.required_elements(purpose))
    out = []
    for element, rule in auth.ELEMENTS.items():
        if element in required:
            out.append((element, rule, True))
        elif element == "copy_statement":
            out.append((element, rule, False))
    return out


def checklist(purpose: str, elements: dict) -> dict[str, list[dict]]:
    """Per language offered (English always): each element, present or missing, with its rule."""
    auth = _auth()
    try:
        missing = auth.check_completeness(purpose, elements)
    except ValidationFailed:
        missing = []
    gaps = {(m["language"], m["element"]) for m in missing}
    languages = ["en"] + [lang for lang in auth.LANGUAGES if lang != "en" and lang in (elements or {})]
    out: dict[str, list[dict]] = {}
    for lang in languages:
        rows = []
        if (lang, "*") in gaps:
            rows.append({"element": "*", "label": "English version", "rule": "plain language (164.508(c)(3))",
                         "present": False, "required": True})
        for element, rule, required in elements_shown(purpose):
            present = (lang, element) not in gaps and (lang, "*") not in gaps if required else bool((elements.get(lang) or {}).get(element))
            rows.append({"element": element, "label": _label(element, lang), "rule": rule, "present": present, "required": required})
        out[lang] = rows
    return out


def _label(element: str, lang: str = "en") -> str:
    if element == "title":
        return "Title" if lang == "en" else "Título"
    return _headings().get(lang, _headings()["en"]).get(element, element)


def _elements_from(form: dict, purpose: str) -> dict[str, dict[str, str]]:
    """``el-<language>-<element>`` inputs to {language: {element: text}}; a language left empty
    is not offered."""
    auth = _auth()
    out: dict[str, dict[str, str]] = {}
    for lang in auth.LANGUAGES:
        values = {}
        for element, _rule, _required in elements_shown(purpose):
            value = form.get(f"el-{lang}-{element}")
            if isinstance(value, str) and value.strip():
                values[element] = value
        if values or lang == "en":
            out[lang] = values
    return out


def _versions(session, org_id: str) -> list[dict]:
    auth, purposes = _auth(), _purposes()
    groups = []
    for purpose in purposes.AUTHORIZATION_PURPOSES:
        texts = auth.list_texts(session, org_id, purpose)
        groups.append({"purpose": purpose, "label": purposes.PURPOSES[purpose], "texts": texts,
                       "current": next((t for t in texts if t.status == "published"), None),
                       "draft": next((t for t in texts if t.status == "draft"), None)})
    return groups


def _editor(request: Request, principal: Principal, text, *, elements: dict | None = None, error: str | None = None,
            field: str | None = None, notice: str | None = None, status_code: int = 200):
    auth, purposes = _auth(), _purposes()
    elements = elements if elements is not None else text.elements
    return render(request, "forms/text_editor.html", {
        "text": text, "purpose_label": purposes.PURPOSES.get(text.purpose, text.purpose),
        "elements": elements, "shown": elements_shown(text.purpose), "languages": auth.LANGUAGES,
        "checklist": checklist(text.purpose, elements), "label": _label, "editable": text.status == "draft",
        "rendered": {lang: auth.render(values, lang) for lang, values in elements.items() if values},
        "error": error, "error_field": field, "notice": notice,
        "versions": auth.list_texts(request.state.db, principal.org_id, text.purpose),
    }, status_code=status_code)


@router.get("")
def texts_page(request: Request, principal: Principal = Depends(MANAGE)):
    return render(request, "forms/texts.html", {"groups": _versions(request.state.db, principal.org_id),
                                                "notice": request.query_params.get("published")})


@router.post("/new")
def new_draft(request: Request, purpose: str = Form(""), from_text: str = Form(""), principal: Principal = Depends(MANAGE)):
    """A new draft version of a purpose's text, starting from a chosen version (or the current one)."""
    session = request.state.db
    auth, purposes = _auth(), _purposes()
    if purpose not in purposes.AUTHORIZATION_PURPOSES:
        raise ValidationFailed("Choose a purpose that needs an authorization.", field="purpose")
    existing = next((t for t in auth.list_texts(session, principal.org_id, purpose) if t.status == "draft"), None)
    if existing is not None:
        return RedirectResponse(f"/app/consent/texts/{existing.id}?existing=1", status_code=303)
    base = auth.get_text(session, principal.org_id, from_text) if from_text else auth.current_text(session, principal.org_id, purpose)
    if base is not None and base.purpose != purpose:
        raise ValidationFailed("That text is for another purpose.", field="from_text")
    elements = base.elements if base is not None else {"en": {}}
    text = auth.create_text(session, principal.org_id, purpose, elements, created_by=_by(principal))
    record_for(session, principal, request, "authorization_text.create", target_type="authorization_text", target_id=text.id,
               details={"purpose": purpose, "version": text.version, "from_version": base.version if base else None})
    session.commit()
    return RedirectResponse(f"/app/consent/texts/{text.id}", status_code=303)


@router.get("/{text_id}")
def text_page(text_id: str, request: Request, principal: Principal = Depends(MANAGE)):
    text = _auth().get_text(request.state.db, principal.org_id, text_id)
    notice = None
    if request.query_params.get("saved"):
        notice = "The draft was saved."
    elif request.query_params.get("existing"):
        notice = "A draft of this purpose already exists; edit it here."
    return _editor(request, principal, text, notice=notice)


@router.post("/{text_id}")
async def text_save(text_id: str, request: Request, principal: Principal = Depends(MANAGE)):
    session = request.state.db
    auth = _auth()
    text = auth.get_text(session, principal.org_id, text_id)
    form = dict(await request.form())
    elements = _elements_from(form, text.purpose)
    action = form.get("action", "save")
    try:
        auth.update_text(session, principal.org_id, text.id, elements)
        record_for(session, principal, request, "authorization_text.update", target_type="authorization_text",
                   target_id=text.id, details={"languages": sorted(elements)})
        if action == "publish":
            auth.publish_text(session, principal.org_id, text.id, published_by=_by(principal))
            record_for(session, principal, request, "authorization_text.publish", target_type="authorization_text",
                       target_id=text.id, details={"purpose": text.purpose, "version": text.version,
                                                   "content_hash": text.content_hash})
    except CarePostError as exc:
        session.rollback()
        text = auth.get_text(session, principal.org_id, text_id)
        if action == "publish" and exc.code == "incomplete_authorization_text":
            # keep the saved draft: save what can be saved, then explain what is missing
            try:
                auth.update_text(session, principal.org_id, text.id, elements)
                record_for(session, principal, request, "authorization_text.update", target_type="authorization_text",
                           target_id=text.id, details={"languages": sorted(elements)})
                session.commit()
            except CarePostError:
                session.rollback()
            text = auth.get_text(session, principal.org_id, text_id)
            message = "Not published: every required element must be present in every language offered. Missing items are marked below."
        else:
            message = exc.message
        return _editor(request, principal, text, elements=elements, error=message, field=exc.field,
                       status_code=422 if exc.status_code == 422 else exc.status_code)
    session.commit()
    if action == "publish":
        return RedirectResponse(f"/app/consent/texts?published={text.purpose}", status_code=303)
    return RedirectResponse(f"/app/consent/texts/{text.id}?saved=1", status_code=303)
