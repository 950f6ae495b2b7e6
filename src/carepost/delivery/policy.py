"""The security policy: which secure method each recipient gets, and why.

A pure function of the facts, so the pre-send preview and the delivery pipeline can never
disagree. Modes (see "Secure delivery as the market does it" in REFERENCE.md):

``opportunistic``
    TLS when the recipient's server offers it, else clear text. Only for messages marked as
    carrying no PHI: with PHI it is refused (422).
``tls_required``
    Verified TLS 1.2+; where the recipient's domain cannot receive that, escalate to PGP,
    S/MIME or the secure portal — never clear text.
``tls_exclusive``
    Verified TLS 1.2+ or the message is not sent to that recipient.
``secure``
    Never TLS alone: PGP or S/MIME when the recipient has a key on file, else the portal.

Rules that hold in every mode:

* The organization's mode is the floor. An override (template, campaign, API message) may only
  raise it, in the order above; a lower override is refused, naming the ``security`` field.
* A key on file wins wherever encryption is allowed (``opportunistic``, ``tls_required``,
  ``secure``): end-to-end encryption protects more than transport encryption. PGP before S/MIME.
  ``tls_exclusive`` is TLS-or-nothing by definition and ignores keys.
* A keyed decision asks for TLS too (issue 9 item 9): in ``tls_required`` and ``secure`` the
  encrypted message requires verified TLS (the envelope and the neutral outer headers travel
  outside the encryption); where verified TLS turns out to be unavailable, the fallback is the same
  encrypted message over TLS when offered — it exposes no more than a portal notification would,
  and the content stays end-to-end encrypted — recorded as a fallback with the reason. Where
  verified TLS is already known to be unavailable, the keyed decision says so and does not ask.
  In ``opportunistic`` TLS is used when offered.
* In relay mode the relay's TLS says nothing about the hop to the recipient, so TLS counts as
  verified only when the relay is declared to enforce verified TLS onward.
* When the TLS facts are unknown (not probed yet), the decision is ``tls`` with
  ``require_verified_tls`` and a ``fallback``: the SMTP client refuses anything less than
  verified TLS, and the pipeline then takes the fallback (``portal`` or ``none``).
"""

from __future__ import annotations

from dataclasses import dataclass

from carepost.core.errors import ValidationFailed

MODES = ("opportunistic", "tls_required", "tls_exclusive", "secure")
MODE_RANK = {mode: rank for rank, mode in enumerate(MODES)}
METHODS = ("tls", "pgp", "smime", "portal", "none")
RELAY_MODES = (None, "enforcing", "plain")


@dataclass(frozen=True)
class Decision:
    method: str  # tls | pgp | smime | portal | none ("none": not sent, or clear text when opportunistic)
    mode: str  # the effective mode
    reason: str
    require_verified_tls: bool = False
    fallback: str | None = None  # when verified TLS turns out to be unavailable at send time

    @property
    def sends(self) -> bool:
        """False when the recipient gets nothing (tls_exclusive without verified TLS)."""
        return not (self.method == "none" and self.mode != "opportunistic")


def effective_mode(org_mode: str, override: str | None = None) -> str:
    """The organization's mode raised by an override; a lower or unknown override is refused."""
    if org_mode not in MODE_RANK:
        raise ValidationFailed(f"Unknown security mode; use one of {', '.join(MODES)}.", field="security")
    if override is None or override == "":
        return org_mode
    if override not in MODE_RANK:
        raise ValidationFailed(f"Unknown security mode; use one of {', '.join(MODES)}.", field="security")
    if MODE_RANK[override] < MODE_RANK[org_mode]:
        raise ValidationFailed(
            f"The security mode may only be raised above the organization's {org_mode}, never lowered.",
            field="security",
        )
    return override


def decide(
    *,
    org_mode: str,
    override: str | None = None,
    contains_phi: bool = True,
    pgp_key: bool = False,
    smime_key: bool = False,
    verified_tls: bool | None = None,
    tls_offered: bool | None = None,
    tls_reason: str | None = None,
    relay: str | None = None,
) -> Decision:
    """The secure method for one recipient.

    ``verified_tls`` / ``tls_offered``: what the TLS probe found for the recipient's domain
    (None: not known yet). ``tls_reason``: the probe's one-line explanation. ``relay``: None for
    direct-to-MX delivery, "enforcing" for a smarthost declared to enforce verified TLS onward,
    "plain" for one that does not."""
    mode = effective_mode(org_mode, override)
    if contains_phi is not False and mode == "opportunistic":
        raise ValidationFailed(
            "Opportunistic TLS is only for messages marked as carrying no PHI; "
            "set contains_phi to false or choose a stronger security mode.",
            field="security",
        )
    if relay not in RELAY_MODES:
        raise ValueError(f"relay must be one of {RELAY_MODES}")
    if relay == "enforcing":
        verified_tls, tls_offered, tls_reason = True, True, "the relay enforces verified TLS to the recipient"
    elif relay == "plain" and mode != "opportunistic":
        verified_tls, tls_reason = False, "the relay does not guarantee verified TLS to the recipient"

    why = f" ({tls_reason})" if tls_reason else ""

    def keyed() -> Decision | None:
        if pgp_key:
            method, reason = "pgp", "the recipient's OpenPGP certificate is on file"
        elif smime_key:
            method, reason = "smime", "the recipient's S/MIME certificate is on file"
        else:
            return None
        if mode == "opportunistic":
            return Decision(method, mode, reason + "; TLS when offered")
        if verified_tls is False:
            return Decision(method, mode, f"{reason}; verified TLS unavailable{why}: the encryption protects the content")
        return Decision(method, mode, f"{reason}; verified TLS required as well, else the same encrypted message over "
                        "TLS when offered", require_verified_tls=True, fallback=method)

    if mode == "secure":
        return keyed() or Decision("portal", mode, "secure mode and no key on file for the recipient: secure portal")

    if mode == "tls_exclusive":
        if verified_tls is True:
            return Decision("tls", mode, f"verified TLS available{why}", require_verified_tls=True, fallback="none")
        if verified_tls is False:
            return Decision("none", mode, f"not sent: verified TLS unavailable{why} and the mode allows nothing else")
        return Decision("tls", mode, "verified TLS will be required at send time; not sent without it",
                        require_verified_tls=True, fallback="none")

    if mode == "tls_required":
        if (d := keyed()) is not None:
            return d
        if verified_tls is True:
            return Decision("tls", mode, f"verified TLS available{why}", require_verified_tls=True, fallback="portal")
        if verified_tls is False:
            return Decision("portal", mode, f"verified TLS unavailable{why}: secure portal")
        return Decision("tls", mode, "verified TLS will be required at send time; else the secure portal",
                        require_verified_tls=True, fallback="portal")

    # opportunistic, no PHI
    if (d := keyed()) is not None:
        return d
    if tls_offered is False:
        return Decision("none", mode, f"the recipient's server offers no TLS{why}; the message carries no PHI")
    return Decision("tls", mode, "TLS when offered; the message carries no PHI")


def after_tls_failure(decision: Decision, reason: str) -> Decision:
    """The decision once the SMTP client found no verified TLS at send time (downgrade,
    STARTTLS missing or failing, certificate invalid): the fallback, never clear text."""
    if not decision.require_verified_tls:
        return decision
    if decision.fallback in ("pgp", "smime") and decision.fallback == decision.method:
        name = "OpenPGP" if decision.method == "pgp" else "S/MIME"
        return Decision(decision.method, decision.mode,
                        f"verified TLS unavailable at send time ({reason}): the {name}-encrypted message over TLS when "
                        "offered; the encryption protects the content")
    if decision.fallback == "portal":
        return Decision("portal", decision.mode, f"verified TLS unavailable at send time ({reason}): secure portal")
    return Decision("none", decision.mode, f"not sent: verified TLS unavailable at send time ({reason})")
