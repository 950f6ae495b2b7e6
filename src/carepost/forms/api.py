"""REST routes of forms: build (CRUD, publish), read submissions, survey results.

* Building needs ``forms:manage``. Definitions hold no PHI.
* Submissions hold PHI: reading them needs ``forms:manage`` and ``phi:read_masked``; fields
  flagged PHI (and every contact field that is a direct identifier) are masked unless the caller
  holds ``phi:read_unmasked`` and does not ask for ``masked=true``. Every read is audited with
  the submission ids and the view, never a value.
* Survey results are aggregates of de-identified tallies (``forms:manage``).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.forms import service
from carepost.forms.schemas import FormIn, FormOut, SubmissionOut, SurveyResults
from carepost.patients import masking

router = APIRouter(prefix="/api/v1", tags=["forms"])

Status = Literal["received", "pending_confirmation", "confirmed", "expired"]


def _audit(request: Request, principal: Principal, action: str, target_id: str | None, target_type: str = "form", **details):
    record_for(request.state.db, principal, request, action, target_type=target_type, target_id=target_id, details=details)


def _out(session, form) -> dict:
    return service.form_dict(form, service.submission_count(session, form.id))


@router.post("/forms", status_code=201, response_model=FormOut, summary="Create a form (a draft until published)")
def create_form(request: Request, body: FormIn, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    session = request.state.db
    form = service.create_form(session, principal.org_id, body, created_by=principal.actor_id)
    _audit(request, principal, "form.create", form.id, kind=form.kind)
    session.commit()
    return JSONResponse(FormOut(**_out(session, form)).model_dump(mode="json"), status_code=201)


@router.get("/forms", summary="List forms")
def list_forms(request: Request, principal: Principal = Depends(require(P.FORMS_MANAGE))) -> dict:
    session = request.state.db
    counts = service.submission_counts(session, principal.org_id)
    forms = service.list_forms(session, principal.org_id)
    return {"data": [FormOut(**service.form_dict(f, counts.get(f.id, 0))).model_dump(mode="json") for f in forms]}


@router.get("/forms/{form_id}", response_model=FormOut, summary="Read a form's definition")
def read_form(request: Request, form_id: str, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    session = request.state.db
    return _out(session, service.get_form(session, form_id))


@router.put("/forms/{form_id}", response_model=FormOut, summary="Replace a form's definition (a new version when it changes)")
def update_form(request: Request, form_id: str, body: FormIn, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    session = request.state.db
    form = service.get_form(session, form_id)
    service.update_form(session, form, body)
    _audit(request, principal, "form.update", form.id, version=form.version)
    session.commit()
    return _out(session, form)


@router.post("/forms/{form_id}/publish", response_model=FormOut, summary="Publish: the hosted form accepts submissions")
def publish_form(request: Request, form_id: str, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    session = request.state.db
    form = service.get_form(session, form_id)
    service.publish(session, form)
    _audit(request, principal, "form.publish", form.id, version=form.version)
    session.commit()
    return _out(session, form)


@router.post("/forms/{form_id}/unpublish", response_model=FormOut, summary="Unpublish: the hosted form closes")
def unpublish_form(request: Request, form_id: str, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    session = request.state.db
    form = service.get_form(session, form_id)
    service.unpublish(session, form)
    _audit(request, principal, "form.unpublish", form.id)
    session.commit()
    return _out(session, form)


@router.delete("/forms/{form_id}", status_code=204, summary="Delete a form that has no submissions")
def delete_form(request: Request, form_id: str, principal: Principal = Depends(require(P.FORMS_MANAGE))) -> Response:
    session = request.state.db
    form = service.get_form(session, form_id)
    service.delete_form(session, form)
    _audit(request, principal, "form.delete", form_id)
    session.commit()
    return Response(status_code=204)


@router.get("/forms/{form_id}/results", response_model=SurveyResults, summary="Survey results: counts per option, average ratings")
def survey_results(request: Request, form_id: str, principal: Principal = Depends(require(P.FORMS_MANAGE))):
    session = request.state.db
    return service.survey_results(session, service.get_form(session, form_id))


@router.get("/forms/{form_id}/submissions", summary="List a form's submissions, newest first")
def list_submissions(
    request: Request,
    form_id: str,
    status: Status | None = None,
    cursor: str | None = Query(None, max_length=64),
    limit: int = Query(50, ge=1, le=200),
    masked: bool = Query(False, description="Ask for the masked view even when allowed to see clear values."),
    principal: Principal = Depends(require(P.FORMS_MANAGE, P.PHI_READ_MASKED)),
) -> dict:
    session = request.state.db
    form = service.get_form(session, form_id)
    rows, next_cursor = service.list_submissions(session, form, status=status, before=cursor, limit=limit)
    unmasked = masking.wants_unmasked(principal, masked)
    data = [SubmissionOut(**service.submission_dict(session, form, s, unmasked=unmasked)).model_dump(mode="json") for s in rows]
    _audit(request, principal, "form.submission.list", form.id, view="unmasked" if unmasked else "masked",
           count=len(data), submission_ids=[d["id"] for d in data])
    session.commit()
    return {"data": data, "next_cursor": next_cursor}


@router.get("/forms/{form_id}/submissions/{submission_id}", response_model=SubmissionOut, summary="Read one submission")
def read_submission(request: Request, form_id: str, submission_id: str, masked: bool = False,
                    principal: Principal = Depends(require(P.FORMS_MANAGE, P.PHI_READ_MASKED))):
    session = request.state.db
    form = service.get_form(session, form_id)
    sub = service.get_submission(session, form, submission_id)
    unmasked = masking.wants_unmasked(principal, masked)
    data = service.submission_dict(session, form, sub, unmasked=unmasked)
    _audit(request, principal, "form.submission.read", sub.id, target_type="form_submission", form_id=form.id,
           view="unmasked" if unmasked else "masked")
    session.commit()
    return data


@router.get("/forms/{form_id}/submissions/{submission_id}/signature.png", summary="The drawn signature of a submission",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
def submission_signature(request: Request, form_id: str, submission_id: str,
                         principal: Principal = Depends(require(P.FORMS_MANAGE, P.PHI_READ_UNMASKED))) -> Response:
    session = request.state.db
    form = service.get_form(session, form_id)
    sub = service.get_submission(session, form, submission_id)
    png = service.signature_png(session, sub)
    if png is None:
        from carepost.core.errors import NotFound

        raise NotFound("This submission has no drawn signature.", field="submission_id")
    _audit(request, principal, "form.submission.signature.read", sub.id, target_type="form_submission", form_id=form.id)
    session.commit()
    return Response(png, media_type="image/png")
