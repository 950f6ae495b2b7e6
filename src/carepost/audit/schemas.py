"""Shapes of the audit API (the OpenAPI document is generated from these)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class AuditEventOut(BaseModel):
    id: str
    chain: str = Field(description="The organization id (each organization has its own hash chain).")
    seq: int = Field(description="Position in the chain, 1..n.")
    org_id: str | None
    occurred_at: str = Field(description="UTC, ISO 8601 with microseconds (the form the hash covers).")
    actor_type: str = Field(description="user | api_credential | system | anonymous | patient")
    actor_id: str | None
    on_behalf_of: str | None
    action: str
    target_type: str | None
    target_id: str | None
    outcome: str = Field(description="success | failure | denied")
    ip: str | None
    user_agent: str | None
    request_id: str | None
    details: dict
    prev_hash: str
    hash: str


class AuditEventPage(BaseModel):
    data: list[AuditEventOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null on the last page.")


class VerifyProblemOut(BaseModel):
    kind: str = Field(
        description="missing | duplicate | altered | reordered | inserted | broken_link | head_mismatch | truncated | "
        "checkpoint_mismatch | checkpoint_invalid | key_missing | key_unavailable | anchor_invalid"
    )
    chain: str
    seq: int | None
    event_id: str | None
    message: str


class VerifyCheckpointOut(BaseModel):
    source: str
    seq: int
    written_at: str
    status: str


class VerifyAnchorOut(BaseModel):
    seq: int = Field(description="The last event a retention purge removed: the chain starts at seq + 1.")
    event_id: str
    occurred_at: str
    removed: int = Field(description="Events removed from the chain's start so far.")
    written_at: str
    signature_valid: bool = Field(description="Whether the anchor's MAC (under the chain's audit key) is valid.")
    state: str = Field(description="valid | anchor_invalid (written or altered without the key) | missing (the "
                       "first remaining event is not seq + 1) | broken_link (it does not link to the anchor's hash)")


class VerifyResultOut(BaseModel):
    ok: bool
    chain: str
    events_checked: int
    newest_seq: int
    head_seq: int | None
    checkpoints: list[VerifyCheckpointOut]
    anchor: VerifyAnchorOut | None = Field(None, description="Where the chain starts after a retention purge (null: at seq 1).")
    problem: VerifyProblemOut | None
    warnings: list[str]
    verified_at: str
