"""API shapes of outbound webhooks. Responses never carry a secret except the one-time answer to
creating an endpoint or rotating its secret; the delivery log carries codes, never bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from carepost.core import clock


class EventTypeOut(BaseModel):
    type: str
    description: str


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2000, description="https:// (or http://) URL that receives the POSTs")
    event_types: list[str] = Field(min_length=1, max_length=100,
                                   description='Event types to receive, or ["*"] for all (see /webhook-event-types)')
    description: str = Field("", max_length=200)
    include_phi: bool = Field(False, description="Add PHI (e.g. the recipient's address) to payloads. Needs "
                              "phi:read_unmasked and an https URL; every delivery is audited as a disclosure.")


class WebhookPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(None, max_length=2000)
    event_types: list[str] | None = Field(None, min_length=1, max_length=100)
    description: str | None = Field(None, max_length=200)
    include_phi: bool | None = None
    enabled: bool | None = Field(None, description="Re-enable an endpoint disabled by a 410 answer, or pause one")


class WebhookOut(BaseModel):
    id: str
    url: str
    description: str
    event_types: list[str]
    include_phi: bool
    enabled: bool
    disabled_reason: str | None
    secret_hint: str = Field(description="The secret's prefix and last characters, to tell secrets apart")
    created_at: datetime
    updated_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="The signing secret (whsec_...), shown only in this response")


class SecretOut(BaseModel):
    secret: str = Field(description="The new signing secret, shown only in this response; the old one stops at once")


class AttemptOut(BaseModel):
    attempt: int
    started_at: datetime
    duration_ms: int | None
    status_code: int | None
    outcome: Literal["succeeded", "failed", "gone", "refused"]
    error: str | None


class DeliveryOut(BaseModel):
    id: str
    event_id: str = Field(description="The webhook-id header of every attempt")
    event_type: str
    replay_of: str | None
    status: Literal["pending", "succeeded", "failed", "cancelled"]
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None
    log: list[AttemptOut] = Field(default_factory=list)


def endpoint_out(row) -> dict:
    return {
        "id": row.id, "url": row.url, "description": row.description, "event_types": list(row.event_types or []),
        "include_phi": row.include_phi, "enabled": row.enabled, "disabled_reason": row.disabled_reason,
        "secret_hint": row.secret_hint, "created_at": clock.aware(row.created_at),
        "updated_at": clock.aware(row.updated_at),
    }


def delivery_out(delivery, event_type: str, attempts=()) -> dict:
    return {
        "id": delivery.id, "event_id": delivery.event_id, "event_type": event_type, "replay_of": delivery.replay_of,
        "status": delivery.status, "attempts": delivery.attempts,
        "next_attempt_at": clock.aware(delivery.next_attempt_at) if delivery.status == "pending" else None,
        "last_status_code": delivery.last_status_code, "last_error": delivery.last_error,
        "created_at": clock.aware(delivery.created_at), "finished_at": clock.aware(delivery.finished_at),
        "log": [{"attempt": a.attempt, "started_at": clock.aware(a.started_at), "duration_ms": a.duration_ms,
                 "status_code": a.status_code, "outcome": a.outcome, "error": a.error} for a in attempts],
    }
