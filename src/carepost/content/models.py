"""Message templates and their immutable versions.

A template holds placeholders (``{{ first_name }}``), never PHI itself: the PHI arrives as render
data at send time and is decrypted in memory only. So subject, preheader, HTML and text are plain
columns of the (encrypted) database, not application-encrypted like message bodies
(ARCHITECTURE.md section 2).

Every change writes a new :class:`MessageTemplateVersion` row, never an update: a campaign, a
journey step or a message records the version id it was rendered from, and that version stays
exactly as it was approved. The template row is the name, plus a copy of its current version's
default-language parts (``current_version_id`` says which) so older callers read it directly.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped, Timestamps
from carepost.core.ids import new_id


class MessageTemplate(OrgScoped, Timestamps, Base):
    __tablename__ = "message_templates"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_message_templates_org_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    subject: Mapped[str] = mapped_column(Text, default="")
    preheader: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str] = mapped_column(Text, default="")
    text: Mapped[str] = mapped_column(Text, default="")
    contains_phi: Mapped[bool] = mapped_column(Boolean, default=True)
    purpose: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    current_version_id: Mapped[str | None] = mapped_column(String(32))
    created_by: Mapped[str | None] = mapped_column(String(32))


class MessageTemplateVersion(OrgScoped, Base):
    """One immutable version of a template: written once, never updated."""

    __tablename__ = "message_template_versions"
    __table_args__ = (UniqueConstraint("template_id", "version", name="uq_message_template_versions_version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    template_id: Mapped[str] = mapped_column(String(32), ForeignKey("message_templates.id", ondelete="CASCADE"),
                                             index=True)
    version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    source_format: Mapped[str] = mapped_column(String(8), default="html")  # html | mjml
    mjml: Mapped[str] = mapped_column(Text, default="")  # the MJML source when source_format is mjml
    subject: Mapped[str] = mapped_column(Text, default="")
    preheader: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str] = mapped_column(Text, default="")  # the compiled HTML when authored in MJML
    text: Mapped[str] = mapped_column(Text, default="")
    from_name: Mapped[str] = mapped_column(String(200), default="")
    portal_notice: Mapped[str] = mapped_column(Text, default="")
    language: Mapped[str] = mapped_column(String(35), default="en")  # the default language (BCP 47)
    # Other languages: {"es": {"subject": ..., "preheader": ..., "html": ..., "text": ..., "mjml": ...}}
    variants: Mapped[dict] = mapped_column(JSON, default=dict)
    contains_phi: Mapped[bool] = mapped_column(Boolean, default=True)
    purpose: Mapped[str | None] = mapped_column(String(64))
    data_uses: Mapped[list] = mapped_column(JSON, default=list)  # declared merge helpers
    lint: Mapped[list] = mapped_column(JSON, default=list)  # spam/size warnings at save time
    created_by: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
