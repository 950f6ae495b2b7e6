"""The auditor's evidence pack (issue 16 item 11; docs/compliance.md "Evidence pack"):
``carepost compliance evidence`` writes a ZIP whose manifest is signed with Ed25519 (public key in
the pack, fingerprint printed); it holds the configuration without secrets, the doctor findings,
the controls mapped to 164.308/310/312/316 with where each is enforced, the audit chain
verification, retention and holds, consent, keys, delivery protection and the risk-analysis
inputs. ``carepost compliance verify-evidence`` checks it offline (a process without the
database) and OpenSSL verifies the signature too; one byte changed in a file, a changed
manifest, an added file, a damaged archive or another key are refused naming the file. The API
route and the compliance page's button build it for ``compliance:manage`` only, audited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from carepost.accounts.credentials import create_credential
from tests.fixtures.accounts import csrf_from, login_client


@pytest.fixture
def pack(tmp_path, sender, client):
    from carepost.accounts.models import Organization
    from carepost.cli import app
    from carepost.core.database import system_session

    r = client.post("/api/v1/messages", headers=sender.key(), json={
        "from": "care@bar.example", "to": ["pat@example.org"], "subject": "Hello", "text": "Your results are in."})
    assert r.status_code == 202, r.text
    with system_session() as s:
        slug = s.get(Organization, sender.org_id).slug
    out = tmp_path / "evidence.zip"
    result = CliRunner().invoke(app, ["compliance", "evidence", "--org", slug, "--out", str(out)])
    assert result.exit_code == 0, result.output
    fp = result.output.split("Signed with Ed25519 key ", 1)[1].split()[0]
    assert len(fp.replace(":", "")) == 64
    return {"path": out, "fingerprint": fp, "org_id": sender.org_id, "output": result.output}


def _verify(path, *extra):
    from carepost.cli import app

    return CliRunner().invoke(app, ["compliance", "verify-evidence", str(path), *extra])


def _rewrite(src, dst, change):
    """A copy of the pack with ``change(name, data) -> data | None`` applied (None drops a file)."""
    zin = zipfile.ZipFile(src)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            data = change(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
    return dst


def test_the_pack_holds_the_evidence_and_verifies_offline(pack, tmp_path):
    from carepost.audit.models import AuditEvent
    from carepost.core.config import get_settings
    from carepost.core.database import org_session

    z = zipfile.ZipFile(pack["path"])
    names = set(z.namelist())
    for name in ("configuration", "doctor", "controls", "audit_verification", "retention_and_holds",
                 "consent_and_authorizations", "encryption_and_keys", "delivery_protection", "risk_analysis"):
        assert f"evidence/{name}.json" in names
    assert {"manifest.json", "manifest.sig", "public_key.pem", "VERIFY.txt", "evidence/controls.md"} <= names
    controls = json.loads(z.read("evidence/controls.json"))
    for section in ("164.308", "164.310", "164.312", "164.316"):
        assert any(c["cfr"].startswith(section) for c in controls), section
    for c in controls:
        for path in c["enforced_in"]:
            assert os.path.exists(os.path.join(os.path.dirname(__file__), "..", path)), path
    audit = json.loads(z.read("evidence/audit_verification.json"))
    assert audit["ok"] is True and audit["chains"][0]["events_checked"] > 0
    assert "checkpoints" in audit["chains"][0]
    retention = json.loads(z.read("evidence/retention_and_holds.json"))
    assert retention["status"]  # configured, no schedule set, or not configured
    doctor = json.loads(z.read("evidence/doctor.json"))
    assert {f["check"] for f in doctor} >= {"master key", "database encryption"}
    delivery = json.loads(z.read("evidence/delivery_protection.json"))
    assert sum(delivery["recipients_by_status"].values()) == 1
    keys = json.loads(z.read("evidence/encryption_and_keys.json"))
    assert "data" in keys["org_keys"] and keys["org_keys"]["data"]["first_created"]
    risk = json.loads(z.read("evidence/risk_analysis.json"))
    assert "message_recipients" in risk["where_phi_is_stored"]["encrypted_columns_by_table"]
    assert risk["left_to_the_organization"] and risk["who_can_reach_it"]["people_by_role"] is not None
    # no secret of the installation in the pack
    settings = get_settings()
    blob = b"".join(z.read(n) for n in names)
    for secret in (settings.master_key, settings.database_url):
        if secret:
            assert str(secret).encode() not in blob
    assert b"pat@example.org" not in blob and b"Your results" not in blob
    # verifies with CarePost, offline: a process with no database configured at all
    ok = _verify(pack["path"], "--key", pack["fingerprint"])
    assert ok.exit_code == 0 and "OK:" in ok.output, ok.output
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREPOST_")}
    env["CAREPOST_DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"
    env["CAREPOST_DATA_DIR"] = str(tmp_path / "nothing-here")
    proc = subprocess.run([sys.executable, "-m", "carepost.cli", "compliance", "verify-evidence", str(pack["path"])],
                          env=env, capture_output=True, text=True, timeout=600, check=False)  # startup alone took 63 s at load 36
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pack["fingerprint"] in proc.stdout
    # and without CarePost: OpenSSL checks the Ed25519 signature of the manifest
    z.extractall(tmp_path / "x")
    proc = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "public_key.pem", "-rawin",
                           "-in", "manifest.json", "-sigfile", "manifest.sig"], cwd=tmp_path / "x",
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "Signature Verified Successfully" in proc.stdout, proc.stdout + proc.stderr
    with org_session(pack["org_id"]) as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "compliance.evidence_pack")).one()
    assert event.details["public_key_fingerprint"] == pack["fingerprint"]


def test_tampering_is_refused_naming_the_file(pack, tmp_path):
    src = pack["path"]
    target = "evidence/delivery_protection.json"

    def one_byte(name, data):
        if name != target:
            return data
        i = data.index(b"period_days")
        return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]

    r = _verify(_rewrite(src, tmp_path / "a.zip", one_byte))
    assert r.exit_code == 1 and "REFUSED" in r.output and target in r.output, r.output

    def manifest(name, data):
        return data.replace(b'"bytes": ', b'"bytes":  ', 1) if name == "manifest.json" else data

    r = _verify(_rewrite(src, tmp_path / "b.zip", manifest))
    assert r.exit_code == 1 and "manifest.json" in r.output and "signature" in r.output, r.output

    r = _verify(_rewrite(src, tmp_path / "c.zip", lambda n, d: None if n == "evidence/doctor.json" else d))
    assert r.exit_code == 1 and "evidence/doctor.json" in r.output and "missing" in r.output, r.output

    extra = tmp_path / "d.zip"
    _rewrite(src, extra, lambda n, d: d)
    with zipfile.ZipFile(extra, "a") as z:
        z.writestr("evidence/extra.json", b"{}")
    r = _verify(extra)
    assert r.exit_code == 1 and "evidence/extra.json" in r.output, r.output

    # a byte flipped inside the stored archive itself: the damaged member is named
    stored = tmp_path / "e.zip"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
    raw = bytearray(stored.read_bytes())
    i = raw.index(b"phi_delivered_without_verified_protection")
    raw[i] ^= 0x20
    stored.write_bytes(bytes(raw))
    r = _verify(stored)
    assert r.exit_code == 1 and target in r.output, r.output

    r = _verify(src, "--key", "00" * 32)
    assert r.exit_code == 1 and "not the expected" in r.output, r.output
    garbage = tmp_path / "f.zip"
    garbage.write_bytes(b"not a zip")
    r = _verify(garbage)
    assert r.exit_code == 1 and "not a readable ZIP" in r.output


def test_api_and_button_for_compliance_only(client, org, session, make_user):
    from carepost.compliance import evidence

    cred, secret = create_credential(session, org.id, name="officer", scopes=["compliance:manage"])
    narrow, narrow_secret = create_credential(session, org.id, name="reader", scopes=["messages:read"])
    session.commit()
    r = client.post("/api/v1/compliance/evidence-pack", headers={"Authorization": f"Bearer {narrow.key_id}.{narrow_secret}"})
    assert r.status_code == 403
    r = client.post("/api/v1/compliance/evidence-pack", headers={"Authorization": f"Bearer {cred.key_id}.{secret}"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text
    got = evidence.verify_pack(r.content, expect_fingerprint=r.headers["X-Evidence-Key-Fingerprint"])
    assert got.files >= 10
    officer = make_user(org.id, "compliance_officer")
    login_client(client, officer)
    page = client.get("/app/compliance")
    assert page.status_code == 200 and "Build evidence pack" in page.text
    r = client.post("/app/compliance/evidence-pack", data={"csrf_token": csrf_from(page.text)})
    assert r.status_code == 200, r.text[:500]
    assert evidence.verify_pack(r.content).fingerprint == got.fingerprint  # the same organization key
    client.cookies.clear()
    marketer = make_user(org.id, "marketer")
    login_client(client, marketer)
    home = client.get("/app")
    r = client.post("/app/compliance/evidence-pack", data={"csrf_token": csrf_from(home.text)})
    assert r.status_code == 403


def test_the_pack_lists_the_business_associate_matrix_and_workforce_training(db, org, make_user):
    """Issue 16 items 9-11: who is responsible for what (each business associate with its BAA dates,
    state and duties; PHI flows without a BAA) and training/acknowledgement statistics."""
    from datetime import timedelta

    from carepost.compliance import associates, evidence, training
    from carepost.core import clock
    from carepost.core.database import org_session
    from carepost.core.errors import ValidationFailed

    actor = {"actor_type": "user", "actor_id": "officer"}
    today = clock.now().date()
    signed, renew = today - timedelta(days=400), today + timedelta(days=30)
    acked, missing = make_user(org.id, "care_team"), make_user(org.id, "marketer")
    with org_session(org.id) as s:
        associates.create(s, org.id, {"name": "Relay Co", "kind": "smtp_relay", "ref": "smtp.relay.example",
                                      "scope": "Outbound email carrying PHI", "contact": "privacy@relay.example",
                                      "baa_signed_on": signed.isoformat(), "baa_expires_on": renew.isoformat()}, actor)
        associates.create(s, org.id, {"name": "Vault Backups", "kind": "backup_storage", "scope": "Encrypted backups"},
                          actor)
        with pytest.raises(ValidationFailed) as e:  # bad input names the field
            associates.create(s, org.id, {"name": "X", "kind": "webhook", "scope": "y"}, actor)
        assert e.value.field == "ref"
        doc = training.publish(s, org.id, key="privacy-policy", kind="policy", title="Privacy policy",
                               body="We protect patient information in every message.", actor=actor)
        training.acknowledge(s, org.id, acked.id, [doc.id], actor)
        pack = evidence.build_pack(s, org.id, actor_type="user", actor_id="officer")
        s.commit()
    got = evidence.verify_pack(pack.content, expect_fingerprint=pack.fingerprint)
    assert {"evidence/business_associates.json", "evidence/business_associates.md",
            "evidence/workforce_training.json"} <= set(pack.files) and got.files == len(pack.files)
    z = zipfile.ZipFile(__import__("io").BytesIO(pack.content))

    matrix = json.loads(z.read("evidence/business_associates.json"))
    relay = next(a for a in matrix["business_associates"] if a["name"] == "Relay Co")
    assert (relay["baa_signed_on"], relay["baa_expires_on"], relay["state"]) == (signed.isoformat(), renew.isoformat(),
                                                                               "renewal_due")
    assert relay["responsibility"].startswith("Carries messages onward")
    vault = next(a for a in matrix["business_associates"] if a["name"] == "Vault Backups")
    assert vault["state"] == "no_baa" and vault["baa_signed_on"] is None
    assert any("BAA" in c["control"] for c in matrix["carepost"]) and matrix["organization"]
    md = z.read("evidence/business_associates.md").decode()
    assert "| Relay Co | " in md and signed.isoformat() in md and "## The organization" in md

    stats = json.loads(z.read("evidence/workforce_training.json"))
    assert stats["gated"] is True and stats["people"] == 2
    assert (stats["people_current"], stats["people_not_current"]) == (1, 1)
    [d] = stats["documents"]
    assert d["key"] == "privacy-policy" and d["people_by_state"] == {"ok": 1, "due_soon": 0, "expired": 0, "missing": 1}
    assert stats["by_role"] == {"care_team": {"current": 1, "not_current": 0},
                                "marketer": {"current": 0, "not_current": 1}}
    assert {p["user_id"]: p["current"] for p in stats["per_person"]} == {acked.id: True, missing.id: False}
    assert b"@" not in z.read("evidence/workforce_training.json")  # people by id and role, no addresses

    controls = {c["id"]: c for c in json.loads(z.read("evidence/controls.json"))}
    assert controls["baa"]["status"] == "on — 2 business associate(s) on record"
    assert controls["training"]["status"] == "on — 1 of 2 people current"


def test_the_pack_verifies_the_audit_chain_in_a_snapshot_of_its_own(db, org):
    """The pack's session has begun its transaction before the audit chain is verified; the
    verification reads the chain in a read-only session of its own (REPEATABLE READ on PostgreSQL),
    so SQLAlchemy no longer warns "Connection is already established" (the isolation level asked
    of a used connection, ignored) and the pack holds a real verification of the chain."""
    import io
    import warnings

    from carepost.accounts.models import Organization
    from carepost.audit.service import record
    from carepost.audit.verify import begin_snapshot
    from carepost.compliance import evidence
    from carepost.core.database import org_session

    with org_session(org.id) as s:
        record(s, org_id=org.id, actor_type="user", actor_id="officer", action="contact.read", target_type="contact",
               target_id="c1")
        s.commit()
    with org_session(org.id) as s:
        s.get(Organization, org.id)  # the pack's transaction has begun
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pack = evidence.build_pack(s, org.id, actor_type="user", actor_id="officer")
        s.commit()
        postgresql = s.get_bind().dialect.name == "postgresql"
    assert [str(w.message) for w in caught if "already established" in str(w.message)] == []
    audit = json.loads(zipfile.ZipFile(io.BytesIO(pack.content)).read("evidence/audit_verification.json"))
    assert audit["ok"] is True and audit["chains"][0]["chain"] == org.id and audit["chains"][0]["events_checked"] > 0

    # A verification asked of a session whose transaction has begun is refused, naming the fix
    # (on SQLite every transaction is a snapshot already: nothing to choose).
    with org_session(org.id) as s:
        s.get(Organization, org.id)
        if postgresql:
            with pytest.raises(RuntimeError, match="read_only_session"):
                begin_snapshot(s)
        else:
            begin_snapshot(s)
            assert s.get(Organization, org.id) is not None
