"""Tables of the secure portal.

A portal message is a copy of one recipient's message kept for pickup: subject, bodies,
attachments and the recipient's address are encrypted under the organization's data key, bound
to organization, table, column and row (ARCHITECTURE.md section 2). Secrets are stored hashed:
the link token and the session cookie as SHA-256 (both are 256-bit random values), the one-time
code and the answer to the sender's question with Argon2id (they are short, guessable by brute
force offline, so a slow hash — and online, the lockout below).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped
from carepost.core.ids import new_id

AUTH_METHODS = ("code", "question")


class PortalMessage(OrgScoped, Base):
    """One recipient's secure copy of a message, opened with a link and a second factor."""

    __tablename__ = "portal_messages"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(String(32), ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    recipient_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("message_recipients.id", ondelete="SET NULL"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the link token
    address_enc: Mapped[bytes] = mapped_column(LargeBinary)
    address_index: Mapped[str] = mapped_column(String(64), index=True)
    subject_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # wiped on recall and expiry
    html_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    text_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    sender_id: Mapped[str | None] = mapped_column(String(32))  # user or API credential id
    auth: Mapped[str] = mapped_column(String(8), default="code")  # code | question
    question_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    answer_hash: Mapped[str | None] = mapped_column(String(200))
    # Knowledge check the organization already holds: Argon2id of the recipient contact's date of
    # birth (ISO), kept with auth "code" so the second factor never has to travel by email over
    # a path without verified TLS (the path the link took).
    birth_date_hash: Mapped[str | None] = mapped_column(String(200))
    # The last code email could not be sent over verified TLS, so it was not sent at all.
    code_tls_unavailable: Mapped[bool] = mapped_column(Boolean, default=False)
    code_hash: Mapped[str | None] = mapped_column(String(200))
    code_expires_at: Mapped[datetime | None]
    code_requested_at: Mapped[datetime | None]  # a code email is owed (the task clears it once sent)
    codes_sent: Mapped[int] = mapped_column(Integer, default=0)
    last_code_sent_at: Mapped[datetime | None]
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None]
    lockouts: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime | None]
    recalled_at: Mapped[datetime | None]
    recalled_by: Mapped[str | None] = mapped_column(String(32))
    wiped_at: Mapped[datetime | None]  # content removed after recall or expiry
    first_viewed_at: Mapped[datetime | None]
    view_count: Mapped[int] = mapped_column(Integer, default=0)
    notified_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


class PortalAttachment(OrgScoped, Base):
    __tablename__ = "portal_attachments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    portal_message_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("portal_messages.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer, default=0)
    filename_enc: Mapped[bytes] = mapped_column(LargeBinary)
    content_type: Mapped[str] = mapped_column(String(255))
    content_enc: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    inline_cid: Mapped[str | None] = mapped_column(String(200))  # an image the HTML shows as cid:...


REPLY_AUTHORS = ("recipient", "staff")


class PortalReply(OrgScoped, Base):
    """One message of a portal message's thread after the first: the recipient's secure reply
    (the sender's organization reads it in the UI or the API), or a staff member's answer
    (issue 10 item 13; the recipient reads it in the portal, notified by an email without PHI).
    The text is encrypted like the message's."""

    __tablename__ = "portal_replies"
    __table_args__ = (Index("ix_portal_replies_message_created", "portal_message_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    portal_message_id: Mapped[str] = mapped_column(String(32), ForeignKey("portal_messages.id", ondelete="CASCADE"))
    text_enc: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    # recipient: the patient wrote it in the portal; staff: a person of the organization (author_id).
    author: Mapped[str] = mapped_column(String(16), default="recipient", server_default="recipient")
    author_id: Mapped[str | None] = mapped_column(String(32))
    # Recipient replies: when staff first read it. Staff answers: when the recipient first saw it.
    read_at: Mapped[datetime | None]
    read_by: Mapped[str | None] = mapped_column(String(32))
    notified_at: Mapped[datetime | None]  # staff answers: when the recipient's notification email left


class PortalSession(OrgScoped, Base):
    """A recipient's short sign-in to one portal message (separate from staff web sessions)."""

    __tablename__ = "portal_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the cookie token
    portal_message_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("portal_messages.id", ondelete="CASCADE"), index=True
    )
    csrf_secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    last_seen_at: Mapped[datetime] = mapped_column(default=clock.now)
    expires_at: Mapped[datetime]
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
