"""REST routes of secure delivery: messages (transactional API), sending domains, recipient
keys, the security preview, the organization's delivery settings, and the MTA-STS policy.

* Sending needs ``messages:send``, reading ``messages:read``. Recipient addresses are PHI: a
  message is shown with masked addresses unless the caller holds ``phi:read_unmasked``; every
  read is audited with the view it got. Addresses never travel in a URL: key look-ups by address
  are a POST with the address in the body.
* A message is accepted (202) once it is stored, encrypted; delivery happens in the worker.
  ``Idempotency-Key``: the same key with the same request answers the same id, with another
  request 409.
* Sandbox credentials run the whole pipeline, but the worker captures the final message
  (encrypted) instead of sending it, and marks the recipient delivered with ``sandbox: true``.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from carepost.accounts.access import Principal, public, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.core.errors import CarePostError, Conflict
from carepost.delivery import schemas, service
from carepost.delivery.schemas import RecipientStatus

router = APIRouter(tags=["delivery"])
api = "/api/v1"


def _audit(request: Request, principal: Principal, action: str, target_type: str, target_id: str | None = None, **details):
    record_for(request.state.db, principal, request, action, target_type=target_type, target_id=target_id, details=details)


def _unmasked(principal: Principal) -> bool:
    return principal.can(P.PHI_READ_UNMASKED)


def _enqueue(message_ids: list[str]) -> None:
    from carepost.delivery.tasks import enqueue_delivery

    enqueue_delivery(message_ids)


# --------------------------------------------------------------------------- messages


@router.post(f"{api}/messages", status_code=202, response_model=schemas.MessageAccepted,
             summary="Send a message (202: stored and queued for delivery)", tags=["messages"])
async def send_message(
    request: Request,
    body: schemas.MessageIn,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=200),
    principal: Principal = Depends(require(P.MESSAGES_SEND)),
) -> dict:
    if not request.state.db.in_transaction():
        # Accepted together with the requests waiting beside it, in one transaction, while this
        # one waits on the event loop (delivery/accept_group.py); its own answer, its own error.
        from carepost.accounts.access import request_context
        from carepost.delivery import accept_group

        grouped = await accept_group.submit(principal, body, idempotency_key, request_context(request))
        if grouped.error is not None:
            raise grouped.error
        if not grouped.alone:
            return {"id": grouped.message_id}
    return await run_in_threadpool(_send_alone, request, body, idempotency_key, principal)


def _send_alone(request: Request, body: schemas.MessageIn, idempotency_key: str | None, principal: Principal) -> dict:
    """One message in its own transaction, in the request's session: when that session is
    already in a transaction (authenticated just now), or when its group failed."""
    session = request.state.db
    kwargs = dict(source="api", created_by=principal.actor_id, sandbox=principal.sandbox, idempotency_key=idempotency_key)
    try:
        accepted = service.accept_message(session, principal.org_id, body, **kwargs)
        session.flush()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
        session.rollback()
        accepted = service.accept_message(session, principal.org_id, body, **kwargs)
    message = accepted.message
    if accepted.created:
        _audit(request, principal, "message.create", "message", message.id, recipients_count=len(body.to) + len(body.cc) + len(body.bcc),
               purpose=message.purpose, security=message.security, contains_phi=message.contains_phi, sandbox=message.sandbox)
    session.commit()
    # A replay is queued again too: the first request may have died between its commit and its
    # enqueue (kill -9 of the server; tests/faults/test_server_kill.py), and the client retries
    # because it got no answer. Tasks are idempotent: a recipient claimed or sent is skipped.
    _enqueue([message.id])
    return {"id": message.id}


@router.post(f"{api}/messages/batch", status_code=202, response_model=schemas.MessageBatchAccepted,
             summary="Send up to 1,000 messages at once (all accepted or none)", tags=["messages"])
def send_batch(
    request: Request,
    body: schemas.MessageBatchIn,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=200),
    principal: Principal = Depends(require(P.MESSAGES_SEND)),
) -> dict:
    session = request.state.db
    if idempotency_key is not None:
        ids, created = _idempotent_batch(session, principal, body, idempotency_key)
    else:
        ids = [m.id for m in service.accept_batch(session, principal.org_id, body.messages, source="api",
                                                  created_by=principal.actor_id, sandbox=principal.sandbox)]
        created = True
    if created:
        _audit(request, principal, "message.create_batch", "message_batch", ids[0], messages_count=len(ids),
               message_ids=ids, sandbox=principal.sandbox)
    session.commit()
    _enqueue(ids)  # a replay too (see send_message)
    return {"ids": ids}


def _idempotent_batch(session, principal: Principal, body: schemas.MessageBatchIn, key: str) -> tuple[list[str], bool]:
    """A batch with an Idempotency-Key: message i is keyed ``<key>#<i>``. Replaying the same
    batch answers the same ids; anything else with the key is a 409."""
    service.check_idempotency_key(key)
    # Each message's request hash covers the whole batch, so any other batch under the key differs.
    batch_hash = hashlib.sha256(":".join(service.request_fingerprint(m) for m in body.messages).encode()).hexdigest()
    hashes = [hashlib.sha256(f"{batch_hash}#{i}".encode()).hexdigest() for i in range(len(body.messages))]
    first = service.find_idempotent(session, principal.org_id, service.idempotency_hash(f"{key}#0"))
    if first is not None:
        if first.request_hash != hashes[0]:
            raise Conflict("This Idempotency-Key was used with a different request.", field="Idempotency-Key",
                           code="idempotency_conflict")
        return [service.find_idempotent(session, principal.org_id, service.idempotency_hash(f"{key}#{i}")).id
                for i in range(len(body.messages))], False
    org_settings = service.delivery_settings(session, principal.org_id)
    cache: dict = {}
    prepared = [service.prepare_message(session, principal.org_id, m, prefix=f"messages.{i}.", org_settings=org_settings,
                                        domain_cache=cache, sandbox=principal.sandbox) for i, m in enumerate(body.messages)]
    for p, h in zip(prepared, hashes):
        p.request_hash = h
    stored = service.store_messages(session, principal.org_id, prepared, source="api", created_by=principal.actor_id,
                                    sandbox=principal.sandbox, idempotency_keys=[f"{key}#{i}" for i in range(len(prepared))])
    return [m.id for m in stored], True


@router.get(f"{api}/messages", response_model=schemas.MessageList, summary="Recent messages (no addresses, no content)",
            tags=["messages"])
def list_messages(
    request: Request,
    status: RecipientStatus | None = Query(None, description="Only messages with a recipient in this status."),
    source: Literal["api", "smtp", "ui", "campaign", "journey"] | None = None,
    cursor: str | None = Query(None, max_length=32),
    limit: int = Query(50, ge=1, le=200),
    principal: Principal = Depends(require(P.MESSAGES_READ)),
) -> dict:
    session = request.state.db
    data, next_cursor = service.list_messages(session, limit=limit, cursor=cursor, status=status, source=source)
    _audit(request, principal, "message.list", "message_list", None, count=len(data))
    session.commit()
    return {"data": data, "next_cursor": next_cursor}


@router.get(f"{api}/messages/{{message_id}}", response_model=schemas.MessageOut,
            summary="A message: per recipient the status, method, reason, evidence and events", tags=["messages"])
def read_message(
    request: Request,
    message_id: str,
    masked: bool = Query(False, description="Ask for masked addresses even when allowed to see them."),
    principal: Principal = Depends(require(P.MESSAGES_READ)),
) -> dict:
    session = request.state.db
    message = service.get_message(session, message_id)
    unmasked = _unmasked(principal) and not masked
    data = service.message_view(session, message, unmasked=unmasked)
    _audit(request, principal, "message.read", "message", message.id, view="unmasked" if unmasked else "masked",
           recipients_count=len(data["recipients"]))
    session.commit()
    return data


# --------------------------------------------------------------------------- organization settings


@router.get(f"{api}/delivery-settings", response_model=schemas.DeliverySettingsOut,
            summary="The organization's security mode, default purpose and relay (the password never)",
            tags=["messages"])
def read_delivery_settings(request: Request, principal: Principal = Depends(require(P.MESSAGES_READ))) -> dict:
    return service.delivery_settings(request.state.db, principal.org_id)


@router.patch(f"{api}/delivery-settings", response_model=schemas.DeliverySettingsOut,
              summary="Change the organization's security mode, default purpose or relay", tags=["messages"])
def change_delivery_settings(request: Request, body: schemas.DeliverySettingsIn,
                             principal: Principal = Depends(require(P.ORG_MANAGE))) -> dict:
    session = request.state.db
    before = service.delivery_settings(session, principal.org_id)
    changes = body.model_dump(exclude_unset=True)
    if "security_mode" in changes and changes["security_mode"] is None:
        changes.pop("security_mode")
    if "engagement_privacy" in changes and changes["engagement_privacy"] is None:
        changes.pop("engagement_privacy")
    after = service.update_delivery_settings(session, principal.org_id, changes)
    # The relay password never enters the audit trail: only whether this change set one.
    password_changed = bool(body.relay is not None and body.relay.password is not None)
    _audit(request, principal, "delivery_settings.update", "organization", principal.org_id,
           before=before, after=after, relay_password_changed=password_changed)
    session.commit()
    return after


# --------------------------------------------------------------------------- sending domains


@router.post(f"{api}/domains", status_code=201, response_model=schemas.SendingDomainOut,
             summary="Add a sending domain; answers the DNS records to publish (DKIM TXT in full)", tags=["domains"])
def add_domain(request: Request, body: schemas.SendingDomainIn, principal: Principal = Depends(require(P.DOMAINS_MANAGE))) -> dict:
    session = request.state.db
    row = service.create_sending_domain(session, principal.org_id, body.domain)
    _audit(request, principal, "sending_domain.create", "sending_domain", row.id, domain=row.domain, ownership="claimed")
    session.commit()
    return service.domain_view(row)


@router.get(f"{api}/domains", response_model=schemas.SendingDomainList, summary="Sending domains", tags=["domains"])
def list_domains(request: Request, principal: Principal = Depends(require(P.DOMAINS_MANAGE))) -> dict:
    return {"data": [service.domain_view(r) for r in service.list_sending_domains(request.state.db)]}


@router.get(f"{api}/domains/{{domain_id}}", response_model=schemas.SendingDomainOut,
            summary="A sending domain, its records and the last check", tags=["domains"])
def read_domain(request: Request, domain_id: str, principal: Principal = Depends(require(P.DOMAINS_MANAGE))) -> dict:
    return service.domain_view(service.sending_domain_by_id(request.state.db, domain_id))


@router.post(f"{api}/domains/{{domain_id}}/check", response_model=schemas.SendingDomainOut,
             summary="Look the domain's records up live: pass or fail with the reason, per record", tags=["domains"])
def check_domain(request: Request, domain_id: str, principal: Principal = Depends(require(P.DOMAINS_MANAGE))) -> dict:
    session = request.state.db
    row = service.sending_domain_by_id(session, domain_id)
    records = service.records_to_check(row)
    session.commit()  # no transaction stays open while DNS answers
    results = asyncio.run(service.check_dns(records))
    # Read it again from the database: it may have been deleted while DNS answered (404, not a
    # StaleDataError from updating a row that is gone).
    session.expire_all()
    row = service.sending_domain_by_id(session, domain_id)
    was_verified = service.is_verified(row)
    service.apply_checks(session, row, results)
    _audit(request, principal, "sending_domain.check", "sending_domain", row.id, dns_ok=row.dns_ok,
           failed=[r.purpose for r in results if not r.ok])
    if service.is_verified(row) and not was_verified:
        _audit(request, principal, "sending_domain.verify", "sending_domain", row.id, domain=row.domain)
    session.commit()
    return service.domain_view(row)


@router.post(f"{api}/domains/{{domain_id}}/verify", response_model=schemas.SendingDomainOut,
             summary="Prove ownership of the domain: look up its _carepost-challenge TXT record", tags=["domains"],
             responses={409: {"description": "Another organization on this installation has proven this domain"}})
def verify_domain(request: Request, domain_id: str, principal: Principal = Depends(require(P.DOMAINS_MANAGE))) -> dict:
    """Until its ownership is proven a domain cannot send (sandbox credentials excepted). The
    answer says whether it is ``verified``; its ``checks`` entry ``ownership`` says why not."""
    session = request.state.db
    row = service.sending_domain_by_id(session, domain_id)
    if service.is_verified(row):
        return service.domain_view(row)
    session.commit()  # no transaction stays open while DNS answers
    result = asyncio.run(service.check_ownership(row))
    session.expire_all()
    row = service.sending_domain_by_id(session, domain_id)
    try:
        verified = service.apply_ownership_check(session, row, result)
    except CarePostError:
        session.rollback()
        row = service.sending_domain_by_id(session, domain_id)
        _audit(request, principal, "sending_domain.verify", "sending_domain", row.id, domain=row.domain,
               outcome="refused", reason="domain_taken")
        session.commit()
        raise
    _audit(request, principal, "sending_domain.verify", "sending_domain", row.id, domain=row.domain,
           outcome="verified" if verified else "failed", detail=result.detail)
    session.commit()
    return service.domain_view(row)


@router.delete(f"{api}/domains/{{domain_id}}", status_code=204, summary="Remove a sending domain and its DKIM keys",
               tags=["domains"])
def delete_domain(request: Request, domain_id: str, principal: Principal = Depends(require(P.DOMAINS_MANAGE))) -> Response:
    session = request.state.db
    row = service.sending_domain_by_id(session, domain_id)
    _audit(request, principal, "sending_domain.delete", "sending_domain", row.id, domain=row.domain)
    service.delete_sending_domain(session, row)
    session.commit()
    return Response(status_code=204)


@router.get("/.well-known/mta-sts.txt", response_class=PlainTextResponse, include_in_schema=False,
            dependencies=[Depends(public("MTA-STS policy (RFC 8461) of the return-path domains; the same public text for all"))])
def mta_sts_policy() -> PlainTextResponse:
    return PlainTextResponse(service.mta_sts_policy(), media_type="text/plain")


# --------------------------------------------------------------------------- recipient keys


def _key_out(info: service.KeyInfo) -> dict:
    return {"id": info.id, "kind": info.kind, "fingerprint": info.fingerprint, "expires_at": info.expires_at,
            "expiring_soon": info.expiring_soon, "smime_capabilities": info.smime_capabilities}


@router.post(f"{api}/recipient-keys", status_code=201, response_model=schemas.RecipientKeyOut,
             summary="Put a recipient's OpenPGP or S/MIME certificate on file (422 says what is wrong with it)",
             tags=["recipient keys"])
def add_recipient_key(request: Request, body: schemas.RecipientKeyIn,
                      principal: Principal = Depends(require(P.MESSAGES_SEND))) -> dict:
    session = request.state.db
    info = service.add_recipient_key(session, principal.org_id, body.address, body.kind, body.key, actor_id=principal.actor_id,
                                     legacy_cbc=body.legacy_cbc)
    _audit(request, principal, "recipient_key.create", "recipient_key", info.id, kind=info.kind, fingerprint=info.fingerprint)
    session.commit()
    return _key_out(info)


@router.post(f"{api}/recipient-keys/search", response_model=schemas.RecipientKeyList,
             summary="The keys on file for one address (the address goes in the body, never the URL)",
             tags=["recipient keys"])
def search_recipient_keys(request: Request, body: schemas.RecipientKeySearchIn,
                          principal: Principal = Depends(require(P.MESSAGES_READ))) -> dict:
    session = request.state.db
    infos = service.recipient_key_infos(session, principal.org_id, body.address)
    shown = body.address if _unmasked(principal) else _mask(body.address)
    _audit(request, principal, "recipient_key.search", "recipient_key_list", None, count=len(infos))
    session.commit()
    return {"data": [{**_key_out(i), "address": shown} for i in infos], "expiring_soon": sum(i.expiring_soon for i in infos)}


@router.get(f"{api}/recipient-keys", response_model=schemas.RecipientKeyList,
            summary="Every key on file, flagging those that expire within 30 days", tags=["recipient keys"])
def list_recipient_keys(
    request: Request,
    expiring_only: bool = Query(False, description="Only keys that expire within 30 days."),
    limit: int = Query(200, ge=1, le=1000),
    principal: Principal = Depends(require(P.MESSAGES_READ)),
) -> dict:
    session = request.state.db
    rows = service.list_recipient_keys(session, expiring_only=expiring_only, limit=limit)
    unmasked = _unmasked(principal)
    data = []
    for row, address in rows:
        info = service.key_info(row)
        data.append({**_key_out(info), "address": address if unmasked else _mask(address)})
    _audit(request, principal, "recipient_key.list", "recipient_key_list", None, count=len(data),
           view="unmasked" if unmasked else "masked")
    session.commit()
    return {"data": data, "expiring_soon": sum(d["expiring_soon"] for d in data)}


@router.delete(f"{api}/recipient-keys/{{key_id}}", status_code=204, summary="Remove a key from file", tags=["recipient keys"])
def delete_recipient_key(request: Request, key_id: str, principal: Principal = Depends(require(P.MESSAGES_SEND))) -> Response:
    session = request.state.db
    service.delete_recipient_key(session, key_id)
    _audit(request, principal, "recipient_key.delete", "recipient_key", key_id)
    session.commit()
    return Response(status_code=204)


def _mask(address: str) -> str:
    from carepost.patients.masking import mask_email

    return mask_email(address)


# --------------------------------------------------------------------------- security preview


@router.post(f"{api}/security-preview", response_model=schemas.SecurityPreviewOut,
             summary="The method each address would get now, and why", tags=["messages"])
def security_preview(request: Request, body: schemas.SecurityPreviewIn,
                     principal: Principal = Depends(require(P.MESSAGES_SEND))) -> dict:
    session = request.state.db
    org_settings = service.delivery_settings(session, principal.org_id)
    org_mode = org_settings["security_mode"]
    keys = service.keys_on_file(session, principal.org_id, body.addresses)
    _audit(request, principal, "message.security_preview", "address_list", None, count=len(keys),
           security=body.security, contains_phi=body.contains_phi)
    session.commit()  # no transaction stays open while the TLS probes run
    rows = asyncio.run(service.security_preview(keys, org_mode=org_mode, override=body.security,
                                                contains_phi=body.contains_phi, org_relay=org_settings["relay"]))
    return {"recipients": [r.to_dict() for r in rows]}
