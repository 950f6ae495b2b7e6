"""Compliance reports (issue 16 item 6): PHI access by user and by patient from the audit trail,
the unusual-volume rule (a key reading far more patients than its baseline is flagged, one within
it is not), PHI messages by secure method and those without verified protection, consent
coverage and exclusions, MFA enrollment, dormant accounts and keys, keys near expiry, the audit
chain verified; JSON, CSV (formula-safe) and a real PDF; bad periods 422 naming the field."""

from __future__ import annotations

from datetime import date, timedelta

from sqlalchemy import select

from carepost.accounts.credentials import create_credential
from tests.test_bounces import make_sent


def _headers(session, org_id, scopes, name, **kw):
    cred, secret = create_credential(session, org_id, name=name, scopes=scopes, **kw)
    session.commit()
    return cred, {"Authorization": f"Bearer {cred.key_id}.{secret}"}


def test_reports(client, session, org, make_user):
    from carepost.audit.models import AuditEvent
    from carepost.core.database import org_session
    from carepost.delivery.models import MessageRecipient
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    _officer_cred, officer = _headers(session, org.id, ["compliance:manage"], "officer")
    _reader_cred, reader = _headers(session, org.id, ["phi:read_masked", "phi:read_unmasked"], "bulk reader")
    _quiet_cred, quiet = _headers(session, org.id, ["phi:read_masked"], "=HYPERLINK(evil)",
                                  expires_in_days=10)
    make_user(org, role="analyst", mfa=False)
    with org_session(org.id) as s:
        ids = [save_contact(s, org.id, ContactIn(given_name=f"P{i}", family_name="Test",
                                                 email=f"p{i}@example.org")).contact.id for i in range(55)]
        s.commit()
    for cid in ids:  # 55 distinct patients in one day: over the floor of 50 with no baseline
        assert client.get(f"/api/v1/contacts/{cid}", headers=reader).status_code == 200
    for cid in ids[:3]:
        assert client.get(f"/api/v1/contacts/{cid}", headers=quiet).status_code == 200
    session.rollback()
    reader_actor = session.scalars(select(AuditEvent.actor_id).where(AuditEvent.action == "contact.read")
                                   .group_by(AuditEvent.actor_id).order_by(AuditEvent.actor_id)).all()
    assert len(reader_actor) == 2

    # One PHI message handed on in clear (method none) and one over verified TLS.
    bad = make_sent(session, org.id, "clear@example.net")
    good = make_sent(session, org.id, "tls@example.net")
    with org_session(org.id) as s:
        s.get(MessageRecipient, bad.recipient_id).method = "none"
        s.get(MessageRecipient, good.recipient_id).evidence = {"cert_verified": True}
        s.commit()

    r = client.get("/api/v1/compliance/reports", headers=officer)
    assert r.status_code == 200, r.text
    rep = r.json()
    by_actor = {a["actor_id"]: a for a in rep["phi_access"]["by_actor"]}
    counts = sorted((a["accesses"], a["patients"]) for a in by_actor.values())
    assert (55, 55) in counts and (3, 3) in counts
    assert rep["phi_access"]["by_patient"][0]["accesses"] == 2 and rep["phi_access"]["by_patient"][0]["actors"] == 2
    [flag] = rep["unusual_volume"]["flagged"]
    assert flag["patients"] == 55 and flag["threshold"] == 50 and "median" in rep["unusual_volume"]["rule"]
    assert rep["protection"]["without_verified_protection"] == 1
    assert rep["protection"]["phi_by_method"] == {"none": 1, "tls": 1}
    assert rep["consent"]["contacts"] == 55 and rep["consent"]["with_active_authorization"] == 0
    assert rep["accounts"]["people"] == 1 and rep["accounts"]["mfa_enrolled"] == 0
    assert [e["kind"] for e in rep["accounts"]["near_expiry"]] == ["api_key"]
    assert rep["audit_chain"]["ok"] is True and rep["audit_chain"]["events_checked"] > 55

    csv_r = client.get("/api/v1/compliance/reports", params={"format": "csv"}, headers=officer)
    assert csv_r.status_code == 200 and csv_r.headers["content-type"].startswith("text/csv")
    text = csv_r.text
    assert text.startswith("section,item,value,detail\n")
    assert "protection,PHI without verified protection,1," in text
    assert "api_key =HYPERLINK(evil)" in text and "\n=" not in text and ",=" not in text  # no cell starts a formula
    from carepost.compliance.reports import _csv_cell

    assert _csv_cell("=HYPERLINK(evil)") == "'=HYPERLINK(evil)" and _csv_cell("ok") == "ok"
    pdf = client.get("/api/v1/compliance/reports", params={"format": "pdf"}, headers=officer)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF-") and pdf.content.rstrip().endswith(b"%%EOF") and len(pdf.content) > 1500

    for params, name in (({"start": "2026-13-01"}, "start"), ({"end": (date.today() + timedelta(days=1)).isoformat()}, "end"),
                         ({"start": date.today().isoformat(), "end": (date.today() - timedelta(days=1)).isoformat()}, "start"),
                         ({"start": (date.today() - timedelta(days=400)).isoformat()}, "start")):
        r = client.get("/api/v1/compliance/reports", params=params, headers=officer)
        assert r.status_code == 422 and r.json()["error"]["field"] == name, (params, r.text)
    session.rollback()
    assert session.scalar(select(AuditEvent).where(AuditEvent.action == "compliance.report.generated")) is not None
