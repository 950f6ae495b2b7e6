"""``carepost doctor``: checks a configuration against what HIPAA's technical safeguards need.
It reads several capabilities (keys, database, queue, sending domains), so it sits at the top of
the layers beside the composition root.

Each check returns findings with a level:

* ``ok``    — as it should be;
* ``info``  — worth knowing, nothing to do;
* ``warn``  — CarePost can't prove it from here, or it is weaker than it should be;
* ``fail``  — fix before PHI goes in (``carepost doctor`` exits non-zero).

References: 45 CFR 164.312(a)(2)(iv) encryption at rest, 164.312(e) transmission security,
164.312(d) authentication; the 2025 NPRM makes encryption and MFA required.
"""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from carepost.core.config import Settings

Level = Literal["ok", "info", "warn", "fail"]
LEVEL_ORDER = {"ok": 0, "info": 1, "warn": 2, "fail": 3}


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    message: str


def is_loopback_host(host: str | None) -> bool:
    """True for localhost, 127.0.0.0/8, ::1 and Unix sockets (no host, or a path)."""
    if not host or host.startswith("/"):
        return True
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- keys and files


def check_master_key(settings: Settings) -> list[Finding]:
    if settings.master_key is not None:
        return [
            Finding(
                "master key",
                "warn",
                "The master key comes from CAREPOST_MASTER_KEY. Where is it stored? Keep it in a secret "
                "manager with access control and a backup; anyone who reads it can decrypt everything.",
            )
        ]
    if settings.master_key_command:
        import shlex

        program = (shlex.split(settings.master_key_command) or ["?"])[0]
        try:
            from carepost.core.masterkeys import run_master_key_command

            key = run_master_key_command(settings.master_key_command)
        except Exception as exc:  # noqa: BLE001 - reported as a failure
            return [Finding("master key", "fail", f"The key command ({program}) did not give a master key: {exc}")]
        return [Finding("master key", "ok", f"The master key ({key.id}) comes from the key command {program}; "
                        "nothing on the data's disk decrypts it.")]
    path = settings.resolved_master_key_file
    if not path.exists():
        return [Finding("master key", "fail", f"No master key file at {path}: run `carepost init`.")]
    mode = _mode(path)
    if mode & 0o077:
        return [Finding("master key", "fail", f"{path} has mode {mode:04o}; it must be 0600 (chmod 600 {path}).")]
    findings = [Finding("master key", "ok", f"{path} exists with mode {mode:04o}.")]
    findings.extend(check_master_key_location(settings))
    pending = path.with_name(path.name + ".new")
    if pending.exists():
        findings.append(
            Finding("master key", "warn", f"{pending} exists: a key rotation was interrupted; run `carepost keys rotate` again.")
        )
    return findings


def check_master_key_location(settings: Settings) -> list[Finding]:
    """The master key file must not sit on the filesystem that holds the data it protects: a copied
    data directory, a backup of the volume or a stolen disk would carry both (issue 9 item 4)."""
    import os

    key_dev = os.stat(settings.resolved_master_key_file).st_dev
    data = [p for p in (settings.data_dir, settings.sqlite_path if settings.is_sqlite else None) if p is not None and p.exists()]
    if not any(os.stat(p).st_dev == key_dev for p in data):
        return [Finding("master key location", "ok", "The master key file is on another filesystem than the data.")]
    message = (
        f"The master key file {settings.resolved_master_key_file} is on the same filesystem as the data in "
        f"{settings.data_dir}: a copy of that disk or its backup decrypts everything. Move the key to another "
        "filesystem (CAREPOST_MASTER_KEY_FILE, e.g. a tmpfs filled at boot or a separate mounted volume), or give "
        "it through CAREPOST_MASTER_KEY_COMMAND (a secret manager or KMS) or CAREPOST_MASTER_KEY."
    )
    # A local trial is told (info), not warned: `make run` keeps everything in one data dir.
    return [Finding("master key location", "fail" if settings.is_production else "info",
                    message + ("" if settings.is_production else " Required in production mode."))]


def check_data_dir(settings: Settings) -> list[Finding]:
    d = settings.data_dir
    if not d.exists():
        return [Finding("data dir", "fail", f"{d} does not exist: run `carepost init`.")]
    mode = _mode(d)
    if mode & 0o007:
        return [Finding("data dir", "fail", f"{d} has mode {mode:04o}: other users can reach it; chmod 700 {d}.")]
    if mode & 0o070:
        return [Finding("data dir", "warn", f"{d} has mode {mode:04o}: its group can reach it; 0700 is expected.")]
    return [Finding("data dir", "ok", f"{d} has mode {mode:04o}.")]


# --------------------------------------------------------------------------- database


def _db_host(settings: Settings) -> str | None:
    from sqlalchemy.engine import make_url

    url = make_url(settings.effective_database_url)
    return url.host or (url.query.get("host") if isinstance(url.query.get("host"), str) else None)


def check_database_encryption(settings: Settings) -> list[Finding]:
    if not settings.is_sqlite:
        return [
            Finding(
                "database encryption",
                "warn",
                "PostgreSQL: disk encryption can't be verified from here. Make sure the database volume and "
                "its backups are encrypted (LUKS, encrypted cloud disks). Direct identifiers and message "
                "bodies are encrypted by CarePost itself either way.",
            )
        ]
    from carepost.core.crypto import database_key_file

    path = settings.sqlite_path
    if not path.exists():
        return [Finding("database encryption", "fail", f"No database at {path}: run `carepost init`.")]
    findings = []
    key_file = database_key_file(settings)
    if key_file.exists() and _mode(key_file) & 0o077:
        findings.append(Finding("database encryption", "fail", f"{key_file} has mode {_mode(key_file):04o}; it must be 0600."))
    # Read as plain SQLite would: SQLCipher's own library without a key (never the standard
    # library's sqlite3 here: a second SQLite library in a process that holds the database open
    # closes a descriptor of the file, which drops every POSIX lock the process holds on it, and
    # another process may then checkpoint and delete the WAL in use — the evidence pack runs this
    # inside the server).
    import sqlcipher3

    plain = sqlcipher3.dbapi2.connect(f"file:{path}?mode=ro", uri=True)
    try:
        plain.execute("SELECT count(*) FROM sqlite_master").fetchone()
        readable = True
    except sqlcipher3.dbapi2.DatabaseError:
        readable = False
    finally:
        plain.close()
    if readable:
        findings.append(Finding("database encryption", "fail", f"{path} can be read by plain SQLite: it is not encrypted."))
        return findings
    from sqlalchemy import text

    from carepost.core.database import make_engine

    engine = make_engine(settings)
    try:
        with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:  # reads only
            version = conn.execute(text("PRAGMA cipher_version")).scalar()
    finally:
        engine.dispose()
    if not version:
        findings.append(Finding("database encryption", "fail", f"{path} is not opened through SQLCipher."))
    else:
        findings.append(
            Finding("database encryption", "ok", f"{path} is encrypted with SQLCipher {version}; plain SQLite cannot read it.")
        )
    return findings


def check_database_tls(settings: Settings) -> list[Finding]:
    if settings.is_sqlite:
        return [Finding("database TLS", "info", "Embedded SQLite file: no network connection.")]
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from carepost.core.database import make_engine

    url = make_url(settings.effective_database_url)
    host = _db_host(settings)
    sslmode = str(url.query.get("sslmode", "") or "")
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            server_ssl = conn.execute(text("SHOW ssl")).scalar()
            in_use = conn.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).scalar()
    finally:
        engine.dispose()
    return evaluate_database_tls(host, sslmode, server_ssl, bool(in_use))


def evaluate_database_tls(host: str | None, sslmode: str, server_ssl: str, in_use: bool) -> list[Finding]:
    """TLS is required off loopback: the connection must use it and sslmode must demand it
    (``prefer`` falls back to clear text when an attacker strips TLS)."""
    detail = f"server ssl={server_ssl}, this connection {'uses' if in_use else 'does not use'} TLS, sslmode={sslmode or 'unset'}"
    if is_loopback_host(host):
        return [Finding("database TLS", "ok", f"Loopback connection to PostgreSQL ({detail}); TLS not required.")]
    if not in_use or sslmode not in ("require", "verify-ca", "verify-full"):
        return [
            Finding(
                "database TLS",
                "fail",
                f"PostgreSQL at {host} is reached without required TLS ({detail}). Enable ssl on the server and "
                "add ?sslmode=verify-full to CAREPOST_DATABASE_URL.",
            )
        ]
    if sslmode != "verify-full":
        return [Finding("database TLS", "warn", f"TLS in use but the server certificate is not fully verified ({detail}); use sslmode=verify-full.")]
    return [Finding("database TLS", "ok", f"TLS with a verified certificate ({detail}).")]


def check_database_maintenance(settings: Settings) -> list[Finding]:
    if settings.is_sqlite:
        return [Finding("database maintenance", "info", "Embedded SQLite file: no autovacuum to check.")]
    from sqlalchemy import text

    from carepost.core.database import make_engine

    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            autovacuum = conn.execute(text("SHOW autovacuum")).scalar()
    finally:
        engine.dispose()
    return evaluate_autovacuum(str(autovacuum))


def evaluate_autovacuum(autovacuum: str) -> list[Finding]:
    """Sending moves every campaign recipient and message recipient through statuses; the rows
    they leave behind are dead, and only vacuum takes them out of the indexes that find the next
    batch. Without autovacuum (PostgreSQL's default is on) each batch walks more of them as a
    campaign goes on."""
    if autovacuum == "on":
        return [Finding("database maintenance", "ok", "PostgreSQL autovacuum is on.")]
    return [Finding("database maintenance", "warn",
                    f"PostgreSQL autovacuum is {autovacuum}: the dead rows every send leaves in the sending queues' "
                    "indexes are never removed, and each batch slows as a campaign goes on. Turn it on in "
                    "postgresql.conf (the default), or run VACUUM (ANALYZE) on a schedule.")]


def check_migrations(settings: Settings) -> list[Finding]:
    from alembic.script import ScriptDirectory

    from carepost.core.database import make_engine
    from carepost.core.migrate import alembic_config, current_revision

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    engine = make_engine(settings)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    if current == head:
        return [Finding("migrations", "ok", f"Database schema at head ({head}).")]
    return [Finding("migrations", "fail", f"Database schema at {current or 'nothing'}, code expects {head}: run `carepost init`.")]


# --------------------------------------------------------------------------- network


# Schemes that carry traffic in clear, with their TLS counterpart.
PLAIN_SCHEMES = {"redis": "rediss", "smtp": "smtps", "http": "https", "ldap": "ldaps", "amqp": "amqps"}
TLS_SCHEMES = set(PLAIN_SCHEMES.values())


def check_connection_urls(settings: Settings) -> list[Finding]:
    """Every ``*_url`` setting other than the database and the base URL (queue, Redis, SMTP relay
    and whatever later capabilities add): TLS unless the host is loopback."""
    findings = []
    for name in sorted(type(settings).model_fields):
        if not name.endswith("_url") or name in ("database_url", "base_url"):
            continue
        value = getattr(settings, name)
        if not value:
            continue
        env = f"CAREPOST_{name.upper()}"
        parts = urlsplit(str(value))
        scheme = parts.scheme.lower()
        if scheme == "unix":
            findings.append(Finding(env, "ok", "Unix socket: no network connection."))
        elif scheme in TLS_SCHEMES:
            findings.append(Finding(env, "ok", f"{scheme}:// to {parts.hostname}: TLS."))
        elif scheme == "smtp" and parse_qs(parts.query).get("starttls", [""])[0] == "require":
            findings.append(Finding(env, "ok", f"smtp:// to {parts.hostname} with STARTTLS required."))
        elif scheme in PLAIN_SCHEMES and is_loopback_host(parts.hostname):
            findings.append(Finding(env, "ok", f"{scheme}:// to loopback {parts.hostname}: TLS not required."))
        elif scheme in PLAIN_SCHEMES:
            findings.append(
                Finding(env, "fail", f"{scheme}:// to {parts.hostname} sends data in clear; use {PLAIN_SCHEMES[scheme]}://.")
            )
        else:
            findings.append(Finding(env, "warn", f"Unknown scheme {scheme!r}; can't tell whether the connection uses TLS."))
    return findings


def check_smtp(settings: Settings) -> list[Finding]:
    """Outgoing mail: the delivery code requires verified TLS to a relay and decides per
    recipient when delivering directly, so this reports how mail leaves rather than failing."""
    relay = getattr(settings, "smtp_relay", None)
    if relay:
        host = relay.split("@", 1)[0].rsplit(":", 1)[0]
        return [Finding("SMTP", "ok", f"All mail goes through the relay {host}; verified TLS is required on every connection to it.")]
    return [
        Finding(
            "SMTP",
            "info",
            "Direct delivery to recipients' MX servers: verified TLS where the recipient offers it; when a message "
            "needs protection and TLS can't be verified, it goes by portal, PGP or S/MIME, or not at all.",
        )
    ]


def check_outbound_overrides(settings: Settings) -> list[Finding]:
    """Settings that reroute outbound mail or widen whom it trusts: right for tests and private
    networks, a risk anywhere else (a wrong MX override sends patients' mail to another host)."""
    findings = []
    for name, meaning in (
        ("dns_nameservers", "DNS look-ups for MX, TXT and MTA-STS go to these servers only"),
        ("mx_overrides", "mail for these domains goes to the listed hosts instead of their MX"),
        ("mta_sts_overrides", "MTA-STS policies of these domains are fetched from the listed addresses"),
        ("extra_ca_file", "outbound TLS also trusts the certificate authorities in this file"),
    ):
        if getattr(settings, name, None):
            findings.append(Finding("outbound mail", "warn", f"CAREPOST_{name.upper()} is set: {meaning}. Unset it unless "
                                    "this is a test or a private network you control."))
    return findings


def check_sending_domains(settings: Settings) -> list[Finding]:
    """Sending domains whose DNS records (DKIM, SPF, DMARC, return path, MTA-STS) did not check
    out: sending from them is allowed, but receivers may reject or junk the mail."""
    from sqlalchemy.orm import Session

    from carepost.core.database import make_engine
    from carepost.delivery.service import unproven_sending_domains, unverified_sending_domains

    # Only reads: DEFERRED on SQLite, so a caller holding the write lock (the evidence pack is
    # built inside a request's transaction) is not waited on until the busy timeout.
    engine = make_engine(settings)
    try:
        with Session(engine.execution_options(sqlite_begin="DEFERRED")) as session:
            session.info["scope"] = "system"
            unverified = unverified_sending_domains(session)
            unproven = unproven_sending_domains(session)
    finally:
        engine.dispose()
    if not unverified and not unproven:
        return [Finding("sending domains", "ok", "Every sending domain's DNS records check out (or there are none yet).")]
    parts = []
    if unverified:
        names = ", ".join(sorted({domain for _, domain in unverified})[:10])
        parts.append(f"{len(unverified)} sending domain(s) whose DNS records do not check out: {names}.")
    if unproven:
        # Issue 9 item 2: nothing is sent from a domain until its ownership record is found.
        names = ", ".join(sorted({domain for _, domain in unproven})[:10])
        parts.append(f"{len(unproven)} sending domain(s) whose ownership is not proven (nothing is sent from them): "
                     f"{names}.")
    return [Finding("sending domains", "warn", " ".join(parts) + " Publish the records and run `carepost domain check`.")]


def check_notice_sender(settings: Settings) -> list[Finding]:
    """CarePost's own notices (form confirmations, portal codes) of an organization without a
    sending domain come from ``no-reply@<notice sender domain or HELO name>``: on a fresh install
    the HELO name is often ``localhost``, which no message may carry (issue 10 item 11)."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from carepost.accounts.models import Organization
    from carepost.core.database import make_engine
    from carepost.delivery.models import SendingDomain
    from carepost.portal.mailer import NoNoticeSender, notice_domain

    try:
        domain = notice_domain(settings)
    except NoNoticeSender:
        domain = None
    if domain is not None:
        return [Finding("notice sender", "ok", f"Notices of an organization without a sending domain come from no-reply@{domain}.")]
    # Only reads: DEFERRED on SQLite, so a caller holding the write lock (the evidence pack is
    # built inside a request's transaction) is not waited on until the busy timeout.
    engine = make_engine(settings)
    try:
        with Session(engine.execution_options(sqlite_begin="DEFERRED")) as session:
            session.info["scope"] = "system"
            orgs = session.scalar(select(func.count()).select_from(Organization)) or 0
            with_domain = session.scalar(select(func.count(func.distinct(SendingDomain.org_id)))) or 0
    except Exception:  # noqa: BLE001 - no database yet: the data dir check reports it
        orgs, with_domain = 0, 0
    finally:
        engine.dispose()
    missing = max(orgs - with_domain, 0)
    if not missing:
        return [Finding("notice sender", "info",
                        "No notice sender (the HELO name is not a domain and CAREPOST_NOTICE_SENDER_DOMAIN is not set): "
                        "every organization needs a sending domain before it can send form confirmations or portal codes.")]
    return [Finding("notice sender", "warn",
                    f"No notice sender: the HELO name is not a domain and CAREPOST_NOTICE_SENDER_DOMAIN is not set, so "
                    f"{missing} organization(s) without a sending domain cannot send form confirmations or portal codes. "
                    "Add a sending domain to each organization, or set CAREPOST_NOTICE_SENDER_DOMAIN.")]


def check_api_credentials(settings: Settings) -> list[Finding]:
    """API credentials expiring within 30 days (issue 9 item 6): replace them before they stop."""
    from sqlalchemy.orm import Session

    from carepost.accounts.credentials import expiring_credentials
    from carepost.core.database import make_engine

    # Only reads: DEFERRED on SQLite, so a caller holding the write lock (the evidence pack is
    # built inside a request's transaction) is not waited on until the busy timeout.
    engine = make_engine(settings)
    try:
        with Session(engine.execution_options(sqlite_begin="DEFERRED")) as session:
            session.info["scope"] = "system"
            soon = [(c.key_id, c.expires_at) for c in expiring_credentials(session)]
    finally:
        engine.dispose()
    if not soon:
        return [Finding("API credentials", "ok", "No API credential expires within 30 days.")]
    names = ", ".join(f"{key_id} ({at:%Y-%m-%d})" for key_id, at in sorted(soon, key=lambda x: x[1])[:10])
    return [Finding("API credentials", "warn", f"{len(soon)} API credential(s) expire within 30 days: {names}. "
                    "Create replacements and revoke the old ones.")]


def check_base_url(settings: Settings) -> list[Finding]:
    parts = urlsplit(settings.base_url)
    if parts.scheme == "https":
        return [Finding("base URL", "ok", f"{settings.base_url} uses HTTPS.")]
    if is_loopback_host(parts.hostname):
        return [Finding("base URL", "info", f"{settings.base_url} is local; use https:// once anyone else connects.")]
    return [
        Finding(
            "base URL",
            "fail",
            f"{settings.base_url} is not HTTPS: sign-ins, session cookies and PHI would cross the network in clear. "
            "Serve CarePost behind TLS and set CAREPOST_BASE_URL=https://...",
        )
    ]


def check_mfa(settings: Settings) -> list[Finding]:
    return [
        Finding(
            "MFA",
            "ok",
            "Enforced: every person needs TOTP or WebAuthn before any permissioned page or API call; it cannot be turned off.",
        )
    ]


def check_queue(settings: Settings) -> list[Finding]:
    from carepost.core.queue import create_storage, is_redis_url, sqlite_queue_path

    storage = create_storage(settings)
    try:
        if is_redis_url(settings.queue_url):
            storage.conn.ping()
            where = f"Redis at {urlsplit(settings.queue_url).hostname}"
        else:
            where = f"SQLite at {sqlite_queue_path(settings)}"
        pending = storage.queue_size()
    finally:
        storage.close()
    return [Finding("task queue", "ok", f"{where} reachable, {pending} task(s) waiting.")]


CHECKS: list[tuple[str, Callable[[Settings], list[Finding]]]] = [
    ("master key", check_master_key),
    ("data dir", check_data_dir),
    ("database encryption", check_database_encryption),
    ("database TLS", check_database_tls),
    ("database maintenance", check_database_maintenance),
    ("migrations", check_migrations),
    ("connections", check_connection_urls),
    ("SMTP", check_smtp),
    ("outbound mail", check_outbound_overrides),
    ("sending domains", check_sending_domains),
    ("notice sender", check_notice_sender),
    ("API credentials", check_api_credentials),
    ("base URL", check_base_url),
    ("MFA", check_mfa),
    ("task queue", check_queue),
]


def run_checks(settings: Settings) -> list[Finding]:
    findings: list[Finding] = []
    for name, check in CHECKS:
        try:
            findings.extend(check(settings))
        except Exception as exc:  # a check that cannot run is a failure, not a crash
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            findings.append(Finding(name, "fail", f"Could not check: {type(exc).__name__}: {first_line}"))
    return findings


def worst(findings: list[Finding]) -> Level:
    return max((f.level for f in findings), key=LEVEL_ORDER.__getitem__, default="ok")
