"""One recipient's copy protected: PGP/MIME or S/MIME encryption of the composed message.

(Split out of ``delivery.service``, which still exports every public name.)
"""

from __future__ import annotations

from dataclasses import dataclass


from carepost.delivery import dkim, pgp, policy, smime
from carepost.delivery.smtp import RecipientResult

# --- one recipient through the pipeline --------------------------------------------------------
# The named steps, top to bottom: decide -> protect (PGP / S/MIME) -> sign (DKIM) -> send ->
# fall back when verified TLS turned out to be unavailable. Composition happens before (one
# composed message serves every recipient that gets the same content).


@dataclass
class Delivered:
    decision: policy.Decision
    results: list[RecipientResult]
    key_fingerprint: str | None = None

    @property
    def needs_portal(self) -> bool:
        """The recipient gets the secure portal instead (a notification without PHI)."""
        return self.decision.method == "portal"


def protect(raw: bytes, method: str, key_material: str | None, *, smime_signing_key=None,
            smime_capabilities: str | None = None) -> bytes:
    """The message as it must travel for ``method``: encrypted for PGP and S/MIME (S/MIME signed
    first with the sending domain's key), as is for TLS (and for opportunistic clear text). The
    portal never sends the message itself."""
    if method == "pgp":
        return pgp.encrypt_message(raw, key_material)
    if method == "smime":
        return smime.encrypt_message(raw, key_material, signing_key=smime_signing_key, capability=smime_capabilities)
    if method in ("tls", "none"):
        return raw
    raise ValueError(f"method {method!r} does not send the message by email")


async def deliver_one(client, decision: policy.Decision, *, raw: bytes, sender: str, recipient: str,
                      dkim_keys: list[dkim.DkimKey], smtputf8: bool = False,
                      key_material: str | None = None, key_fingerprint: str | None = None) -> Delivered:
    """Send one recipient's copy as the decision says; never in clear when protection is
    required. Returns the final decision (after any fallback) and the SMTP results."""
    from carepost.delivery.smtp import Envelope

    if decision.method == "portal" or not decision.sends:
        return Delivered(decision, [])
    wire = dkim.sign(protect(raw, decision.method, key_material), dkim_keys)
    envelope = Envelope(sender=sender, recipients=[recipient], message=wire, smtputf8=smtputf8,
                        require_verified_tls=decision.require_verified_tls)
    results = await client.deliver(envelope)
    if results and results[0].status == "tls_unavailable":
        fallback = policy.after_tls_failure(decision, results[0].reason)
        if fallback.method in ("pgp", "smime") and fallback.method == decision.method:
            # A keyed message: the same encrypted copy, over TLS when offered (policy.after_tls_failure).
            envelope = Envelope(sender=sender, recipients=[recipient], message=wire, smtputf8=smtputf8)
            return Delivered(fallback, await client.deliver(envelope), key_fingerprint)
        return Delivered(fallback, results)
    return Delivered(decision, results, key_fingerprint if decision.method in ("pgp", "smime") else None)


# =============================================================================================
# Added with the delivery API and pipeline (issue 4, items 3, 5, 7 and 8).
# =============================================================================================
