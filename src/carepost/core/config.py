"""Configuration from ``CAREPOST_*`` environment variables.

Every setting here appears in the README's configuration table; keep the two in step.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAREPOST_", extra="ignore")

    data_dir: Path = Field(Path("data"), description="Directory for the database, keys, queue and checkpoints.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL. Empty: SQLCipher-encrypted SQLite file `carepost.db` in the data dir. "
        "PostgreSQL: postgresql+psycopg://user@host/db",
    )
    queue_url: str | None = Field(
        None, description="Task queue. Empty: Huey on SQLite in the data dir. redis://host:6379/0 for Redis."
    )
    redis_url: str | None = Field(
        None, description="Redis for rate limits shared between processes. Defaults to the queue URL when it is Redis."
    )
    master_key_file: Path | None = Field(None, description="Master key file (mode 0600). Default: <data dir>/master.key")
    master_key: SecretStr | None = Field(
        None, description="Master key as `<key id>:<base64 32 bytes>`; takes precedence over the file."
    )
    master_key_command: str | None = Field(
        None,
        description="A program (with arguments, run without a shell) that prints the master key as "
        "`<key id>:<base64 32 bytes>`, as credential helpers do: the plug-in point for a secret manager or KMS. "
        "Takes precedence over the file; CAREPOST_MASTER_KEY over it.",
    )
    key_refresh_seconds: int = Field(
        60, ge=0, description="How often (seconds) a running process re-reads the current key versions, so every process "
        "encrypts with a newly rotated data-key or audit-key version within this bound (docs/keys.md); 0 re-reads at "
        "every use.",
    )
    production: bool | None = Field(
        None,
        description="Production mode: `doctor` fails (not warns) when the master key file sits on the data's "
        "filesystem. Empty: on when the base URL is HTTPS on a host other than localhost.",
    )
    base_url: str = Field("http://localhost:8000", description="Public URL of the web UI, links and WebAuthn origin.")
    host: str = Field("127.0.0.1", description="Address `serve` binds to.")
    port: int = Field(8000, description="Port `serve` binds to.")
    session_idle_timeout: int = Field(900, description="Seconds of inactivity before a web session ends.")
    session_max_lifetime: int = Field(43200, description="Absolute lifetime of a web session in seconds.")
    max_upload_bytes: int = Field(25 * 1024 * 1024, description="Largest request body accepted, in bytes.")
    login_max_failures: int = Field(5, description="Failed logins before an account is locked.")
    login_lockout_seconds: int = Field(900, description="How long a locked account stays locked.")
    access_token_ttl: int = Field(900, description="Lifetime of OAuth 2.0 access tokens in seconds.")
    rate_limit_per_minute: int = Field(600, description="Default API requests per minute per credential.")
    hmac_max_skew_seconds: int = Field(
        300, description="How far the Timestamp of an HMAC-signed API request may differ from the server clock."
    )
    break_glass_max_minutes: int = Field(60, description="Longest emergency-access grant in minutes.")
    break_glass_min_reason: int = Field(20, description="Fewest characters an emergency-access reason may have.")
    login_ip_max_failures: int = Field(20, description="Failed logins from one IP address within the window before it is throttled.")
    login_ip_window_seconds: int = Field(900, description="Window (and throttle time) of the per-IP login failure count, in seconds.")
    password_min_length: int = Field(12, description="Shortest password accepted (NIST 800-63B; MFA is always on).")
    password_max_length: int = Field(256, description="Longest password accepted.")
    argon2_time_cost: int = Field(3, description="Argon2id iterations for password hashes.")
    argon2_memory_cost: int = Field(65536, description="Argon2id memory in KiB for password hashes.")
    argon2_parallelism: int = Field(4, description="Argon2id lanes for password hashes.")
    enrollment_link_hours: int = Field(72, description="Validity of a new person's one-time enrollment link, in hours.")
    trusted_proxies: str | None = Field(
        None,
        description="Comma-separated addresses or networks of the reverse proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto `serve` believes (uvicorn's forwarded_allow_ips; `*` trusts any). Empty: no proxy "
        "headers are believed and the client address is the connecting peer's.",
    )
    api_key_expiry_days: int = Field(
        365, ge=1, le=3650,
        description="Lifetime of a new API credential created without an explicit expiry, in days (1 to 3650). "
        "Credentials expiring within 30 days are flagged by `doctor`, the UI and the API (`expires_soon`).",
    )
    log_level: str = Field("INFO", description="Log level.")
    log_json: bool = Field(True, description="JSON log lines (false: human-readable console lines).")
    access_log: bool = Field(
        False, description="Log one line per HTTP request (uvicorn's access log). Link secrets in paths and every "
        "query value are redacted from it, as from every log line.",
    )
    capture_dir: Path | None = Field(
        None, description="Where `carepost run` stores captured mail. Default: <data dir>/mail-capture"
    )
    capture_host: str = Field("127.0.0.1", description="Address the local mail capture of `carepost run` listens on.")
    capture_port: int = Field(2525, description="SMTP port of the local mail capture of `carepost run`.")
    capture_retention_hours: float = Field(
        24, gt=0, description="Hours the local mail capture of `carepost run` keeps a captured message (encrypted "
        "at rest) before deleting it.",
    )
    mail_capture: bool = Field(
        False, description="Set by `carepost run`: outgoing mail goes only to the local mail capture, so sending "
        "domains may send before their ownership is proven. Has no effect unless CAREPOST_SMTP_RELAY names a loopback "
        "address (nothing can leave the machine).",
    )
    queue_name: str = Field("carepost", description="Name of the task queue (keys in Redis, rows in the SQLite queue).")
    worker_threads: int = Field(4, description="Task threads per `carepost worker` process.")
    worker_shutdown_timeout: int = Field(30, description="Seconds `carepost worker` lets running tasks finish after SIGTERM.")

    # Secure delivery (delivery/dns.py, tlsprobe.py, smtp.py). `carepost doctor` warns when the
    # first four are set: they reroute or widen trust for outbound mail.
    dns_nameservers: str | None = Field(
        None, description="DNS servers for MX/TXT look-ups, comma-separated host[:port]. Empty: the system resolver."
    )
    mx_overrides: str | None = Field(
        None,
        description="Route recipient domains to a host, address and port: "
        "`example.test=mx.example.test@127.0.0.1:2525`, comma-separated. The certificate is checked against the host name.",
    )
    mta_sts_overrides: str | None = Field(
        None,
        description="Where to fetch a domain's MTA-STS policy: `example.test=127.0.0.1:8443`, comma-separated. "
        "The certificate is checked against mta-sts.<domain>.",
    )
    delivery_allowed_hosts: str | None = Field(
        None, description="MX and MTA-STS hosts CarePost may connect to although they resolve to non-public addresses "
        "(loopback, private, link-local): host names, addresses or networks (CIDR), comma-separated. Empty: only public "
        "addresses. Addresses written in the overrides and the relay are trusted as written; an organization's own "
        "relay (its delivery settings) is checked like an MX.",
    )
    extra_ca_file: Path | None = Field(None, description="PEM file of extra trust anchors for outbound TLS (SMTP, MTA-STS).")
    dns_timeout: float = Field(5.0, description="Seconds a DNS look-up may take.")
    smtp_port: int = Field(25, description="Port of recipients' MX servers.")
    smtp_helo_name: str | None = Field(None, description="Name sent in EHLO. Default: this machine's fully qualified name.")
    smtp_timeout: float = Field(60.0, description="Seconds to wait for an SMTP reply (RFC 5321 4.5.3.2 allows far more; 60 s is common).")
    smtp_pool_size: int = Field(4, description="Open SMTP connections kept per destination.")
    smtp_max_messages_per_connection: int = Field(100, description="Messages sent over one SMTP connection before it is renewed.")
    tls_probe_cache_seconds: int = Field(3600, description="How long a domain's MX, TLS and MTA-STS findings are reused.")
    delivery_retry_hours: float = Field(72, description="How long deferred deliveries (4xx, network errors) are retried before they fail.")
    smtp_relay: str | None = Field(
        None,
        description="Relay mode: send everything through this smarthost, `host[:port]` or `host@address:port` "
        "(port 587 by default). Verified TLS to the relay is always required. Empty: deliver directly to MX. An "
        "organization may set a relay of its own in its delivery settings, used for its mail instead.",
    )
    smtp_relay_username: str | None = Field(None, description="AUTH user name for the relay.")
    smtp_relay_password: SecretStr | None = Field(None, description="AUTH password for the relay.")
    smtp_relay_enforces_tls: bool = Field(
        False,
        description="Declare that the relay delivers onward only over verified TLS. Without it, messages that need "
        "verified TLS to the recipient go by PGP, S/MIME or the portal in relay mode.",
    )
    notice_sender_domain: str | None = Field(
        None,
        description="Domain of the From address (`no-reply@<domain>`) of CarePost's own notices (form confirmations, "
        "portal codes) for an organization that has no sending domain yet. Empty: the HELO name, which must then be a "
        "real domain name. `carepost run` sets `carepost.localhost` for the local mail capture.",
    )

    # Hosted forms (forms/service.py).
    form_min_fill_seconds: int = Field(3, description="Fewest seconds between showing a hosted form and accepting it (spam protection).")
    form_render_token_hours: int = Field(24, description="How long a rendered hosted form may stay open before it must be reloaded.")
    form_rate_limit_per_ip: int = Field(20, description="Hosted-form submissions accepted from one IP address per 10 minutes.")
    form_max_submission_bytes: int = Field(
        262144, description="Largest hosted-form submission accepted, in bytes (a drawn signature included)."
    )
    form_confirmation_hours: int = Field(
        72, description="Validity of the confirmation link a form submission sends to the address on file, in hours."
    )
    delivery_lease_seconds: int = Field(
        900, description="How long a worker holds the recipients it claimed before another worker may take them over."
    )
    delivery_batch_size: int = Field(500, description="Most messages one delivery task handles (larger sends are split into tasks).")
    delivery_concurrency: int = Field(64, description="SMTP transactions one worker process runs at the same time.")
    database_pool_size: int = Field(
        10, ge=1, description="PostgreSQL connections each process keeps open (SQLAlchemy pool_size). Every `serve` "
        "process and every `worker` may open this many plus CAREPOST_DATABASE_MAX_OVERFLOW (docs/deployment.md).",
    )
    database_max_overflow: int = Field(
        20, ge=0, description="PostgreSQL connections a process may open beyond the pool under load, closed when returned.",
    )
    domain_max_connections: int = Field(
        20, ge=0, description="Open SMTP connections to one receiving domain (or one relay), counted across every worker "
        "process (in Redis when a Redis URL is set; 0: no limit beyond CAREPOST_SMTP_POOL_SIZE per process).",
    )
    domain_rate_per_minute: int = Field(
        0, ge=0, description="Messages per minute to one receiving domain, counted across every worker process (a token "
        "bucket in Redis when a Redis URL is set). 0: no limit.",
    )
    worker_metrics_port: int | None = Field(
        None, description="Port on which `carepost worker` serves its Prometheus metrics (/metrics). Empty: not served "
        "(the worker's counters are then only in a shared PROMETHEUS_MULTIPROC_DIR, see docs/deployment.md).",
    )
    retention_purge_duty: float = Field(
        0.5, gt=0, le=1,
        description="Share of wall time a retention purge works: after each chunk it rests in proportion, "
        "so sending keeps its pace during the nightly purge (1 = no rest; issue 16).",
    )
    campaign_plan_chunk: int = Field(2000, description="Contacts a campaign's planning handles per transaction (one chunk of the audience).")
    campaign_send_batch: int = Field(200, description="Campaign recipients rendered and stored as messages per transaction.")
    campaign_send_slice_seconds: float = Field(
        10.0, ge=0, description="How long one campaign sending task keeps making batches of messages before it queues "
        "itself again behind the delivery tasks it queued, so a worker delivers while a large campaign is being made "
        "(0: one batch per task).",
    )
    journey_tick_chunk: int = Field(
        500, description="Journey runs the tick advances per transaction (one chunk of due runs; issue 15)."
    )
    campaign_stale_seconds: int = Field(
        120, description="A campaign planning or sending without progress for this long is queued again by the minute sweep (a killed worker)."
    )
    smtp_submission_host: str = Field("127.0.0.1", description="Address `carepost smtp` (submission for applications) binds to.")
    smtp_submission_port: int = Field(2587, description="Port of SMTP submission (STARTTLS required, AUTH with API credentials).")
    smtp_submission_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) for STARTTLS on SMTP submission. `carepost run` makes a self-signed one."
    )
    smtp_submission_key_file: Path | None = Field(None, description="PEM private key for the SMTP submission certificate.")
    smtp_submission_max_bytes: int = Field(25 * 1024 * 1024, description="Largest message accepted by SMTP submission, in bytes.")

    # Secure portal (portal/service.py).
    portal_expiry_days: int = Field(30, description="Days a secure portal message can be opened when the sender sets no expiry.")
    portal_code_minutes: int = Field(10, description="Minutes a one-time portal code stays valid.")
    portal_max_attempts: int = Field(5, description="Wrong portal codes or answers before the message is locked.")
    portal_lockout_minutes: int = Field(15, description="How long a portal message stays locked after too many wrong tries.")
    portal_session_minutes: int = Field(
        15, description="Inactivity in minutes before a recipient's portal session ends (absolute limit: four times that)."
    )

    # Bounces, complaints and the inbound return path (delivery/bounces.py, delivery/inbound.py).
    soft_bounce_threshold: int = Field(
        3, description="Soft bounces (on different messages) within the window after which an address is suppressed."
    )
    soft_bounce_window_days: int = Field(7, description="Days over which soft bounces are counted toward the threshold.")
    inbound_host: str = Field(
        "127.0.0.1", description="Address the inbound return-path SMTP server (`carepost inbound`) binds to; 0.0.0.0 on an MX."
    )
    inbound_port: int = Field(
        2526, description="Port of the inbound return-path SMTP server (forward port 25 of the return-path MX to it)."
    )
    inbound_max_bytes: int = Field(10 * 1024 * 1024, description="Largest bounce or complaint report accepted, in bytes.")
    inbound_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) for STARTTLS on the inbound server, valid for the return-path MX host. "
        "Empty: the SMTP submission certificate, else a self-signed one in the data dir.",
    )
    inbound_key_file: Path | None = Field(None, description="PEM private key for the inbound server's certificate.")
    inbound_report_retention_days: int = Field(
        30, description="Days received bounce and complaint reports (encrypted) are kept after they were processed."
    )

    # HL7 v2 over MLLP from clinical systems (ehr/mllp.py, docs/ehr.md).
    mllp_host: str = Field(
        "127.0.0.1", description="Address `carepost mllp` (HL7 v2 ADT/SIU over MLLP) binds to. Without TLS only a "
        "loopback address is allowed.",
    )
    mllp_port: int = Field(2575, description="Port of the MLLP listener.")
    mllp_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) for TLS on the MLLP listener; required to listen on a non-loopback address.",
    )
    mllp_key_file: Path | None = Field(None, description="PEM private key for the MLLP listener's certificate.")
    mllp_client_ca_file: Path | None = Field(
        None, description="PEM CA certificate(s) that issue the sending systems' client certificates. Set: the MLLP "
        "listener requires TLS client-certificate authentication (mutual TLS) and refuses a connection without a "
        "certificate issued by these CAs (the MSH-8 credential is still required). Needs the certificate and key.",
    )
    mllp_max_bytes: int = Field(1024 * 1024, description="Largest HL7 v2 message the MLLP listener accepts, in bytes.")
    mllp_idle_seconds: int = Field(300, ge=1, description="Seconds an MLLP connection may stay idle before it is closed.")
    ehr_fhir_allow_loopback_http: bool = Field(
        False, description="Allow an organization's FHIR server and SMART token endpoint (read back for id-only "
        "Subscription notifications) at an http:// loopback address, for a peer on the same machine (tests). Off: "
        "https only.",
    )

    # Outbound webhooks (tracking/webhooks.py).
    webhook_allow_private: bool = Field(
        False, description="Allow webhook endpoints on private, loopback, link-local and other non-public addresses."
    )
    webhook_allowed_hosts: str | None = Field(
        None, description="Webhook hosts allowed even when they resolve to non-public addresses: host names, IP "
        "addresses or networks (CIDR), comma-separated.",
    )
    webhook_timeout: float = Field(10.0, description="Seconds a webhook endpoint has to connect and answer.")
    webhook_log_retention_days: int = Field(
        30, description="Days finished webhook deliveries, their attempts and events are kept in the delivery log."
    )

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @property
    def resolved_master_key_file(self) -> Path:
        return self.master_key_file or (self.data_dir / "master.key")

    @property
    def is_production(self) -> bool:
        if self.production is not None:
            return self.production
        from urllib.parse import urlsplit

        parts = urlsplit(self.base_url)
        host = (parts.hostname or "").lower()
        local = host in ("localhost", "127.0.0.1", "::1") or host.endswith(".localhost") or host.startswith("127.")
        return parts.scheme == "https" and not local

    @property
    def master_key_external(self) -> bool:
        """The master key comes from the environment or a key command, not from a file CarePost manages."""
        return self.master_key is not None or bool(self.master_key_command)

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "carepost.db"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+sqlcipher:///{self.sqlite_path}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def effective_redis_url(self) -> str | None:
        if self.redis_url:
            return self.redis_url
        if self.queue_url and self.queue_url.startswith(("redis://", "rediss://")):
            return self.queue_url
        return None

    @property
    def resolved_capture_dir(self) -> Path:
        return self.capture_dir or (self.data_dir / "mail-capture")


@lru_cache
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget cached settings (tests change the environment between cases)."""
    get_settings.cache_clear()
