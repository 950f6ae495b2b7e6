"""REST routes of the ``ehr`` capability (issue 15 item 3; docs/ehr.md).

* ``POST /api/v1/fhir/Appointment``, ``POST /api/v1/fhir/Encounter`` (``phi:write``): one FHIR R4
  resource, mapped to a contact event; answers an OperationOutcome (201 recorded, 200 already
  recorded or nothing to record, 422 naming the element, 409 a version received with other
  content). ``PUT /api/v1/fhir/Appointment/{id}`` (and Encounter): the same, as an R4 rest-hook
  with a payload sends it. ``POST /api/v1/fhir/subscription-notification``: a Subscription
  rest-hook notification (full-resource entries become events; id-only references are queued
  to be read back from the organization's FHIR server by the worker — without one they are kept
  as ``ignored`` rows with reason ``id_only``; handshake, heartbeat and an empty body record nothing).
* ``/api/v1/ehr/messages`` (list ``phi:read_masked``; retry and discard ``phi:write``): the
  messages received and the error queue — ids, codes and reasons, never the message.
* ``/api/v1/ehr/mllp-connections`` (``apikeys:manage``): the sending systems allowed to deliver
  HL7 v2 to ``carepost mllp``; the credential is shown once, when the connection is made.
  ``PATCH`` pins (or unpins) the connection to one TLS client certificate by its SHA-256.
* ``/api/v1/ehr/fhir-server`` (``apikeys:manage``): the FHIR server and SMART Backend Services
  registration id-only notifications are read back from; answers CarePost's public key (JWKS).
"""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.ehr import fhir as ehr_fhir
from carepost.ehr import service

router = APIRouter(prefix="/api/v1", tags=["ehr"])
FHIR_JSON = "application/fhir+json"
_FHIR_BODY = {"requestBody": {"required": True, "content": {
    FHIR_JSON: {"schema": {"type": "object", "additionalProperties": True}},
    "application/json": {"schema": {"type": "object", "additionalProperties": True}}}}}


_OUTCOME = {FHIR_JSON: {"schema": {"type": "object", "additionalProperties": True}}}
# The app's own input guard (control characters, sizes…) answers before the route, in its Error shape.
_OUTCOME_OR_ERROR = {**_OUTCOME, "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_FHIR_ANSWERS = {201: {"description": "Recorded (OperationOutcome)", "content": _OUTCOME},
                 400: {"description": "Not JSON, or not a FHIR resource (OperationOutcome)", "content": _OUTCOME_OR_ERROR},
                 422: {"description": "OperationOutcome naming the element, or the input guard's Error",
                       "content": _OUTCOME_OR_ERROR}}


class FhirJSONResponse(JSONResponse):
    """A FHIR answer (OperationOutcome): documented and sent as ``application/fhir+json``."""

    media_type = FHIR_JSON


def _fhir_response(status: int, issues: list[dict]) -> JSONResponse:
    return FhirJSONResponse(ehr_fhir.operation_outcome(issues), status_code=status, media_type=FHIR_JSON,
                        headers={"Cache-Control": "no-store"})


async def _read_json(request: Request):
    body = await request.body()
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ehr_fhir.FhirProblem(400, "structure", "The body is not valid JSON.", None) from None


def _audit(session, principal, request, outcome: service.Outcome) -> None:
    if outcome.status == "recorded":
        record_for(session, principal, request, "contact_event.create", target_type="contact",
                   target_id=outcome.contact_id, details={"event_id": outcome.event_id, "name": outcome.event_name,
                                                          "source": "fhir", "ehr_message_id": outcome.message_id})
    elif outcome.status == "error":
        record_for(session, principal, request, "ehr_message.queue", target_type="ehr_message",
                   target_id=outcome.message_id, outcome="failure",
                   details={"source": "fhir", "reason_code": outcome.reason_code, "field": outcome.field})


def _outcome_issue(outcome: service.Outcome, where: str | None = None) -> tuple[int, dict]:
    if outcome.status == "recorded":
        return 201, ehr_fhir.issue("information", "informational",
                                   f"Recorded {outcome.event_name} as event {outcome.event_id} "
                                   f"(message {outcome.message_id}).", where)
    if outcome.status == "replayed":
        return 200, ehr_fhir.issue("information", "informational",
                                   f"Already received: message {outcome.message_id}"
                                   + (f", event {outcome.event_id}." if outcome.event_id else "."), where)
    if outcome.status == "ignored":
        return 200, ehr_fhir.issue("information", "informational",
                                   f"{outcome.text} (message {outcome.message_id})", where)
    code = "not-found" if outcome.reason_code in ("patient_not_found", "no_patient") else "processing"
    return 422, ehr_fhir.issue("error", code, f"{outcome.text} Kept in the error queue as message "
                               f"{outcome.message_id}.", outcome.field)


async def _post_resource(request: Request, principal: Principal, expected: str,
                         resource_id: str | None = None) -> JSONResponse:
    from starlette.concurrency import run_in_threadpool

    try:
        resource = await _read_json(request)
    except ehr_fhir.FhirProblem as problem:
        return _fhir_response(problem.status, [ehr_fhir.issue("error", problem.code, problem.text, problem.expression)])

    def run() -> JSONResponse:
        session = request.state.db
        try:
            if resource is None:
                raise ehr_fhir.FhirProblem(400, "required", f"The body is a FHIR {expected} resource.", None)
            if resource_id is not None and isinstance(resource, dict) and resource.get("id") != resource_id:
                raise ehr_fhir.FhirProblem(400, "invalid", f"{expected}.id must be the id in the URL.",
                                           f"{expected}.id")
            outcome = ehr_fhir.ingest(session, principal.org_id, resource, expected=expected,
                                      actor_id=principal.actor_id)
        except ehr_fhir.FhirProblem as problem:
            session.rollback()
            return _fhir_response(problem.status, [ehr_fhir.issue("error", problem.code, problem.text,
                                                                  problem.expression)])
        _audit(session, principal, request, outcome)
        session.commit()
        status, issue = _outcome_issue(outcome)
        return _fhir_response(status, [issue])

    return await run_in_threadpool(run)


@router.post("/fhir/Appointment", summary="A FHIR R4 Appointment, mapped to an appointment event",
             openapi_extra=_FHIR_BODY, response_class=FhirJSONResponse, responses=_FHIR_ANSWERS)
async def post_appointment(request: Request, principal: Principal = Depends(require(P.PHI_WRITE))) -> JSONResponse:
    return await _post_resource(request, principal, "Appointment")


@router.post("/fhir/Encounter", summary="A FHIR R4 Encounter, mapped to an admission, discharge or visit event",
             openapi_extra=_FHIR_BODY, response_class=FhirJSONResponse, responses=_FHIR_ANSWERS)
async def post_encounter(request: Request, principal: Principal = Depends(require(P.PHI_WRITE))) -> JSONResponse:
    return await _post_resource(request, principal, "Encounter")


@router.put("/fhir/Appointment/{resource_id}",
            summary="A FHIR R4 Appointment by id (an R4 rest-hook with a payload PUTs <endpoint>/Appointment/<id>)",
            openapi_extra=_FHIR_BODY, response_class=FhirJSONResponse, responses=_FHIR_ANSWERS)
async def put_appointment(request: Request, resource_id: str = Path(max_length=64),
                          principal: Principal = Depends(require(P.PHI_WRITE))) -> JSONResponse:
    return await _post_resource(request, principal, "Appointment", resource_id)


@router.put("/fhir/Encounter/{resource_id}",
            summary="A FHIR R4 Encounter by id (an R4 rest-hook with a payload PUTs <endpoint>/Encounter/<id>)",
            openapi_extra=_FHIR_BODY, response_class=FhirJSONResponse, responses=_FHIR_ANSWERS)
async def put_encounter(request: Request, resource_id: str = Path(max_length=64),
                        principal: Principal = Depends(require(P.PHI_WRITE))) -> JSONResponse:
    return await _post_resource(request, principal, "Encounter", resource_id)


@router.post("/fhir/subscription-notification",
             summary="A FHIR Subscription rest-hook notification (full-resource, id-only, empty, handshake, "
                     "heartbeat) or an R4 empty-body ping",
             openapi_extra={"requestBody": {**_FHIR_BODY["requestBody"], "required": False}},
             response_class=FhirJSONResponse, responses={400: _FHIR_ANSWERS[400], 422: _FHIR_ANSWERS[422]})
async def post_notification(request: Request, principal: Principal = Depends(require(P.PHI_WRITE))) -> JSONResponse:
    from starlette.concurrency import run_in_threadpool

    try:
        bundle = await _read_json(request)
        if bundle is None:  # an R4 rest-hook with payload empty: "something changed", nothing named
            return _fhir_response(200, [ehr_fhir.issue(
                "information", "informational", "An empty notification names no resource: nothing to record. "
                "Set the Subscription's payload to application/fhir+json (full resources) for events.")])
        note = ehr_fhir.read_notification(bundle)
    except ehr_fhir.FhirProblem as problem:
        return _fhir_response(problem.status, [ehr_fhir.issue("error", problem.code, problem.text,
                                                              problem.expression)])
    if note.type in ehr_fhir.NOTHING_TO_RECORD:
        return _fhir_response(200, [ehr_fhir.issue("information", "informational",
                                                   f"A {note.type} notification: nothing to record.")])

    def run() -> JSONResponse:
        session = request.state.db
        issues, failed = [], False
        for i, resource in note.full:
            where = f"Bundle.entry[{i}].resource"
            try:
                with session.begin_nested():
                    outcome = ehr_fhir.ingest(session, principal.org_id, resource, expected=None,
                                              actor_id=principal.actor_id, where=where)
            except ehr_fhir.FhirProblem as problem:
                failed = True
                issues.append(ehr_fhir.issue("error", problem.code, problem.text, problem.expression))
                continue
            _audit(session, principal, request, outcome)
            status, issue = _outcome_issue(outcome, where)
            if status == 422:
                failed = True
                issue["expression"] = [f"{where}.{(outcome.field or '').split('.', 1)[-1]}".rstrip(".")]
            issues.append(issue)
        for item in note.ids:
            outcome = ehr_fhir.record_id_only(session, principal.org_id, note, item, actor_id=principal.actor_id)
            ref = f"{item[1]}/{item[2]}" + (f"/_history/{item[3]}" if item[3] else "")
            if outcome.message_id is None:
                text = f"{ref}: {outcome.text}"
            elif outcome.status == "queued":
                text = (f"{ref}: id-only; queued as message {outcome.message_id} to be read from the organization's "
                        "FHIR server and recorded as a full resource.")
            elif outcome.status == "replayed":
                text = f"{ref}: id-only, already received as message {outcome.message_id}; no event recorded."
            else:
                text = f"{ref}: {outcome.text} Kept as message {outcome.message_id} (status ignored, reason id_only)."
            issues.append(ehr_fhir.issue("warning", "informational", text, item[0]))
        session.commit()
        if not issues:
            issues.append(ehr_fhir.issue("information", "informational",
                                         f"The notification names no resource ({note.events_in_status} event(s), "
                                         "payload empty): nothing to record."))
        return _fhir_response(422 if failed else 200, issues)

    return await run_in_threadpool(run)


# --------------------------------------------------------------------------- messages and the error queue


class EhrMessageOut(BaseModel):
    id: str
    source: str
    message_type: str
    control_id: str | None
    status: str
    ack_code: str
    event_name: str | None
    reason_code: str | None
    reason: str | None
    field: str | None
    contact_id: str | None
    event_id: str | None
    connection_id: str | None
    attempts: int
    next_attempt_at: str | None = None  # a queued FHIR read-back: when its next (automatic) attempt is due
    received_at: str | None
    updated_at: str | None


class RetryOut(BaseModel):
    retried: int
    recorded: int
    still_failing: int
    messages: list[EhrMessageOut]


@router.get("/ehr/messages", response_model=list[EhrMessageOut],
            summary="Messages received from clinical systems; by default the error queue")
def list_messages(request: Request,
                  status: Literal["recorded", "ignored", "error", "discarded", "queued", "all"] = "error",
                  limit: int = Query(100, ge=1, le=500),
                  before: str | None = Query(None, max_length=32, pattern=r"^[0-9a-f]{32}$"),
                  principal: Principal = Depends(require(P.PHI_READ_MASKED))) -> list[dict]:
    rows = service.list_messages(request.state.db, principal.org_id, status=None if status == "all" else status,
                                 limit=limit, before=before)
    return [service.message_out(r) for r in rows]


@router.get("/ehr/messages/{message_id}", response_model=EhrMessageOut, summary="One received message (no content)")
def get_message(request: Request, message_id: str, principal: Principal = Depends(require(P.PHI_READ_MASKED))) -> dict:
    return service.message_out(service.get_message(request.state.db, principal.org_id, message_id))


def _retry(request: Request, principal: Principal, rows) -> dict:
    session = request.state.db
    out, recorded = [], 0
    for row in rows:
        outcome = service.retry_message(session, principal.org_id, row, actor_type=principal.kind,
                                        actor_id=principal.actor_id, ip=request.client.host if request.client else None)
        recorded += outcome.status == "recorded"
        out.append(service.message_out(row))
    session.commit()
    return {"retried": len(out), "recorded": recorded, "still_failing": len(out) - recorded, "messages": out}


@router.post("/ehr/messages/{message_id}/retry", response_model=RetryOut,
             summary="Process a message of the error queue again")
def retry_message(request: Request, message_id: str, principal: Principal = Depends(require(P.PHI_WRITE))) -> dict:
    row = service.get_message(request.state.db, principal.org_id, message_id)
    return _retry(request, principal, [row])


@router.post("/ehr/messages/retry", response_model=RetryOut,
             summary="Process the error queue again (up to 500 messages, oldest first)")
def retry_all(request: Request, principal: Principal = Depends(require(P.PHI_WRITE))) -> dict:
    rows = service.list_messages(request.state.db, principal.org_id, status="error", limit=500)
    return _retry(request, principal, list(reversed(rows)))


@router.post("/ehr/messages/{message_id}/discard", response_model=EhrMessageOut,
             summary="Take a message out of the error queue (its content is destroyed)")
def discard_message(request: Request, message_id: str, principal: Principal = Depends(require(P.PHI_WRITE))) -> dict:
    session = request.state.db
    row = service.get_message(session, principal.org_id, message_id)
    service.discard_message(session, row)
    record_for(session, principal, request, "ehr_message.discard", target_type="ehr_message", target_id=row.id,
               details={"source": row.source, "reason_code": row.reason_code})
    session.commit()
    return service.message_out(row)


# --------------------------------------------------------------------------- MLLP connections


_PIN = ("SHA-256 fingerprint of the TLS client certificate (its DER encoding; 64 hex digits, colons allowed) this "
        "system must present: a message claiming this connection from any other TLS session is rejected (AR). Needs "
        "CAREPOST_MLLP_CLIENT_CA_FILE on the listener.")


class ConnectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=120)
    sending_facilities: list[str] = Field(min_length=1, max_length=service.MAX_FACILITIES,
                                          description="MSH-4 namespace ids this system sends as.")
    mrn_system: str | None = Field(None, max_length=255, description="Identifier system of the MRNs in PID-3; "
                                   "empty: every MRN system of the organization.")
    time_zone: str = Field("UTC", max_length=64, description="IANA time zone of HL7 times without an offset.")
    client_cert_sha256: str | None = Field(None, max_length=120, description=_PIN)


class ConnectionPinIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_cert_sha256: str | None = Field(..., max_length=120, description=_PIN + " null removes the pin.")


class ConnectionOut(BaseModel):
    id: str
    name: str
    key_id: str
    sending_facilities: list[str]
    mrn_system: str | None
    time_zone: str
    client_cert_sha256: str | None = None
    created_at: str | None
    revoked_at: str | None
    credential: str | None = Field(None, description="Shown once: put it in MSH-8 of every message.")


@router.get("/ehr/mllp-connections", response_model=list[ConnectionOut], summary="Systems allowed to send HL7 v2")
def list_connections(request: Request, principal: Principal = Depends(require(P.APIKEYS_MANAGE))) -> list[dict]:
    return [service.connection_out(c) for c in service.list_connections(request.state.db, principal.org_id)]


@router.post("/ehr/mllp-connections", status_code=201, response_model=ConnectionOut,
             summary="Allow a system to send HL7 v2 over MLLP (the credential is shown once)")
def create_connection(request: Request, body: ConnectionIn,
                      principal: Principal = Depends(require(P.APIKEYS_MANAGE))) -> dict:
    session = request.state.db
    conn, credential = service.create_connection(session, principal.org_id, name=body.name,
                                                 sending_facilities=body.sending_facilities,
                                                 mrn_system=body.mrn_system, time_zone=body.time_zone,
                                                 created_by=principal.actor_id,
                                                 client_cert_sha256=body.client_cert_sha256)
    record_for(session, principal, request, "mllp_connection.create", target_type="mllp_connection",
               target_id=conn.id, details={"key_id": conn.key_id, "facilities": len(conn.sending_facilities),
                                           "client_cert_pinned": conn.client_cert_sha256 is not None})
    session.commit()
    return {**service.connection_out(conn), "credential": credential}


@router.delete("/ehr/mllp-connections/{connection_id}", response_model=ConnectionOut,
               summary="Revoke a system's MLLP credential")
def revoke_connection(request: Request, connection_id: str,
                      principal: Principal = Depends(require(P.APIKEYS_MANAGE))) -> dict:
    session = request.state.db
    conn = service.get_connection(session, principal.org_id, connection_id)
    service.revoke_connection(session, conn)
    record_for(session, principal, request, "mllp_connection.revoke", target_type="mllp_connection",
               target_id=conn.id, details={"key_id": conn.key_id})
    session.commit()
    return service.connection_out(conn)


@router.patch("/ehr/mllp-connections/{connection_id}", response_model=ConnectionOut,
              summary="Pin a system's MLLP connection to one TLS client certificate (or remove the pin)")
def pin_connection(request: Request, connection_id: str, body: ConnectionPinIn,
                   principal: Principal = Depends(require(P.APIKEYS_MANAGE))) -> dict:
    session = request.state.db
    conn = service.get_connection(session, principal.org_id, connection_id)
    service.pin_client_certificate(session, conn, body.client_cert_sha256)
    record_for(session, principal, request, "mllp_connection.pin", target_type="mllp_connection",
               target_id=conn.id, details={"key_id": conn.key_id, "client_cert_sha256": conn.client_cert_sha256})
    session.commit()
    return service.connection_out(conn)


# --------------------------------------------------------------------------- the FHIR server (id-only notifications)


class FhirServerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_url: str = Field(max_length=500, description="FHIR R4 base URL of the EHR (https).")
    token_url: str = Field(max_length=500, description="SMART Backend Services token endpoint (https).")
    client_id: str = Field(max_length=255, description="The client id the EHR registered for CarePost.")
    algorithm: Literal["ES384", "RS384"] = Field("ES384", description="Signature of the client assertion.")
    scope: str | None = Field(None, max_length=500, description="SMART scopes asked for; default "
                              "system/Appointment.read system/Encounter.read.")
    new_key: bool = Field(False, description="Make a new signing key (register the new JWKS with the EHR).")


class FhirServerOut(BaseModel):
    base_url: str
    token_url: str
    client_id: str
    scope: str
    algorithm: str
    key_id: str
    jwks: dict = Field(description="CarePost's public key: register it with the EHR for this client id.")
    updated_at: str | None


@router.get("/ehr/fhir-server", response_model=FhirServerOut,
            summary="The FHIR server id-only notifications are read back from, and CarePost's public key (JWKS)")
def get_fhir_server(request: Request, principal: Principal = Depends(require(P.APIKEYS_MANAGE))) -> dict:
    from carepost.core.errors import NotFound
    from carepost.ehr import fhir_fetch

    row = fhir_fetch.get_server(request.state.db, principal.org_id)
    if row is None:
        raise NotFound("No FHIR server is set for this organization.", field="fhir_server")
    return fhir_fetch.server_out(row)


@router.put("/ehr/fhir-server", response_model=FhirServerOut,
            summary="Set the FHIR server and the SMART Backend Services registration used to read id-only "
                    "notifications' resources")
def put_fhir_server(request: Request, body: FhirServerIn,
                    principal: Principal = Depends(require(P.APIKEYS_MANAGE))) -> dict:
    from carepost.ehr import fhir_fetch

    session = request.state.db
    row = fhir_fetch.configure(session, principal.org_id, base_url=body.base_url, token_url=body.token_url,
                               client_id=body.client_id, algorithm=body.algorithm, scope=body.scope,
                               new_key=body.new_key, created_by=principal.actor_id)
    record_for(session, principal, request, "ehr_fhir_server.set", target_type="ehr_fhir_server", target_id=row.id,
               details={"key_id": row.key_id, "algorithm": row.algorithm})
    session.commit()
    return fhir_fetch.server_out(row)


@router.delete("/ehr/fhir-server", status_code=204, summary="Forget the FHIR server (and CarePost's key for it)")
def delete_fhir_server(request: Request, principal: Principal = Depends(require(P.APIKEYS_MANAGE))) -> None:
    from carepost.ehr import fhir_fetch

    session = request.state.db
    fhir_fetch.remove(session, principal.org_id)
    record_for(session, principal, request, "ehr_fhir_server.remove", target_type="ehr_fhir_server",
               target_id=principal.org_id)
    session.commit()
