"""The contact page shows the patient's message history and encryption keys on file (issue 4:
recipient keys show on the contact page and warn before they expire)."""

from __future__ import annotations

import subprocess

from carepost.core.database import org_session
from carepost.patients import service as patients
from tests.fixtures.accounts import login_client


def _gpg_cert(tmp_path, address: str) -> str:
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    env = {"GNUPGHOME": str(home), "PATH": "/usr/bin:/bin"}
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", f"Pat <{address}>", "default", "default", "20d"],
                   check=True, env=env, capture_output=True)
    return subprocess.run(["gpg", "--armor", "--export", address], check=True, env=env, capture_output=True, text=True).stdout


def test_contact_page_lists_messages_and_keys(client, org, make_user, sender, tmp_path):
    from carepost.delivery import service

    with org_session(org.id) as s:
        contact = patients.save_contact(s, org.id, {"given_name": "Pat", "email": "pat@valid.test"}).contact
        service.add_recipient_key(s, org.id, "pat@valid.test", "pgp", _gpg_cert(tmp_path, "pat@valid.test"))
        s.commit()
        contact_id = contact.id
    key = sender.key()
    r = client.post("/api/v1/messages", headers=key, json={
        "from": "care@bar.example", "to": ["pat@valid.test"], "subject": "Hello", "text": "Hi"})
    assert r.status_code == 202, r.text
    owner = make_user(org, role="owner")
    login_client(client, owner)
    page = client.get(f"/app/contacts/{contact_id}")
    assert page.status_code == 200
    assert "Message history" in page.text and f"/app/deliveries/{r.json()['id']}" in page.text
    assert "Encryption keys" in page.text and "OpenPGP key" in page.text and "renew soon" in page.text
