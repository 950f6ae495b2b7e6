"""Issue 9 item 10: MTA-STS policies persist in the database with their max_age and stay in
force when a refresh fails (RFC 8461 5.1); ``testing`` mode is reported in the evidence.

Real HTTPS policy server, real DNS server and real SMTP servers (tests/fixtures/delivery.py);
the store is the real ``mta_sts_policies`` table on SQLCipher and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import select

from carepost.core import clock
from carepost.delivery import dns as cpdns
from carepost.delivery import tlsprobe
from carepost.delivery.mime import compose
from carepost.delivery.models import StoredMtaStsPolicy
from carepost.delivery.smtp import DeliveryClient, Envelope

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.valid.test\nmax_age: 86400\n"


def run(coro):
    return asyncio.run(coro)


def publish(env, domain: str, policy: str, *, ident: str = "2026a", status: int = 200):
    env.dns.records.pop((f"_mta-sts.{domain}.", "TXT"), None)
    env.dns.add(f"_mta-sts.{domain}", "TXT", f'"v=STSv1; id={ident};"')
    env.mta_sts.policies[f"mta-sts.{domain}"] = (status, "text/plain", policy)
    cpdns.reset()  # forget cached DNS answers


def envelope(domain: str, *, require: bool = False) -> Envelope:
    composed = compose(sender="Bar Clinic <news@bar.example>", to=[f"pat@{domain}"], subject="Message",
                       text="Your appointment is confirmed.")
    return Envelope(sender="b+0123@bounces.bar.example", recipients=composed.recipients, message=composed.as_bytes(),
                    require_verified_tls=require)


def deliver(env: Envelope, store: tlsprobe.PolicyStore | None = None):
    async def go():
        async with DeliveryClient(policy_store=store) as client:
            return await client.deliver(env)

    return run(go())[0]


def test_policy_is_stored_with_max_age_and_used_when_the_refresh_fails(db, session, delivery_env):
    publish(delivery_env, "valid.test", ENFORCE)
    first = run(tlsprobe.resolve_mta_sts("valid.test", store=tlsprobe.DatabasePolicyStore()))
    assert first.source == "fetched" and first.policy.mode == "enforce"
    session.rollback()
    [row] = session.scalars(select(StoredMtaStsPolicy)).all()
    assert row.mode == "enforce" and row.policy_id == "2026a"
    assert clock.aware(row.expires_at) - clock.aware(row.fetched_at) == timedelta(seconds=86400)
    # The recipient's domain and MX names are not stored readable.
    assert "valid.test" not in row.domain_index and b"mx.valid.test" not in row.policy_enc

    # An unchanged id is not fetched again (a new process: a new store object, same table).
    delivery_env.mta_sts.requests.clear()
    again = run(tlsprobe.resolve_mta_sts("valid.test", store=tlsprobe.DatabasePolicyStore()))
    assert again.source == "stored" and delivery_env.mta_sts.requests == []

    # The id changes but the policy host fails (blocked, down): the stored enforce policy stays.
    publish(delivery_env, "valid.test", "not found", ident="2026b", status=404)
    failed = run(tlsprobe.resolve_mta_sts("valid.test", store=tlsprobe.DatabasePolicyStore()))
    assert failed.source == "stored_after_failure" and failed.policy.mode == "enforce" and "404" in failed.error
    # Without a store (the old behaviour) the failure meant "no policy": a downgrade.
    assert run(tlsprobe.resolve_mta_sts("valid.test")).policy is None

    # The TXT record stripped entirely: still the stored policy (RFC 8461 5.1).
    delivery_env.dns.records.pop(("_mta-sts.valid.test.", "TXT"))
    cpdns.reset()
    stripped = run(tlsprobe.resolve_mta_sts("valid.test", store=tlsprobe.DatabasePolicyStore()))
    assert stripped.source == "stored" and stripped.policy.mode == "enforce"

    # Delivery uses it and says so in the evidence.
    result = deliver(envelope("valid.test"), tlsprobe.DatabasePolicyStore())
    assert result.status == "delivered"
    assert (result.evidence.mta_sts, result.evidence.mta_sts_id, result.evidence.mta_sts_source) == (
        "enforce", "2026a", "stored")

    # Past max_age the stored policy is no longer in force.
    clock.advance(timedelta(seconds=86401))
    assert run(tlsprobe.resolve_mta_sts("valid.test", store=tlsprobe.DatabasePolicyStore())).policy is None


def test_stored_enforce_policy_still_refuses_an_unlisted_mx_after_a_failed_refresh(db, delivery_env):
    publish(delivery_env, "selfsigned.test", "version: STSv1\nmode: enforce\nmx: mx.other.test\nmax_age: 86400\n")
    assert run(tlsprobe.resolve_mta_sts("selfsigned.test", store=tlsprobe.DatabasePolicyStore())).source == "fetched"
    publish(delivery_env, "selfsigned.test", "gone", ident="2026c", status=500)
    result = deliver(envelope("selfsigned.test"), tlsprobe.DatabasePolicyStore())
    assert result.status == "deferred" and "MTA-STS" in result.reason
    assert delivery_env.mx["selfsigned"].recorder.messages == []


def test_testing_mode_is_reported_in_the_evidence(db, delivery_env):
    publish(delivery_env, "selfsigned.test",
            "version: STSv1\nmode: testing\nmx: *.elsewhere.test\nmax_age: 86400\n")
    result = deliver(envelope("selfsigned.test"), tlsprobe.DatabasePolicyStore())
    # Testing mode: delivered as without a policy (opportunistic), and what enforce would have refused is reported.
    assert result.status == "delivered"
    evidence = result.evidence.to_dict()
    assert evidence["mta_sts"] == "testing" and evidence["mta_sts_source"] == "fetched"
    assert "mx.selfsigned.test is not listed in the policy" in evidence["mta_sts_report"]
    assert "TLS not verified" in evidence["mta_sts_report"]
    # A compliant host under testing mode reports nothing.
    publish(delivery_env, "valid.test", ENFORCE.replace("enforce", "testing"))
    ok = deliver(envelope("valid.test"), tlsprobe.DatabasePolicyStore())
    assert ok.status == "delivered" and ok.evidence.mta_sts == "testing" and ok.evidence.mta_sts_report is None


def test_security_preview_uses_the_stored_policy_when_the_refresh_fails(db, delivery_env):
    from carepost.delivery.preview import security_preview

    publish(delivery_env, "valid.test", ENFORCE)
    run(tlsprobe.resolve_mta_sts("valid.test", store=tlsprobe.DatabasePolicyStore()))
    publish(delivery_env, "valid.test", "gone", ident="2026z", status=503)
    tlsprobe.cache.clear()
    [row] = run(security_preview({"pat@valid.test": {"pgp": False, "smime": False}}, org_mode="tls_required"))
    assert row.method == "tls" and "MTA-STS enforce" in row.reason
