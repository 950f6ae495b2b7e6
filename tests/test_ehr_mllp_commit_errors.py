"""When a message cannot be committed (issue 15 item 3, docs/ehr.md): the real ``carepost mllp``
process, its database refusing writes for a while — on SQLCipher the listener process may not
write to its files (``RLIMIT_FSIZE`` 0 set on it from outside: every write of the WAL fails, as
on a full disk), on PostgreSQL the database is made read-only and the listener's connections are
cut (the pool reconnects into read-only sessions). The group's transaction fails, each message
is tried again on its own and fails too: the original-mode sender gets AE 207 ("send it again"),
the enhanced-mode sender one commit error CE 207 and no application ACK. Nothing of those
messages is stored (no event, no ``ehr_messages`` row, no audit event; the audit chain verifies),
nothing identifying is logged, and once the database takes writes again the sender's unchanged
resend is recorded once — by the same listener process, which never stopped."""

from __future__ import annotations

import resource
from contextlib import contextmanager

import pytest
from sqlalchemy import func, select

from carepost.audit.models import AuditEvent
from carepost.core.database import read_only_session
from tests.ehr_messages import MllpClient, adt, parse_ack, siu
from tests.fixtures.delivery import free_port
from tests.test_ehr_mllp import _connection, _events, _messages, _patient, _start, _stop, _wait_for_port

APPLICATION_NAME = "carepost-mllp-commit-errors"


@pytest.fixture
def listener(storage):
    """A listener of this test alone (its process is the one whose writes fail)."""
    extra = {}
    if storage.backend == "postgresql":
        # Its connections carry a name, so the test cuts only those.
        extra["CAREPOST_DATABASE_URL"] = storage.env["CAREPOST_DATABASE_URL"] + f"?application_name={APPLICATION_NAME}"
    port = free_port()
    proc = _start(storage, port, extra)
    _wait_for_port(proc, port)
    yield proc, port
    assert _stop(proc) == 0


def _pg(statement: str) -> None:
    """On the suite's administration database (a session in the read-only database could not
    undo the setting)."""
    import psycopg
    from sqlalchemy.engine import make_url

    from tests.conftest import _pg_admin_url

    with psycopg.connect(make_url(_pg_admin_url()).set(drivername="postgresql").render_as_string(hide_password=False),
                         autocommit=True) as conn:
        conn.execute(statement)


def _cut_listener_connections() -> None:
    _pg("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 f"WHERE application_name = '{APPLICATION_NAME}' AND pid <> pg_backend_pid()")


@contextmanager
def _database_refuses_writes(storage, pid: int):
    if storage.backend == "postgresql":
        from sqlalchemy.engine import make_url

        name = make_url(storage.env["CAREPOST_DATABASE_URL"]).database
        _pg(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        _cut_listener_connections()
        try:
            yield
        finally:
            _pg(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            _cut_listener_connections()
    else:
        before = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, before[1]))
        try:
            yield
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, before)


def _audited(org_id: str) -> int:
    with read_only_session(org_id) as s:
        return s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.org_id == org_id))


def _enhanced(message: str) -> str:
    first, _, rest = message.partition("\r")
    return f"{first}|||AL|AL\r{rest}"


def test_a_message_that_cannot_be_committed_is_answered_send_again_and_nothing_is_kept(db, org, listener):
    from carepost.audit.verify import verify

    proc, port = listener
    _patient(org.id, "MRN-COMMIT")
    token = _connection(org.id)
    original = siu(token, "S12", "CE-1", "MRN-COMMIT")
    enhanced = _enhanced(adt(token, "A01", "CE-2", "MRN-COMMIT"))
    unmatched = adt(token, "A08", "CE-3", "MRN-404")  # would go to the error queue: not even that
    with MllpClient(port) as client:
        assert client.exchange(adt(token, "A08", "CE-0", "MRN-COMMIT"))["code"] == "AA"  # the pool is warm
        stored = (len(_events(org.id)), len(_messages(org.id)), _audited(org.id))
        with _database_refuses_writes(db, proc.pid):
            for message, control_id in ((original, "CE-1"), (unmatched, "CE-3")):
                answer = client.exchange(message)
                assert (answer["code"], answer["control_id"], answer["err_code"]) == ("AE", control_id, "207"), \
                    answer["raw"]
                assert "send it again" in answer["text"]
            client.send(enhanced)
            commit = parse_ack(client.receive())
            assert (commit["code"], commit["control_id"], commit["err_code"]) == ("CE", "CE-2", "207"), commit["raw"]
            # No application ACK after a commit error: the next frame answers the next message.
            client.send(original)
            again = parse_ack(client.receive())
            assert (again["code"], again["control_id"]) == ("AE", "CE-1"), again["raw"]
        # Nothing of those messages was kept, not even half.
        assert (len(_events(org.id)), len(_messages(org.id)), _audited(org.id)) == stored
        # The sender sends them again, unchanged, to the same listener.
        assert client.exchange(original)["code"] == "AA"
        client.send(enhanced)
        assert [parse_ack(client.receive())["code"] for _ in range(2)] == ["CA", "AA"]
        answer = client.exchange(unmatched)
        assert (answer["code"], answer["err_code"]) == ("AE", "204")  # now kept in the error queue
        assert client.exchange(original)["code"] == "AA"  # a replay: recorded once
    assert proc.poll() is None
    assert [e.name for e in _events(org.id)] == ["patient.updated", "appointment.booked", "patient.admitted"]
    assert sorted((m.control_id, m.status) for m in _messages(org.id)) == [
        ("CE-0", "recorded"), ("CE-1", "recorded"), ("CE-2", "recorded"), ("CE-3", "error")]
    with read_only_session() as s:
        assert verify(s, org_id=org.id).ok
    output = _stop(proc), proc.stdout.read().decode()
    assert output[0] == 0
    assert "mllp_message_failed" in output[1] and "MRN-COMMIT" not in output[1] and "MRN-404" not in output[1]
