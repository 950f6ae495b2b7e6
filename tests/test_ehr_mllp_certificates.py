"""Mutual TLS on MLLP with the client certificate bound to the MLLP connection (issue 15 item 3,
docs/ehr.md): a connection pinned to one certificate's SHA-256 (set through the API or the CLI)
takes messages only from a TLS session that presented that certificate; another certificate of
the same CA, or none, is answered AR naming MSH-8 (no fingerprint, no PHI), nothing is stored and
the refusal is audited. Real ``carepost mllp`` process, real TLS, certificates made here."""

from __future__ import annotations

import hashlib
import ssl

from cryptography import x509
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.core.database import read_only_session
from tests.ehr_messages import MllpClient, adt, parse_ack
from tests.fixtures.accounts import login_client
from tests.fixtures.delivery import TlsCA, free_port
from tests.test_ehr_mllp import (
    _client_certificate,
    _connection,
    _events,
    _messages,
    _patient,
    _start,
    _stop,
    _wait_for_port,
)


def _sha256(cert_path) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(Encoding.DER)).hexdigest()


def _connection_id(org_id: str, token: str) -> str:
    from carepost.ehr.models import MllpConnection

    with read_only_session(org_id) as s:
        return s.scalar(select(MllpConnection.id).where(MllpConnection.key_id == token.split(".")[0]))


def _audit(org_id: str, action: str) -> list[AuditEvent]:
    with read_only_session(org_id) as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.chain == org_id, AuditEvent.action == action)))


def _admin(client, make_user, org) -> dict:
    """A developer (``apikeys:manage``) signed in: MLLP connections are managed by people."""
    return {"X-CSRF-Token": login_client(client, make_user(org, role="developer"))}


def test_a_connection_pinned_to_a_certificate_refuses_any_other(db, org, storage, tmp_path, client, make_user):
    _patient(org.id, "MRN-PIN")
    pinned, open_token = _connection(org.id), _connection(org.id)
    ca = TlsCA(tmp_path)
    server_cert, server_key = ca.issue(["localhost"])
    cert_a, key_a = _client_certificate(ca, tmp_path, "epic-interface")
    cert_b, key_b = _client_certificate(ca, tmp_path, "lab-interface")
    headers = _admin(client, make_user, org)
    conn_id = _connection_id(org.id, pinned)
    fingerprint = _sha256(cert_a)
    # The API pins the connection; openssl's colon form is taken.
    colons = ":".join(fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
    answer = client.patch(f"/api/v1/ehr/mllp-connections/{conn_id}", json={"client_cert_sha256": colons},
                          headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["client_cert_sha256"] == fingerprint
    listed = client.get("/api/v1/ehr/mllp-connections", headers=headers).json()
    assert {c["id"]: c["client_cert_sha256"] for c in listed}[conn_id] == fingerprint

    port = free_port()
    proc = _start(storage, port, {"CAREPOST_MLLP_CERT_FILE": str(server_cert), "CAREPOST_MLLP_KEY_FILE": str(server_key),
                                  "CAREPOST_MLLP_CLIENT_CA_FILE": str(ca.ca_file)})
    try:
        _wait_for_port(proc, port)
        as_a = ssl.create_default_context(cafile=str(ca.ca_file))
        as_a.load_cert_chain(str(cert_a), str(key_a))
        as_b = ssl.create_default_context(cafile=str(ca.ca_file))
        as_b.load_cert_chain(str(cert_b), str(key_b))
        with MllpClient(port, tls=as_a) as mllp:
            assert mllp.exchange(adt(pinned, "A01", "PIN-1", "MRN-PIN"))["code"] == "AA"
        with MllpClient(port, tls=as_b) as mllp:
            # B's certificate is from the same CA (the handshake succeeds) but not the pinned one.
            refused = mllp.exchange(adt(pinned, "A08", "PIN-2", "MRN-PIN"))
            assert refused["code"] == "AR" and refused["err_location"] == "MSH^1^8"
            assert refused["err_code"] == "204" and "not the one pinned" in refused["err_text"]
            assert "MRN-PIN" not in refused["raw"] and fingerprint not in refused["raw"]
            # The same session may still send as a connection without a pin.
            assert mllp.exchange(adt(open_token, "A08", "PIN-3", "MRN-PIN"))["code"] == "AA"
    finally:
        assert _stop(proc) == 0
    assert [m.control_id for m in _messages(org.id)] == ["PIN-1", "PIN-3"]
    assert [e.name for e in _events(org.id)] == ["patient.admitted", "patient.updated"]
    [refusal] = _audit(org.id, "ehr_message.refuse")
    assert refusal.outcome == "failure" and refusal.target_id == conn_id and refusal.actor_type == "ehr_connection"
    assert refusal.details["reason"] == "client_cert_mismatch" and refusal.details["field"] == "MSH-8"
    assert _audit(org.id, "mllp_connection.pin")


def test_a_pinned_connection_refuses_a_session_without_a_certificate(db, org, tmp_path):
    """Plain TCP on loopback (or TLS without client certificates) presents none: AR naming MSH-8."""
    from carepost.core.database import org_session
    from carepost.ehr import service

    _patient(org.id, "MRN-NC")
    token = _connection(org.id)
    ca = TlsCA(tmp_path)
    cert, _ = _client_certificate(ca, tmp_path, "epic-interface")
    with org_session(org.id) as s:
        service.pin_client_certificate(s, service.get_connection(s, org.id, _connection_id(org.id, token)),
                                       _sha256(cert))
        s.commit()
    message = adt(token, "A01", "NC-1", "MRN-NC").encode()
    [answer] = service.ingest_frames([(message, "127.0.0.1")], [None])
    refused = parse_ack(answer.decode())
    assert refused["code"] == "AR" and refused["err_location"] == "MSH^1^8" and "presented none" in refused["text"]
    [ok] = service.ingest_frames([(message, "127.0.0.1")], [_sha256(cert)])
    assert parse_ack(ok.decode())["code"] == "AA"
    assert [r.details["reason"] for r in _audit(org.id, "ehr_message.refuse")] == ["client_cert_missing"]


def test_bad_pins_are_refused_naming_the_field(db, org, tmp_path, client, make_user):
    from typer.testing import CliRunner

    from carepost.cli import app

    headers = _admin(client, make_user, org)
    made = client.post("/api/v1/ehr/mllp-connections", headers=headers,
                       json={"name": "Lab feed", "sending_facilities": ["LAB"], "client_cert_sha256": "abc123"})
    assert made.status_code == 422 and "client_cert_sha256" in made.text
    made = client.post("/api/v1/ehr/mllp-connections", headers=headers,
                       json={"name": "Lab feed", "sending_facilities": ["LAB"], "client_cert_sha256": "ab" * 32})
    assert made.status_code == 201 and made.json()["client_cert_sha256"] == "ab" * 32
    conn_id = made.json()["id"]
    bad = client.patch(f"/api/v1/ehr/mllp-connections/{conn_id}", json={"client_cert_sha256": "g" * 64},
                       headers=headers)
    assert bad.status_code == 422 and "client_cert_sha256" in bad.text
    cleared = client.patch(f"/api/v1/ehr/mllp-connections/{conn_id}", json={"client_cert_sha256": None},
                           headers=headers)
    assert cleared.status_code == 200 and cleared.json()["client_cert_sha256"] is None

    runner = CliRunner()
    ca = TlsCA(tmp_path)
    cert, _ = _client_certificate(ca, tmp_path, "epic-interface")
    pinned = runner.invoke(app, ["ehr", "connection-pin", "--org", org.id, "--id", conn_id, "--client-cert", str(cert)])
    assert pinned.exit_code == 0 and _sha256(cert) in pinned.output, pinned.output
    not_a_cert = tmp_path / "not-a-cert.pem"
    not_a_cert.write_text("hello")
    wrong = runner.invoke(app, ["ehr", "connection-pin", "--org", org.id, "--id", conn_id, "--client-cert",
                                str(not_a_cert)])
    assert wrong.exit_code == 2 and "client_cert" in wrong.output
    wrong = runner.invoke(app, ["ehr", "connection-pin", "--org", org.id, "--id", conn_id, "--client-cert-sha256", "xyz"])
    assert wrong.exit_code == 2 and "client_cert_sha256" in wrong.output
    added = runner.invoke(app, ["ehr", "connection-add", "--org", org.id, "--name", "ADT", "--facility", "NORTH",
                                "--client-cert", str(cert)])
    assert added.exit_code == 0, added.output
    listed = client.get("/api/v1/ehr/mllp-connections", headers=headers).json()
    assert sorted(c["client_cert_sha256"] for c in listed) == [_sha256(cert)] * 2
    assert runner.invoke(app, ["ehr", "connections", "--org", org.id]).exit_code == 0
