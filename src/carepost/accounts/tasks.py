"""Queue tasks of the accounts capability.

``purge_expired_credentials`` runs every 15 minutes on the worker: dead web sessions, nonces of
signed requests past their replay window, one-time links that were used or expired, and expired
or revoked OAuth access tokens are deleted, so stale secrets (even hashed) do not pile up.
The task takes no arguments, is idempotent and safe to run twice or concurrently.
"""

from __future__ import annotations

from datetime import timedelta

from huey import crontab
from sqlalchemy import delete, or_
from sqlalchemy.orm import Session

from carepost.accounts.models import OAuthToken, OneTimeLink, RequestNonce, WebSession
from carepost.core import clock
from carepost.core.config import get_settings
from carepost.core.database import system_session
from carepost.core.logging import get_logger
from carepost.core.queue import huey

log = get_logger("carepost.accounts.tasks")

# Keep a little slack past the idle timeout, so a session refreshed at the edge is never removed
# while its request is still being served.
IDLE_GRACE = timedelta(minutes=5)
# Revoked or expired OAuth tokens and used links are kept a day, for support questions.
KEEP_SPENT = timedelta(days=1)


def purge_expired(session: Session) -> dict[str, int]:
    """Delete what can no longer be used. The caller commits."""
    now = clock.now()
    settings = get_settings()
    idle_cutoff = now - timedelta(seconds=settings.session_idle_timeout) - IDLE_GRACE
    spent_cutoff = now - KEEP_SPENT
    counts = {}
    counts["web_sessions"] = session.execute(
        delete(WebSession).where(
            or_(WebSession.expires_at < now, WebSession.revoked_at.is_not(None), WebSession.last_seen_at < idle_cutoff)
        )
    ).rowcount
    counts["request_nonces"] = session.execute(delete(RequestNonce).where(RequestNonce.expires_at < now)).rowcount
    counts["one_time_links"] = session.execute(
        delete(OneTimeLink).where(
            or_(OneTimeLink.expires_at < now, OneTimeLink.used_at < spent_cutoff)
        )
    ).rowcount
    counts["oauth_tokens"] = session.execute(
        delete(OAuthToken).where(or_(OAuthToken.expires_at < spent_cutoff, OAuthToken.revoked_at < spent_cutoff))
    ).rowcount
    return counts


@huey.periodic_task(crontab(minute="*/15"))
def purge_expired_credentials() -> None:
    with system_session() as session:
        counts = purge_expired(session)
        session.commit()
    log.info("purged_expired_credentials", **{f"{k}_count": v for k, v in counts.items()})
