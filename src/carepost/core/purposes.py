"""Communication purposes, and the one function that decides what each requires.

Every message declares a purpose. :func:`requirements` turns the purpose (plus the facts that
change its legal character: third-party remuneration, how long ago a prescription lapsed) into
what CarePost must enforce: a HIPAA authorization, a remuneration statement in it, and an opt-out
link with RFC 8058 headers.

The rules follow 45 CFR 164.501 (definition of *marketing*) and 164.508(a)(3):

* Marketing is a communication about a product or service that encourages the recipient to buy
  or use it (164.501, "marketing" (1)); it needs the individual's authorization
  (164.508(a)(3)(i)). The two exceptions — face-to-face communication and promotional gifts of
  nominal value (164.508(a)(3)(i)(A)-(B)) — cannot happen by email.
* Not marketing (164.501, "marketing" (2)(i)): refill reminders and communications about a drug
  or biologic currently prescribed, *only if* any financial remuneration received is reasonably
  related to the cost of making the communication. HHS reads "currently prescribed" to include a
  prescription that lapsed within the last 90 days (78 FR 5566, 5596 (Jan. 25, 2013)).
* Not marketing (164.501, "marketing" (2)(ii)), *except* where the covered entity receives
  financial remuneration for the communication: treatment, including case management, care
  coordination and recommending alternative treatments, therapies, providers or settings of care
  ((2)(ii)(A), (C)); describing the entity's own health-related products and services or those
  in its plan of benefits ((2)(ii)(B)).
* Financial remuneration means direct or indirect payment from or on behalf of a third party
  whose product or service is described (164.501, "financial remuneration"). When marketing
  involves it, the authorization must state so (164.508(a)(3)(ii)).
* Treatment, payment and health care operations (164.506) and administrative messages need no
  authorization.

An opt-out (visible unsubscribe link, RFC 8058 one-click headers) is required for every
commercial message (CAN-SPAM, 15 U.S.C. 7704(a)(3)-(5); Gmail/Yahoo bulk sender rules) — that
is, for marketing and for promotion of the entity's own products and services.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from carepost.core.errors import ValidationFailed

PURPOSES: dict[str, str] = {
    "treatment": "Treatment",
    "payment": "Payment",
    "health_care_operations": "Health care operations",
    "refill_reminder": "Refill reminder / currently prescribed drug",
    "care_coordination": "Case management or care coordination",
    "treatment_alternatives": "Treatment alternatives",
    "own_products": "Own health-related products and services",
    "marketing": "Marketing",
    "marketing_remunerated": "Marketing with financial remuneration",
    "transactional": "Administrative / transactional",
}
PURPOSE_DESCRIPTIONS: dict[str, str] = {
    "treatment": "Care of the patient: appointment reminders, results, instructions.",
    "payment": "Billing, coverage and claims.",
    "health_care_operations": "Quality, surveys, service announcements that promote nothing.",
    "refill_reminder": "Refill reminders and messages about a drug currently prescribed (lapsed 90 days or less).",
    "care_coordination": "Case management and care coordination.",
    "treatment_alternatives": "Recommending alternative treatments, therapies, providers or settings of care.",
    "own_products": "The organization's own health-related products and services, or those in its plan of benefits.",
    "marketing": "Encourages buying or using a product or service; needs a signed authorization.",
    "marketing_remunerated": "Marketing paid for by a third party; the authorization must state the remuneration.",
    "transactional": "Administrative messages: account, security, confirmations.",
}

Remuneration = Literal["none", "cost_related", "above_cost"]
REMUNERATION = ("none", "cost_related", "above_cost")

# Purposes whose authorization texts a new organization gets by default.
AUTHORIZATION_PURPOSES = ("marketing", "marketing_remunerated")
# Purposes counted by frequency caps ("across all marketing").
MARKETING_PURPOSES = ("marketing", "marketing_remunerated")
# Purposes that carry an opt-out even when they need no authorization.
COMMERCIAL_PURPOSES = ("own_products", "marketing", "marketing_remunerated")

CURRENT_PRESCRIPTION_LAPSE_DAYS = 90

_TREATMENT_AND_OPERATIONS_EXCEPTIONS = ("treatment", "care_coordination", "treatment_alternatives", "own_products")


@dataclass(frozen=True)
class Requirements:
    """What a message of a purpose needs. ``effective_purpose`` is the purpose the rules make of
    it (a remunerated care-coordination message *is* marketing with remuneration): it names the
    authorization that must be on file."""

    purpose: str
    effective_purpose: str
    is_marketing: bool
    authorization_required: bool
    remuneration_statement_required: bool
    opt_out_required: bool
    rules: tuple[str, ...] = field(default_factory=tuple)

    @property
    def suppression_scope(self) -> str:
        """Which address-level suppressions apply: ``marketing`` ones only to commercial mail."""
        return "marketing" if self.opt_out_required else "all"

    def as_dict(self) -> dict:
        return {
            "purpose": self.purpose,
            "effective_purpose": self.effective_purpose,
            "is_marketing": self.is_marketing,
            "authorization_required": self.authorization_required,
            "remuneration_statement_required": self.remuneration_statement_required,
            "opt_out_required": self.opt_out_required,
            "rules": list(self.rules),
        }


def check_purpose(purpose: str, field_name: str = "purpose") -> str:
    if purpose not in PURPOSES:
        raise ValidationFailed(f"purpose must be one of {', '.join(PURPOSES)}.", field=field_name)
    return purpose


def requirements(
    purpose: str,
    *,
    remuneration: Remuneration = "none",
    prescription_lapsed_days: int | None = None,
) -> Requirements:
    """Decide what a communication of ``purpose`` requires.

    ``remuneration``: financial remuneration from (or on behalf of) a third party whose product
    or service the message describes — ``none``, ``cost_related`` (reasonably related to the cost
    of making the communication) or ``above_cost``. ``prescription_lapsed_days``: for refill
    reminders, how many days ago the prescription lapsed (None or 0: still current).
    """
    check_purpose(purpose)
    if remuneration not in REMUNERATION:
        raise ValidationFailed(f"remuneration must be one of {', '.join(REMUNERATION)}.", field="remuneration")
    if prescription_lapsed_days is not None and prescription_lapsed_days < 0:
        raise ValidationFailed("prescription_lapsed_days cannot be negative.", field="prescription_lapsed_days")

    def marketing(rules: list[str], remunerated: bool) -> Requirements:
        # 164.508(a)(3)(i): authorization required for any use or disclosure of PHI for marketing;
        # 164.508(a)(3)(ii): when it involves financial remuneration, the authorization says so.
        eff = "marketing_remunerated" if remunerated else "marketing"
        rules.append("164.508(a)(3)(i): marketing needs the individual's authorization")
        if remunerated:
            rules.append("164.508(a)(3)(ii): the authorization must state the remuneration")
        return Requirements(purpose, eff, True, True, remunerated, True, tuple(rules))

    def not_marketing(rules: list[str]) -> Requirements:
        return Requirements(purpose, purpose, False, False, False, purpose in COMMERCIAL_PURPOSES, tuple(rules))

    if purpose == "marketing_remunerated":
        return marketing([], True)
    if purpose == "marketing":
        return marketing([], remuneration != "none")

    if purpose == "refill_reminder":
        lapsed = prescription_lapsed_days or 0
        if lapsed > CURRENT_PRESCRIPTION_LAPSE_DAYS:
            # Not "currently prescribed" (HHS, 78 FR 5596: lapsed within 90 days still counts), so the
            # 164.501 marketing (2)(i) exception does not apply: it is marketing.
            return marketing([f"164.501 marketing (2)(i) does not apply: prescription lapsed more than "
                              f"{CURRENT_PRESCRIPTION_LAPSE_DAYS} days ago"], remuneration != "none")
        if remuneration == "above_cost":
            # 164.501 marketing (2)(i): only remuneration reasonably related to the cost keeps it out.
            return marketing(["164.501 marketing (2)(i) does not apply: remuneration exceeds the cost of the communication"],
                             True)
        return not_marketing(["164.501 marketing (2)(i): refill reminder or currently prescribed drug; any "
                              "remuneration is reasonably related to the cost of the communication"])

    if purpose in _TREATMENT_AND_OPERATIONS_EXCEPTIONS:
        if remuneration != "none":
            # 164.501 marketing (2)(ii): the treatment and operations exceptions hold only when no
            # financial remuneration is received — cost-related payment included.
            return marketing([f"164.501 marketing (2)(ii) does not apply: financial remuneration received for a "
                              f"{PURPOSES[purpose].lower()} communication"], True)
        cite = {
            "treatment": "164.501 marketing (2)(ii)(A): treatment of the individual",
            "care_coordination": "164.501 marketing (2)(ii)(A), (C): case management or care coordination",
            "treatment_alternatives": "164.501 marketing (2)(ii)(A), (C): alternative treatments, therapies, providers or settings",
            "own_products": "164.501 marketing (2)(ii)(B): the entity's own health-related products and services",
        }[purpose]
        return not_marketing([cite + ", no financial remuneration"])

    # payment, health care operations, transactional (164.506: no authorization needed). A third
    # party paying for a message that describes its product makes the message marketing.
    if remuneration != "none":
        return marketing(["164.501 financial remuneration from a third party whose product is described: marketing"], True)
    return not_marketing(["164.506: treatment, payment and health care operations need no authorization"
                          if purpose != "transactional" else "administrative message: no authorization, no opt-out"])


def purposes_list() -> list[dict]:
    """Every purpose with what it needs by default (no remuneration), for the API and the UI."""
    out = []
    for key, label in PURPOSES.items():
        req = requirements(key)
        out.append({"key": key, "label": label, "description": PURPOSE_DESCRIPTIONS[key], **req.as_dict()})
    return out
