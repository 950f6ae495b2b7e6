"""Test sends of a message template to a seed list of staff addresses.

``POST /api/v1/templates/{id}/test-sends`` renders a version (the current one by default) and
sends it through the real delivery path — ``prepare_message`` (sending domain, security mode),
``store_messages`` (encrypted), the delivery queue — to addresses of **verified staff of the
organization** only: active users with a membership in it who accepted their invitation (a
password set: they proved they read that mailbox). Any other address is refused naming
``to.<i>``; nothing is stored.

Merge values are never a patient's: helpers are filled with their names in brackets
(``[first_name]``), or, with ``contact_id``, with that contact's data masked (``***``), so no PHI
leaves in a test. Subjects get ``[Test] ``; the purpose is administrative (no authorization is
needed to mail one's own staff) and the message is tagged ``template-test``. Delivery sits
above content, so this route lives here.
"""

from __future__ import annotations

import dataclasses
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from carepost.accounts import service as accounts
from carepost.accounts.access import Principal, require
from carepost.accounts.permissions import Permission as P
from carepost.audit.service import record_for
from carepost.content import helpers
from carepost.content import service as templates
from carepost.core.errors import ValidationFailed
from carepost.delivery import messages
from carepost.delivery.schemas import MessageIn

router = APIRouter(prefix="/api/v1", tags=["templates"])
TEST_SUBJECT_PREFIX = "[Test] "
MAX_SEED = 20


class TestSendIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    sender: str = Field(alias="from", max_length=400, description="From address in a sending domain of the organization.")
    to: list[str] = Field(min_length=1, max_length=MAX_SEED, description="Verified staff addresses of the organization.")
    version: int | None = Field(default=None, ge=1, le=1_000_000)
    language: str | None = Field(default=None, max_length=35)
    contact_id: str | None = Field(default=None, description="Fill the merge fields from this contact, masked.")


def staff_addresses(session, org_id: str) -> set[str]:
    """Addresses of the organization's verified staff (active, invitation accepted)."""
    return {user.email.lower() for user, _ in accounts.list_members(session, org_id)
            if user.is_active and user.password_hash and user.email}


def send_tests(session, principal: Principal, template_id: str, body: TestSendIn) -> list:
    org_id = principal.org_id
    template = templates.get_template(session, org_id, template_id)
    version = templates.version_for(session, template, body.version)
    if body.language is not None:
        helpers.check_language(body.language, "language")
    staff = staff_addresses(session, org_id)
    for i, address in enumerate(body.to):
        if address.strip().lower() not in staff:
            raise ValidationFailed("Test sends go only to verified staff of the organization; this address is not one.",
                                   field=f"to.{i}")
    if body.contact_id:
        rendered = templates.render_for_contacts(session, org_id, version, [body.contact_id], masked=True,
                                                 language=body.language).get(body.contact_id)
        if rendered is None:
            from carepost.core.errors import NotFound

            raise NotFound("No such contact.", field="contact_id")
    else:
        rendered = templates.render_version(version, helpers.placeholders(templates.needs_of(version)), language=body.language,
                                            visible_blocks=templates.version_blocks(version).keys())
    prepared = []
    settings = messages.delivery_settings(session, org_id)
    cache: dict = {}
    for i, address in enumerate(body.to):
        request = MessageIn(**{"from": body.sender, "to": [address], "subject": TEST_SUBJECT_PREFIX + rendered.subject,
                               "html": rendered.html or None, "text": rendered.text or None,
                               "purpose": "transactional", "contains_phi": rendered.contains_phi,
                               "tags": ["template-test"]})
        try:
            one = messages.prepare_message(session, org_id, request, org_settings=settings, domain_cache=cache)
            prepared.append(dataclasses.replace(one, template_id=version.template_id, template_version_id=version.id))
        except ValidationFailed as exc:
            if (exc.field or "").startswith("to."):
                exc.field = f"to.{i}"
            raise
    stored = messages.store_messages(session, org_id, prepared, source="api", created_by=principal.actor_id)
    return stored, version


@router.post("/templates/{template_id}/test-sends", status_code=202, summary="Send a template to staff addresses")
async def test_send(request: Request, template_id: str, body: TestSendIn,
                    principal: Principal = Depends(require(P.TEMPLATES_MANAGE))) -> dict:
    def work():
        session = request.state.db
        stored, version = send_tests(session, principal, template_id, body)
        for message in stored:
            record_for(session, principal, request, "template.test_send", target_type="message", target_id=message.id,
                       details={"template_id": template_id, "version": version.version, "masked_contact": bool(body.contact_id)})
        ids = [m.id for m in stored]
        session.commit()
        return ids, version.version

    ids, number = await run_in_threadpool(work)
    from carepost.delivery.tasks import enqueue_delivery

    enqueue_delivery(ids)
    return {"message_ids": ids, "version": number}
