"""The audience of a campaign, the legal facts that vary per recipient, and the pre-launch
compliance report.

* **Audience**: the segment minus the exclusion segments, as one segment-language tree
  (``in segment A and not (in segment X or in segment Y)``) compiled to one statement by the
  segments capability; walked in chunks of contact ids by keyset (``contacts.id > cursor``).
* **Per-recipient facts** (issue 14 item 2): a campaign declares its remuneration (none / cost /
  other) and, for a refill reminder, the drug; a patient whose prescription of it lapsed more
  than 90 days ago (or who has none) gets a marketing message, which needs an authorization,
  while one whose prescription is current does not. ``planning.eligibility`` decides it per
  chunk from the stored medication facts; the report runs the very same function, so its counts
  are what planning will write.
* **The compliance report**: before anything is sent, how many of the audience each
  eligibility rule excludes (through the one set-based ``consent.service.check_eligibility``),
  the PHI categories the template version reveals, the secure-delivery mode, the legal basis,
  and a sample render for one contact (masked unless the viewer holds ``phi:read_unmasked``,
  audited).
"""

from __future__ import annotations

from collections import Counter

from sqlalchemy.orm import Session

from carepost.accounts.permissions import Permission
from carepost.campaigns.models import Campaign
from carepost.core import purposes
from carepost.core.errors import ValidationFailed

CHUNK = 1000


def _remuneration(row: Campaign) -> str:
    from carepost.campaigns.service import REMUNERATION_FOR_CONSENT

    return REMUNERATION_FOR_CONSENT.get(row.remuneration or "none", "none")


# --------------------------------------------------------------------------- audience

def audience_tree(row: Campaign) -> dict:
    if not row.segment_id:
        raise ValidationFailed("The campaign has no segment.", field="segment_id")
    base = {"type": "segment", "segment": row.segment_id}
    excluded = [{"type": "segment", "segment": s} for s in (row.exclusion_segment_ids or [])]
    if not excluded:
        return base
    return {"and": [base, {"not": excluded[0] if len(excluded) == 1 else {"or": excluded}}]}


def compile_audience(session: Session, org_id: str, row: Campaign, actor):
    """The audience compiled for ``actor`` (refused without unmasked rights when sensitive)."""
    from carepost.segments.service import compile_for

    return compile_for(session, org_id, audience_tree(row), actor)


def audience_predicate(session: Session, org_id: str, row: Campaign):
    """``(WHERE clause over contacts, sensitive)`` for set-wise counts that show no member (the
    calendar's overlaps); ``(None, False)`` when a segment is gone."""
    from carepost.core.errors import NotFound
    from carepost.segments.language import SegmentQueryError
    from carepost.segments.service import SYSTEM, compile_for

    try:
        compiled = compile_for(session, org_id, audience_tree(row), SYSTEM)
    except (NotFound, SegmentQueryError, ValidationFailed):
        return None, False
    return compiled.predicate, bool(compiled.sensitive)


# --------------------------------------------------------------------------- per-recipient facts

def eligibility_for(session: Session, row: Campaign, contact_ids: list[str], *, at=None) -> dict[str, str]:
    """``{contact_id: "eligible" | reason}`` for one chunk, each recipient with its own legal
    character (the refill facts, remuneration) — exactly what planning decides
    (``planning.eligibility``: one set-based check per distinct effective purpose)."""
    from carepost.campaigns import planning

    return planning.eligibility(session, row.org_id, row, contact_ids, at)[0]


def legal_basis(row: Campaign) -> list[dict]:
    """What the campaign's purpose and facts require, for each kind of recipient it may have."""
    kinds = [("every recipient", None)]
    if row.refill_drug:
        kinds = [("prescription current (lapsed 90 days or less)", 0),
                 ("prescription lapsed more than 90 days ago, or none", purposes.CURRENT_PRESCRIPTION_LAPSE_DAYS + 1)]
    out = []
    for label, days in kinds:
        req = purposes.requirements(row.purpose, remuneration=_remuneration(row), prescription_lapsed_days=days)
        out.append({"recipients": label, "effective_purpose": req.effective_purpose,
                    "authorization_required": req.authorization_required, "rules": list(req.rules)})
    return out


# --------------------------------------------------------------------------- the report

def compliance_report(session: Session, principal, row: Campaign, *, sample_contact_id: str | None = None,
                      context: dict | None = None) -> dict:
    """The pre-launch compliance report (issue 14 item 3). Nothing is written but audit events."""
    from carepost.audit.service import record
    from carepost.campaigns import planning
    from carepost.campaigns.service import _segment_actor
    from carepost.content.service import (
        get_version_by_id,
        render_for_contacts,
        version_helpers,
    )
    from carepost.delivery.service import delivery_settings
    from carepost.segments.service import present_count

    org_id = row.org_id
    actor = _segment_actor(principal)
    compiled = compile_audience(session, org_id, row, actor)  # refuses a sensitive audience without rights
    audience_rows = planning.Audience(session, org_id, row)
    reasons: Counter = Counter()
    refill: Counter = Counter()
    audience = 0
    first_eligible = None
    in_audience = False
    cursor = None
    while True:
        ids = audience_rows.chunk(session, cursor, CHUNK)
        if not ids:
            break
        cursor = ids[-1]
        audience += len(ids)
        if sample_contact_id and sample_contact_id in ids:
            in_audience = True
        left_out = audience_rows.excluded(session, ids)
        reasons[planning.EXCLUSION_SEGMENT] += len(left_out)
        ids = [cid for cid in ids if cid not in left_out]
        if not ids:
            continue
        answer, purpose_of = planning.eligibility(session, org_id, row, ids)
        if row.refill_drug:
            for cid in ids:
                refill["current" if purpose_of[cid] == row.purpose else "lapsed"] += 1
        for cid in ids:
            reasons[answer[cid]] += 1
            if first_eligible is None and answer[cid] == "eligible":
                first_eligible = cid
    if not reasons[planning.EXCLUSION_SEGMENT]:
        del reasons[planning.EXCLUSION_SEGMENT]
    eligible = reasons.pop("eligible", 0)

    def shown(n: int):
        return present_count(n, actor)

    version = get_version_by_id(session, org_id, row.template_version_id)
    used = version_helpers(version)
    security = row.security or delivery_settings(session, org_id)["security_mode"]
    out = {
        "campaign_id": row.id, "status": row.status, "purpose": row.purpose, "approval_required": row.approval_required,
        "audience": shown(audience), "eligible": shown(eligible),
        "excluded": {reason: shown(n) for reason, n in sorted(reasons.items())},
        "excluded_total": shown(sum(reasons.values())),
        "exact": actor.unmasked,
        "sensitive_segment": bool(compiled.sensitive), "sensitive_categories": list(compiled.sensitive_categories),
        "phi_categories": sorted({h["category"] for h in used}), "helpers": used,
        "template_id": version.template_id, "template_version": version.version,
        "contains_phi": bool(version.contains_phi),
        "security": security, "remuneration": row.remuneration, "refill_drug": row.refill_drug,
        "legal_basis": legal_basis(row),
    }
    if row.refill_drug:
        out["refill"] = {k: shown(refill.get(k, 0)) for k in ("current", "lapsed")}  # of those not left out
    record(session, org_id=org_id, actor_type=principal.kind, actor_id=principal.actor_id,
           on_behalf_of=principal.on_behalf_of, action="campaign.report", target_type="campaign", target_id=row.id,
           details={"audience": audience, "sensitive_categories": list(compiled.sensitive_categories)},
           **(context or {}))

    # The sample render: one contact of the audience (the one asked for, or the first eligible).
    if sample_contact_id and not in_audience:
        raise ValidationFailed("That contact is not in the campaign's audience.", field="sample_contact_id")
    contact_id = sample_contact_id or first_eligible
    unmasked = principal.can(Permission.PHI_READ_UNMASKED)
    if contact_id is None:
        out["sample"] = None
    elif not unmasked and not principal.can(Permission.PHI_READ_MASKED):
        out["sample"] = {"omitted": "a sample render reads a patient's data: it needs phi:read_masked"}
    else:
        rendered = render_for_contacts(session, org_id, version, [contact_id], masked=not unmasked).get(contact_id)
        out["sample"] = {"contact_id": contact_id, **rendered.as_dict()} if rendered else None
        record(session, org_id=org_id, actor_type=principal.kind, actor_id=principal.actor_id,
               on_behalf_of=principal.on_behalf_of, action="campaign.sample_render", target_type="contact",
               target_id=contact_id, details={"campaign_id": row.id, "masked": not unmasked,
                                              "helpers": [h["name"] for h in used]}, **(context or {}))
    return out
