"""Conversions go out as webhooks (issue 13 item 8): when a goal's event is attributed to a
message, ``message.converted`` is sent — Standard Webhooks signed, verified here independently —
with ids only; the event's name only to an endpoint that receives PHI; never the properties;
nothing for an unattributed event, an idempotent replay or another organization's endpoint."""

from __future__ import annotations

import json

from carepost.core.queue import huey
from carepost.delivery import pipeline
from tests.test_analytics_feed import _contact, _send, env  # noqa: F401
from tests.test_webhooks import (  # noqa: F401
    _receiver,
    _tls_receiver,
    allow_private,
    independent_verify,
    make_endpoint,
    receiver,
    tls_receiver,
)


def test_a_conversion_is_announced_with_ids_only(env, session, tls_receiver, allow_private):  # noqa: F811
    _peers, sender, key, _, client = env
    cid = _contact(sender.org_id, "pat@valid.test")
    goal = client.post("/api/v1/goals", headers=key, json={"name": "Booked", "event_name": "appointment.booked",
                                                           "window_days": 7}).json()
    message_id = _send(client, key, ["pat@valid.test"])
    pipeline.deliver([message_id])
    _plain, plain_secret = make_endpoint(session, sender.org_id, tls_receiver.url("/plain"),
                                         event_types=["message.converted"])
    _phi, phi_secret = make_endpoint(session, sender.org_id, tls_receiver.url("/phi"),
                                     event_types=["message.converted"], include_phi=True, allow_phi=True)
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    make_endpoint(session, other.id, tls_receiver.url("/other"), event_types=["*"])

    huey.immediate = True
    try:
        body = {"name": "appointment.booked", "contact_id": cid, "properties": {"clinic": "oncology"},
                "idempotency_key": "booking-1"}
        r = client.post("/api/v1/events", headers=key, json=body)
        assert r.status_code == 201 and r.json()["conversion"]["message_id"] == message_id, r.text
        event_id = r.json()["id"]
        requests = {req.path: req for req in tls_receiver.wait(2)}
        assert set(requests) == {"/plain", "/phi"}
        plain = independent_verify(plain_secret, requests["/plain"].headers, requests["/plain"].body)
        assert plain["type"] == "message.converted"
        data = plain["data"]
        assert data.pop("occurred_at").endswith("Z")
        from sqlalchemy import select

        from carepost.delivery.models import MessageRecipient

        session.rollback()
        recipient_id = session.scalar(select(MessageRecipient.id).where(MessageRecipient.message_id == message_id))
        assert data == {"message_id": message_id, "recipient_id": recipient_id, "contact_id": cid,
                        "event_id": event_id, "goal_id": goal["id"]}
        raw = requests["/plain"].body.decode()
        assert "appointment" not in raw and "oncology" not in raw and "pat@" not in raw
        phi = independent_verify(phi_secret, requests["/phi"].headers, requests["/phi"].body)
        assert phi["data"]["event_name"] == "appointment.booked" and "oncology" not in json.dumps(phi)

        # The same key again (a replay) and an event with no goal: nothing more is sent.
        assert client.post("/api/v1/events", headers=key, json=body).headers.get("Idempotent-Replayed") == "true"
        r = client.post("/api/v1/events", headers=key, json={"name": "refill.picked_up", "contact_id": cid})
        assert r.status_code == 201 and r.json()["conversion"] is None
        assert len(tls_receiver.wait(3, timeout=1.0)) == 2
    finally:
        huey.immediate = False


def test_the_event_type_is_listed_for_subscribers(env):  # noqa: F811
    _peers, sender, _key, _masked, client = env
    r = client.get("/api/v1/webhook-event-types", headers=sender.key("webhooks:manage"))
    assert r.status_code == 200, r.text
    assert "message.converted" in json.dumps(r.json())
