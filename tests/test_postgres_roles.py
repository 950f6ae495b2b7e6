"""The least-privilege PostgreSQL roles of docs/deployment.md (issue 17 item 1), for real.

``deploy/postgresql/roles.sql`` is run, as written, with Debian's ``psql`` against a PostgreSQL
cluster of this test's own (roles are global to a cluster: the suite's shared server is left
alone). ``carepost init`` migrates as the owner role, in a process of its own, as the
``carepost-migrate`` unit and the Compose ``migrate`` service do. Then CarePost's real work runs
as the application role: an organization and its sending domain, a message accepted through the
API and delivered to a real SMTP server, a CSV import, audit events appended and the chain
verified, a retention purge that deletes an expired message (rows and audit events). And the
application role is shown to be what the document says: no DDL (CREATE TABLE, ALTER, DROP, CREATE
INDEX), no TRUNCATE, no rewriting of audit events (UPDATE on ``audit_events``), not the owner of
any table, no superuser, CREATEDB, CREATEROLE or replication rights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

ROOT = Path(__file__).resolve().parent.parent
ROLES_SQL = ROOT / "deploy" / "postgresql" / "roles.sql"


@pytest.fixture
def least_privilege(tmp_path):
    """A private cluster with the roles of roles.sql, migrated as the owner; CarePost in this
    process then connects as the application role. Afterwards the suite's storage settings come
    back (the ``storage`` fixture applies them again for the next test)."""
    if not os.environ.get("CAREPOST_TEST_DATABASE_URL"):
        pytest.skip("PostgreSQL tests need CAREPOST_TEST_DATABASE_URL")
    from tests.conftest import apply_env
    from tests.faults.services import PG_BIN, PrivatePostgres

    if not (PG_BIN / "psql").exists():
        pytest.skip(f"needs {PG_BIN / 'psql'} (Debian's postgresql-client)")
    pg = PrivatePostgres()
    saved = {k: os.environ.get(k) for k in ("CAREPOST_DATA_DIR", "CAREPOST_DATABASE_URL", "CAREPOST_QUEUE_URL",
                                            "CAREPOST_REDIS_URL", "CAREPOST_MASTER_KEY")}
    try:
        done = subprocess.run(
            [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-d", "postgres",
             "-v", "ON_ERROR_STOP=1", "-v", "app_password=app-secret", "-v", "migrate_password=owner-secret",
             "-f", str(ROLES_SQL)], check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        base = f"postgresql+psycopg://{{}}@127.0.0.1:{pg.port}/carepost"
        data_dir = tmp_path / "data"
        env = {"CAREPOST_DATA_DIR": str(data_dir), "CAREPOST_LOG_JSON": "true"}
        migrate = subprocess.run([sys.executable, "-m", "carepost.cli", "init"], check=False, capture_output=True,
                                 text=True, timeout=300, env={**{k: v for k, v in os.environ.items() if not k.startswith("CAREPOST_")},
                                                   **env, "CAREPOST_DATABASE_URL": base.format("carepost_owner")})
        assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
        app_env = {**env, "CAREPOST_DATABASE_URL": base.format("carepost_app")}
        apply_env(app_env)
        from carepost.assembly import assemble
        from carepost.core import clock
        from carepost.core.queue import huey
        from carepost.delivery import pipeline

        assemble()
        clock.reset()
        huey.reset_storage()  # the queue: SQLite in this data dir
        pipeline.reset()
        yield pg, base
    finally:
        from carepost.core.queue import huey
        from carepost.delivery import pipeline

        apply_env({k: v for k, v in saved.items() if v is not None})
        huey.reset_storage()
        pipeline.reset()
        pg.close()


def _refused(url: str, statement: str) -> str:
    """Run ``statement`` as the role of ``url``; the SQLSTATE of the refusal (none: it ran)."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        try:
            conn.execute(statement)
        except psycopg.Error as exc:
            return exc.sqlstate or "?"
    return ""


def test_the_application_role_does_the_work_and_nothing_more(least_privilege, delivery_env, tmp_path):
    from fastapi.testclient import TestClient

    from carepost.accounts.service import create_organization
    from carepost.app import create_app
    from carepost.audit.models import AuditEvent
    from carepost.audit.verify import verify
    from carepost.core import clock
    from carepost.core.database import org_session, read_only_session, system_session
    from carepost.delivery import pipeline
    from carepost.delivery import service as delivery
    from carepost.delivery.models import Message, MessageRecipient
    from carepost.patients import imports
    from carepost.patients.imports import import_local_file
    from carepost.patients.models import Contact
    from carepost.retention import purge
    from carepost.retention import service as retention
    from tests.fixtures.delivery import Sender, prove_ownership

    pg, base = least_privilege
    app_url, owner_url = base.format("carepost_app"), base.format("carepost_owner")
    admin_url = f"postgresql://postgres@127.0.0.1:{pg.port}/carepost"

    # ---------------------------------------------------------------- the work, as carepost_app
    with system_session() as s:
        org_id = create_organization(s, "Bar Clinic").id
        s.commit()
    with org_session(org_id) as s:
        domain = delivery.create_sending_domain(s, org_id, "bar.example")
        prove_ownership(s, domain)
        delivery.update_delivery_settings(s, org_id, {"default_purpose": "treatment"})
        s.commit()
        domain_id = domain.id
    with system_session() as s:
        key = Sender(org_id, domain_id, s).key()
    with TestClient(create_app(), base_url="http://localhost:8000") as client:
        r = client.post("/api/v1/messages", headers=key, json={
            "from": "Bar Clinic <care@bar.example>", "to": ["patient@valid.test"],
            "subject": "From your care team", "text": "Your results are in the portal."})
        assert r.status_code == 202, r.text
        message_id = r.json()["id"]
        pipeline.deliver([message_id])
        assert client.get(f"/api/v1/messages/{message_id}", headers=key).json()["recipients"][0]["status"] == "delivered"
    assert [m.rcpt_tos for m in delivery_env.mx["valid"].recorder.messages] == [["patient@valid.test"]]

    csv = tmp_path / "patients.csv"
    csv.write_text("Patient ID,First Name,Last Name,DOB,Email\nP1,Ada,Lovelace,1985-12-10,ada@valid.test\n"
                   "P2,Alan,Turing,1912-06-23,alan@valid.test\n")
    with org_session(org_id) as s:
        job = import_local_file(s, org_id, csv, format="csv")
        s.commit()
        assert job.status == "succeeded", imports.job_dict(s, job, with_errors=5)["errors"]
        assert len(s.scalars(select(Contact.id).where(Contact.org_id == org_id)).all()) == 2

    # Retention: the message made 40 days ago under a 30-day schedule is purged, rows and all.
    with org_session(org_id) as s:
        retention.set_schedule(s, org_id, "messages", min_days=0, max_days=30, actor=retention.Actor("system", "test"))
        s.execute(Message.__table__.update().where(Message.id == message_id)
                  .values(created_at=clock.now() - timedelta(days=40)))
        s.commit()
    run = purge.run_purge(org_id, retention.Actor("system", "test"))
    assert run["progress"]["messages"]["count"] == 1, run
    with system_session() as s:
        assert s.get(Message, message_id) is None
        assert s.scalars(select(MessageRecipient).where(MessageRecipient.message_id == message_id)).first() is None
        events = s.scalars(select(AuditEvent.action).where(AuditEvent.org_id == org_id)).all()
        assert len(events) > 3 and any(a.startswith("retention.") for a in events), events
    with read_only_session() as s:
        report = verify(s, org_id=org_id)
        assert report.ok, report.to_dict()

    # ---------------------------------------------------------------- and nothing more
    import psycopg

    with psycopg.connect(admin_url) as conn:
        flags = conn.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
                             "FROM pg_roles WHERE rolname = 'carepost_app'").fetchone()
        owned = conn.execute("SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
                             "WHERE r.rolname = 'carepost_app'").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
                              "AND tableowner = 'carepost_owner'").fetchone()[0]
    assert flags == (False, False, False, False, False)
    assert owned == 0 and tables > 50
    denied = "42501"  # insufficient_privilege (or must be owner)
    for statement in ("CREATE TABLE intruder (id int)",
                      "CREATE INDEX ix_intruder ON messages (id)",
                      "ALTER TABLE messages ADD COLUMN intruder int",
                      "DROP TABLE messages",
                      "TRUNCATE audit_events",
                      "TRUNCATE messages",
                      "UPDATE audit_events SET outcome = 'success'",
                      "CREATE SCHEMA intruder",
                      "CREATE DATABASE intruder",
                      "CREATE ROLE intruder"):
        assert _refused(app_url, statement) == denied, statement
    assert _refused(app_url, "DELETE FROM audit_events WHERE false") == ""  # the retention pruning's own right
    assert _refused(owner_url, "CREATE TABLE owner_may (id int)") == ""  # the owner migrates
