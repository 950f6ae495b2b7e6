"""The per-recipient security decision: every mode against every combination of facts."""

from __future__ import annotations

import itertools

import pytest

from carepost.core.errors import ValidationFailed
from carepost.delivery.policy import MODES, Decision, after_tls_failure, decide, effective_mode

KEYS = {"none": {}, "pgp": {"pgp_key": True}, "smime": {"smime_key": True}, "both": {"pgp_key": True, "smime_key": True}}
TLS = {"unknown": {}, "verified": {"verified_tls": True, "tls_offered": True},
       "unverified": {"verified_tls": False, "tls_offered": True, "tls_reason": "mx certificate has expired"},
       "absent": {"verified_tls": False, "tls_offered": False, "tls_reason": "mx does not offer STARTTLS"}}

# (mode, keys, tls) -> (method, require_verified_tls, fallback)
EXPECTED = {}
for keys, tls in itertools.product(KEYS, TLS):
    keyed = {"pgp": "pgp", "both": "pgp", "smime": "smime"}.get(keys)
    # A keyed decision asks for verified TLS too where the mode requires TLS, unless it is known
    # to be unavailable; its fallback is the same encrypted message (issue 9 item 9).
    keyed_tls = (keyed, tls in ("verified", "unknown"), keyed if tls in ("verified", "unknown") else None)
    # secure: a key (with verified TLS asked for), else the portal.
    EXPECTED[("secure", keys, tls)] = keyed_tls if keyed else ("portal", False, None)
    # tls_exclusive: TLS or nothing; keys never matter.
    EXPECTED[("tls_exclusive", keys, tls)] = {
        "verified": ("tls", True, "none"), "unknown": ("tls", True, "none"),
        "unverified": ("none", False, None), "absent": ("none", False, None),
    }[tls]
    # tls_required: a key, else verified TLS, else the portal.
    EXPECTED[("tls_required", keys, tls)] = keyed_tls if keyed else {
        "verified": ("tls", True, "portal"), "unknown": ("tls", True, "portal"),
        "unverified": ("portal", False, None), "absent": ("portal", False, None),
    }[tls]
    # opportunistic (no PHI): a key, else TLS when offered, else clear text.
    EXPECTED[("opportunistic", keys, tls)] = (keyed, False, None) if keyed else {
        "verified": ("tls", False, None), "unknown": ("tls", False, None),
        "unverified": ("tls", False, None), "absent": ("none", False, None),
    }[tls]


@pytest.mark.parametrize("mode,keys,tls", sorted(EXPECTED))
def test_every_mode_and_fact_combination(mode, keys, tls):
    decision = decide(org_mode=mode, contains_phi=(mode != "opportunistic"), **KEYS[keys], **TLS[tls])
    assert (decision.method, decision.require_verified_tls, decision.fallback) == EXPECTED[(mode, keys, tls)]
    assert decision.mode == mode and decision.reason
    # Protection is never clear text when the message may carry PHI.
    if mode != "opportunistic":
        assert decision.method != "none" or not decision.sends
        if decision.method == "tls":
            assert decision.require_verified_tls


def test_reasons_explain_the_choice():
    assert "OpenPGP certificate is on file" in decide(org_mode="secure", pgp_key=True).reason
    assert "S/MIME certificate is on file" in decide(org_mode="secure", smime_key=True).reason
    assert "secure portal" in decide(org_mode="secure").reason
    d = decide(org_mode="tls_required", **TLS["unverified"])
    assert d.method == "portal" and "mx certificate has expired" in d.reason
    d = decide(org_mode="tls_exclusive", **TLS["absent"])
    assert d.method == "none" and not d.sends and "does not offer STARTTLS" in d.reason
    d = decide(org_mode="opportunistic", contains_phi=False, **TLS["absent"])
    assert d.method == "none" and d.sends and "carries no PHI" in d.reason


def test_contains_phi_defaults_to_true_and_refuses_opportunistic():
    with pytest.raises(ValidationFailed) as err:
        decide(org_mode="opportunistic")
    assert err.value.field == "security" and err.value.status_code == 422
    with pytest.raises(ValidationFailed):
        decide(org_mode="opportunistic", contains_phi=True, pgp_key=True)
    with pytest.raises(ValidationFailed):
        decide(org_mode="opportunistic", contains_phi=None)  # unknown counts as PHI
    # Raising the mode makes the PHI message acceptable.
    assert decide(org_mode="opportunistic", override="tls_required", **TLS["verified"]).method == "tls"


@pytest.mark.parametrize("org,override", list(itertools.product(MODES, MODES)))
def test_override_may_only_raise(org, override):
    if MODES.index(override) >= MODES.index(org):
        assert effective_mode(org, override) == override
    else:
        with pytest.raises(ValidationFailed) as err:
            effective_mode(org, override)
        assert err.value.field == "security" and "never lowered" in err.value.message


def test_unknown_modes_refused():
    for org, override in [("paranoid", None), ("secure", "paranoid")]:
        with pytest.raises(ValidationFailed) as err:
            effective_mode(org, override)
        assert err.value.field == "security"
    assert effective_mode("tls_required", None) == effective_mode("tls_required", "") == "tls_required"


def test_relay_mode():
    # A relay that does not enforce TLS onward: TLS to the relay proves nothing about the recipient.
    assert decide(org_mode="tls_required", relay="plain", **TLS["verified"]).method == "portal"
    assert decide(org_mode="tls_required", relay="plain", pgp_key=True).method == "pgp"
    assert decide(org_mode="tls_exclusive", relay="plain").method == "none"
    # A relay declared to enforce verified TLS counts as verified TLS.
    d = decide(org_mode="tls_required", relay="enforcing", **TLS["unverified"])
    assert (d.method, d.require_verified_tls) == ("tls", True) and "relay enforces" in d.reason
    assert decide(org_mode="secure", relay="enforcing").method == "portal"
    # Opportunistic mail may go through any relay.
    assert decide(org_mode="opportunistic", contains_phi=False, relay="plain").method == "tls"
    with pytest.raises(ValueError):
        decide(org_mode="secure", relay="sometimes")


def test_after_tls_failure_takes_the_fallback_never_clear_text():
    required = decide(org_mode="tls_required")
    d = after_tls_failure(required, "STARTTLS not offered")
    assert d.method == "portal" and "STARTTLS not offered" in d.reason
    exclusive = decide(org_mode="tls_exclusive")
    d = after_tls_failure(exclusive, "certificate has expired")
    assert d.method == "none" and not d.sends
    keyed = decide(org_mode="secure", pgp_key=True)
    d = after_tls_failure(keyed, "whatever")
    assert d.method == "pgp" and not d.require_verified_tls and "whatever" in d.reason
    known = decide(org_mode="secure", pgp_key=True, verified_tls=False)
    assert after_tls_failure(known, "whatever") is known
    assert isinstance(d, Decision)
