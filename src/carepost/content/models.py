"""Message templates.

A template holds placeholders (``{{ first_name }}``), never PHI itself: the PHI arrives as render
data at send time and is decrypted in memory only. So subject, preheader, HTML and text are plain
columns of the (encrypted) database, not application-encrypted like message bodies
(ARCHITECTURE.md section 2). ``version`` grows by one on every change so a message can record
which version it was rendered from.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

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
    created_by: Mapped[str | None] = mapped_column(String(32))
