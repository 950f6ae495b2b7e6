"""Issue 9 item 9, the rest of it: a keyed decision (PGP or S/MIME) asks for TLS too.

Where the organization's mode requires TLS (``tls_required``, ``secure``) the encrypted message
requires verified TLS; where verified TLS turns out to be unavailable, the same encrypted copy goes
over TLS when offered, recorded as a fallback with the reason. Against the real test MX peers:
``valid`` (verified TLS), ``selfsigned`` (TLS that does not verify) and ``plain`` (no TLS)."""

from __future__ import annotations

import asyncio

import pytest

from carepost.delivery import dkim, pgp, policy, service
from carepost.delivery.mime import compose
from carepost.delivery.smtp import DeliveryClient
from tests.test_delivery_worker import env  # noqa: F401 - the pipeline fixture (peers, sender, app)

PHI = "HbA1c 7.9 % - please call about your insulin dose"


@pytest.mark.parametrize("mode", ["tls_required", "secure"])
@pytest.mark.parametrize("keys", [{"pgp_key": True}, {"smime_key": True}, {"pgp_key": True, "smime_key": True}])
def test_a_keyed_decision_requires_verified_tls_where_the_mode_requires_tls(mode, keys):
    d = policy.decide(org_mode=mode, **keys)
    method = "pgp" if keys.get("pgp_key") else "smime"
    assert d.method == method and d.require_verified_tls and d.fallback == method
    after = policy.after_tls_failure(d, "certificate verify failed")
    assert after.method == method and not after.require_verified_tls
    assert "verified TLS unavailable at send time (certificate verify failed)" in after.reason
    # Known unavailable (a probe, or a relay that does not enforce TLS onward): not asked, said.
    known = policy.decide(org_mode=mode, verified_tls=False, tls_reason="no STARTTLS", **keys)
    assert known.method == method and not known.require_verified_tls and "verified TLS unavailable (no STARTTLS)" in known.reason
    assert policy.decide(org_mode=mode, relay="enforcing", **keys).require_verified_tls


def test_opportunistic_and_tls_exclusive_keep_their_rules():
    d = policy.decide(org_mode="opportunistic", contains_phi=False, pgp_key=True)
    assert d.method == "pgp" and not d.require_verified_tls and "TLS when offered" in d.reason
    d = policy.decide(org_mode="tls_exclusive", pgp_key=True)
    assert d.method == "tls" and d.require_verified_tls and d.fallback == "none"


@pytest.fixture(scope="module")
def dkim_keys():
    return [dkim.DkimKey("bar.example", "cp1", dkim.generate_rsa_key())]


def _send(decision, address, dkim_keys, cert, fingerprint):
    composed = compose(sender="Bar Clinic <care@bar.example>", to=[address], subject="A message from your care team",
                       text=PHI)

    async def go():
        async with DeliveryClient() as client:
            return await service.deliver_one(client, decision, raw=composed.as_bytes(), sender="b+1@bounces.bar.example",
                                             recipient=composed.recipients[0], dkim_keys=dkim_keys,
                                             smtputf8=composed.smtputf8, key_material=cert, key_fingerprint=fingerprint)

    return asyncio.run(go())


def test_pgp_goes_over_verified_tls_where_the_server_offers_it(delivery_env, dkim_keys, gpg):
    cert = gpg.gen_key("Pat <pat@valid.test>")
    fp = pgp.load_certificate(cert, "pat@valid.test").fingerprint
    out = _send(policy.decide(org_mode="tls_required", pgp_key=True), "pat@valid.test", dkim_keys, cert, fp)
    assert out.decision.method == "pgp" and out.decision.require_verified_tls and out.key_fingerprint == fp
    [result] = out.results
    assert result.status == "delivered" and result.evidence.cert_verified and result.evidence.tls_version
    [received] = delivery_env.mx["valid"].recorder.messages
    assert received.tls and PHI.encode() not in received.data


@pytest.mark.parametrize("name, tls", [("selfsigned", True), ("plain", False)])
def test_pgp_without_verified_tls_falls_back_to_the_same_encrypted_message_and_says_so(delivery_env, dkim_keys, gpg,
                                                                                         name, tls):
    cert = gpg.gen_key(f"Pat <pat@{name}.test>")
    fp = pgp.load_certificate(cert, f"pat@{name}.test").fingerprint
    out = _send(policy.decide(org_mode="secure", pgp_key=True), f"pat@{name}.test", dkim_keys, cert, fp)
    assert out.decision.method == "pgp" and not out.decision.require_verified_tls
    assert "verified TLS unavailable at send time" in out.decision.reason
    [result] = out.results
    assert result.status == "delivered" and not result.evidence.cert_verified
    [received] = delivery_env.mx[name].recorder.messages  # once: the verified attempt sent nothing
    assert received.tls is tls and PHI.encode() not in received.data and b"insulin" not in received.data


def test_pipeline_records_the_keyed_fallback(env, gpg):  # noqa: F811 - the fixture imported above
    from carepost.delivery import pipeline

    cert = gpg.gen_key("Pat Doe <pat@selfsigned.test>")
    r = env.client.post("/api/v1/recipient-keys", json={"address": "pat@selfsigned.test", "kind": "pgp", "key": cert},
                        headers=env.key)
    assert r.status_code == 201, r.text
    message_id = env.send(to=["pat@selfsigned.test"])
    pipeline.deliver([message_id])
    pat = env.one(message_id)
    assert pat["method"] == "pgp" and pat["status"] == "delivered", pat
    assert pat["evidence"]["key_fingerprint"] == r.json()["fingerprint"]
    assert pat["evidence"].get("cert_verified") is False
    fallbacks = [e for e in pat["events"] if e["type"] == "fallback"]
    assert len(fallbacks) == 1, pat["events"]
    [received] = env.received("selfsigned")
    assert b"HbA1c" not in received.data

    cert = gpg.gen_key("Lee <lee@valid.test>")
    env.client.post("/api/v1/recipient-keys", json={"address": "lee@valid.test", "kind": "pgp", "key": cert}, headers=env.key)
    message_id = env.send(to=["lee@valid.test"])
    pipeline.deliver([message_id])
    lee = env.one(message_id)
    assert lee["method"] == "pgp" and lee["status"] == "delivered" and lee["evidence"]["cert_verified"] is True
    assert not [e for e in lee["events"] if e["type"] == "fallback"]
