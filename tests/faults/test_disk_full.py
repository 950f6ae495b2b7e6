"""The disk of the embedded database fills up (issue 17 item 3).

The data dir lives on a small tmpfs of its own (mounted for this test; root, as the test machines
and CI run). The API is driven until the disk is full: the answer is a clear 507
``storage_full`` (nothing half-stored), the database passes SQLite's and SQLCipher's integrity
checks, every message accepted before stays whole (its body decrypts) and the audit chain
verifies; once space returns, the next message is accepted.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from sqlalchemy import select

pytestmark = pytest.mark.slow

BODY = "Your care team wrote: " + "the results are in the portal. " * 2000  # ~60 KB a message


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True, check=False)
    return done.returncode == 0


def test_disk_full_is_a_clear_error_without_corruption_and_recovers(tmp_path):
    from carepost.core.config import get_settings

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "48m"):
        pytest.skip("needs root to mount a small tmpfs for the data dir")
    saved = {k: os.environ.get(k) for k in ("CAREPOST_DATA_DIR", "CAREPOST_DATABASE_URL", "CAREPOST_QUEUE_URL",
                                            "CAREPOST_REDIS_URL", "CAREPOST_MASTER_KEY", "CAREPOST_QUEUE_NAME")}
    from tests.conftest import apply_env

    client = None
    try:
        for k in ("CAREPOST_DATABASE_URL", "CAREPOST_QUEUE_URL", "CAREPOST_REDIS_URL", "CAREPOST_MASTER_KEY"):
            os.environ.pop(k, None)
        os.environ["CAREPOST_QUEUE_NAME"] = "full" + uuid.uuid4().hex[:8]
        apply_env({"CAREPOST_DATA_DIR": str(disk / "data"), "CAREPOST_LOG_JSON": "true"})
        from fastapi.testclient import TestClient

        from carepost.accounts.credentials import create_credential
        from carepost.accounts.service import create_organization
        from carepost.app import create_app
        from carepost.assembly import assemble
        from carepost.consent.service import set_consent_settings
        from carepost.core.bootstrap import initialize_storage
        from carepost.core.database import org_session, system_session
        from carepost.delivery import service
        from tests.fixtures.delivery import prove_ownership

        assemble()
        initialize_storage()
        with system_session() as s:
            org = create_organization(s, "Full Disk Clinic")
            s.commit()
            org_id = org.id
        with org_session(org_id) as s:
            row = service.create_sending_domain(s, org_id, "bar.example")
            prove_ownership(s, row)
            service.update_delivery_settings(s, org_id, {"default_purpose": "treatment"})
            set_consent_settings(s, org_id, {"postal_address": "Bar Clinic, 1 Main Street, Springfield, IL 62701"})
            cred, secret = create_credential(s, org_id, name="disk full", scopes=["messages:send", "messages:read"])
            s.commit()
        key = {"Authorization": f"Bearer {cred.key_id}.{secret}"}
        # As a real client sees it (the error handler answers, then re-raises for the server log).
        client = TestClient(create_app(), base_url="http://localhost:8000", raise_server_exceptions=False)

        # Take the disk down to a few megabytes, then write until it is full.
        filler = disk / "filler"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(filler, "wb") as fh:
            fh.write(b"\0" * max(0, free - 4 * 1024 * 1024))
        accepted, refusal = [], None
        for i in range(400):
            r = client.post("/api/v1/messages", headers=key, json={
                "from": "Bar Clinic <care@bar.example>", "to": [f"patient{i}@valid.test"],
                "subject": "From your care team", "text": f"{i}: {BODY}"})
            if r.status_code != 202:
                refusal = r
                break
            accepted.append((i, r.json()["id"]))
        assert refusal is not None, "the disk never filled"
        assert accepted, "nothing fitted before the disk filled"
        assert refusal.status_code == 507, refusal.text
        assert refusal.json()["error"]["code"] == "storage_full" and refusal.headers.get("retry-after")
        assert "patient" not in refusal.text

        # No corruption: integrity checks on a fresh connection, every accepted message whole.
        from carepost.core.backup import check_database

        assert check_database(get_settings())
        from carepost.audit.verify import verify
        from carepost.core.crypto import get_keyring
        from carepost.core.database import read_only_session
        from carepost.delivery.models import Message

        with read_only_session() as s:
            rows = {m.id: m for m in s.scalars(select(Message)).all()}
            assert set(rows) == {mid for _, mid in accepted}  # nothing half-stored, nothing lost
            for i, mid in accepted[-3:]:
                text = get_keyring().decrypt_text(s, org_id, "messages", "text", mid, rows[mid].text_enc)
                assert text.startswith(f"{i}: ")
            report = verify(s, org_id=None)
            assert report.ok, report.to_dict()

        # Space returns: the next message is accepted.
        filler.unlink()
        r = client.post("/api/v1/messages", headers=key, json={
            "from": "Bar Clinic <care@bar.example>", "to": ["patient-after@valid.test"],
            "subject": "From your care team", "text": "after"})
        assert r.status_code == 202, r.text
    finally:
        if client is not None:
            client.close()
        from carepost.core.database import dispose_engine
        from carepost.core.queue import huey

        dispose_engine()
        huey.reset_storage()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        apply_env({k: v for k, v in saved.items() if v is not None and k != "CAREPOST_QUEUE_NAME"})
        huey.reset_storage()
        subprocess.run(["umount", "-l", str(disk)], check=False)
