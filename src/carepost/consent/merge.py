"""Consent data for message templates' merge-field helpers, loaded set-wise for a chunk.

``content.helpers`` (below consent in the layers) declares the ``content.load_consent_data``
port; the composition root fills it with :func:`load`. One query per chunk, only when a template
uses a consent helper (``subscribed_topics``).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.consent.models import Subscription, Topic


def load(session: Session, org_id: str, contact_ids: list[str]) -> dict[str, dict]:
    """``{contact_id: {"subscribed_topics": [{"name", "key"}, ...]}}`` (topics by name)."""
    out: dict[str, dict] = {cid: {"subscribed_topics": []} for cid in contact_ids}
    rows = session.execute(select(Subscription.contact_id, Topic.name, Topic.key).join(
        Topic, Topic.id == Subscription.topic_id).where(
        Subscription.org_id == org_id, Subscription.contact_id.in_(list(contact_ids)),
        Subscription.status == "subscribed").order_by(Topic.name))
    for contact_id, name, key in rows:
        out[contact_id]["subscribed_topics"].append({"name": name, "key": key})
    return out
