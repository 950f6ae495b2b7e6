"""Authorization texts and signed authorizations at the service level: completeness per
language, rendering, the evidence hash, encryption of signatures and evidence, patient deletion
(opt-outs and evidence survive by blind index), the right-of-access export, and no PHI in logs."""

from __future__ import annotations

import io
import json

import pytest
from sqlalchemy import select

from carepost.consent import authorizations as auth
from carepost.consent import eligibility, service
from carepost.consent.models import Authorization, AuthorizationText, Suppression
from carepost.consent.texts import DEFAULT_TEXTS
from carepost.core.database import org_session
from carepost.core.errors import ValidationFailed


def _elements(purpose="marketing"):
    return {lang: dict(values) for lang, values in DEFAULT_TEXTS[purpose].items()}


def test_every_required_element_is_checked_in_every_language():
    for purpose in ("marketing", "marketing_remunerated"):
        assert auth.check_completeness(purpose, _elements(purpose)) == []
        for element in auth.required_elements(purpose):
            for lang in ("en", "es"):
                broken = _elements(purpose)
                del broken[lang][element]
                missing = auth.check_completeness(purpose, broken)
                assert [(m["language"], m["element"]) for m in missing] == [(lang, element)], (purpose, element, lang)
                assert missing[0]["rule"].startswith(("164.508", "plain"))
    # remuneration is required only where the purpose needs the statement (164.508(a)(3)(ii))
    assert "remuneration" in auth.required_elements("marketing_remunerated")
    assert "remuneration" not in auth.required_elements("marketing")
    # English is required
    only_es = {"es": _elements()["es"]}
    assert [m["element"] for m in auth.check_completeness("marketing", only_es)] == ["*"]


def test_render_keeps_the_order_and_headings_per_language():
    text = auth.render(_elements("marketing_remunerated")["es"], "es")
    assert text.startswith("Autorización para recibir")
    order = [text.index(h) for h in ("Información que se usará", "Quién puede recibirla", "Pago recibido",
                                     "Su derecho a revocar", "Nueva divulgación", "Firma")]
    assert order == sorted(order)


def test_publish_refuses_a_spanish_version_missing_an_element(org, session):
    with org_session(org.id) as s:
        elements = _elements()
        elements["es"]["conditioning"] = "corto"  # too short to be a statement
        text = auth.create_text(s, org.id, "marketing", elements, created_by="t")
        with pytest.raises(ValidationFailed) as exc:
            auth.publish_text(s, org.id, text.id)
        assert exc.value.field == "elements.es.conditioning"
        s.rollback()
        assert auth.current_text(s, org.id, "marketing").version == 1


def test_signature_and_evidence_are_encrypted_and_the_hash_proves_the_text(org, session):
    from carepost.patients import service as patients

    with org_session(org.id) as s:
        c = patients.save_contact(s, org.id, {"given_name": "Ivo", "email": "ivo@example.test"}).contact
        row = auth.record_authorization(s, org.id, contact_id=c.id, purpose="marketing", method="form",
                                        signature_name="Ivo Example", ip="198.51.100.7", user_agent="Browser/2",
                                        representative_name="Ema Example", representative_authority="legal guardian")
        s.commit()
        for blob in (row.signature_enc, row.evidence_enc, row.representative_enc):
            assert b"Ivo" not in blob and b"198.51" not in blob and b"Ema" not in blob
        data = auth.evidence(s, org.id, c.id)
        [a] = data["authorizations"]
        assert a["signature"] == "Ivo Example" and a["ip"] == "198.51.100.7"
        assert a["representative"] == {"name": "Ema Example", "authority": "legal guardian"}
        assert a["hash_verified"] and "Your right to revoke" in a["text"]
        # a text altered in the database no longer matches what was signed
        text = s.get(AuthorizationText, row.text_id)
        text.rendered = {**text.rendered, "en": text.rendered["en"].replace("revoke", "keep")}
        s.flush()
        assert auth.evidence(s, org.id, c.id)["authorizations"][0]["hash_verified"] is False
        s.rollback()


def test_deleting_a_patient_keeps_opt_outs_and_evidence(org, session):
    from carepost.patients import service as patients

    with org_session(org.id) as s:
        c = patients.save_contact(s, org.id, {"given_name": "Oda", "emails": ["oda@example.test", "oda.work@example.test"]}).contact
        t = service.create_topic(s, org.id, key="tips", name="Tips")
        row = auth.record_authorization(s, org.id, contact_id=c.id, purpose="marketing", method="api", signature_name="Oda")
        service.unsubscribe_contact(s, org.id, c.id, t.id, source="test")
        s.commit()
        exported = patients.export_contact(s, org.id, c.id)
        assert exported["consent"]["authorizations"][0]["signature"] == "Oda"
        assert exported["consent"]["subscriptions"][0]["status"] == "unsubscribed"
        patients.delete_contact(s, org.id, c.id)
        s.commit()
        s.expire_all()
        kept = s.get(Authorization, row.id)
        assert kept is not None and kept.contact_id is None and kept.subject_index is not None
        assert len(s.scalars(select(Suppression).where(Suppression.scope == "topic")).all()) == 2  # both addresses
        again = patients.save_contact(s, org.id, {"given_name": "Oda", "email": "oda.work@example.test"}).contact
        auth.record_authorization(s, org.id, contact_id=again.id, purpose="marketing", method="api", signature_name="Oda")
        s.commit()
        assert eligibility.check_eligibility(s, [again.id], "marketing", t.id, org_id=org.id) == {again.id: "unsubscribed_topic"}


def test_no_phi_in_logs_during_consent_flows(client, org, session):
    from carepost.accounts import credentials as creds
    from carepost.core.config import get_settings
    from carepost.core.logging import configure_logging

    cred, secret = creds.create_credential(session, org.id, name="t", scopes=["consent:manage", "phi:write", "phi:read_unmasked"])
    session.commit()
    h = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
    stream = io.StringIO()
    configure_logging("DEBUG", json=True, stream=stream)
    try:
        cid = client.post("/api/v1/contacts", json={"given_name": "Zarathustra", "email": "zara.t@example.org"},
                          headers=h).json()["id"]
        r = client.post("/api/v1/authorizations", headers=h, json={"email": "zara.t@example.org", "purpose": "marketing",
                                                                   "signature": {"name": "Zarathustra Quill"}})
        assert r.status_code == 201
        bad = client.post("/api/v1/authorizations", headers=h, json={"email": "zara.t@example.org", "purpose": "marketing",
                                                                     "signature": {"name": "Zarathustra Quill\x00"}})
        assert bad.status_code == 422 and "Zarathustra" not in bad.text
        client.post("/api/v1/suppressions", headers=h, json={"address": "zara.t@example.org", "reason": "manual"})
        bad = client.post("/api/v1/suppressions/import", headers={**h, "Content-Type": "text/csv"},
                          content="address\nzara.t@@example.org\n")
        assert bad.status_code == 422 and "zara" not in bad.text
        client.get(f"/api/v1/contacts/{cid}/consent/evidence", headers=h)
        client.post("/api/v1/eligibility", headers=h, json={"contact_ids": [cid], "purpose": "marketing"})
    finally:
        configure_logging(get_settings().log_level, get_settings().log_json)
    logged = stream.getvalue()
    assert logged  # the capture saw the requests
    for value in ("Zarathustra", "zara.t@", "Quill", "192.0.2.55"):
        assert value not in logged, value
    # nor in audit details
    from carepost.audit.models import AuditEvent

    session.rollback()
    details = json.dumps([e.details for e in session.scalars(select(AuditEvent).where(AuditEvent.org_id == org.id))])
    for value in ("Zarathustra", "zara.t@", "Quill", "192.0.2.55"):
        assert value not in details, value
