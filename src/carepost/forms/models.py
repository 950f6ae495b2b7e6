"""Hosted secure forms, their submissions and the de-identified tallies of survey answers.

* :class:`Form` holds the definition (fields as JSON: structure, labels, options — no PHI) and
  its public key: the hosted form lives at ``/f/<public_id>``, an opaque random id, or at
  ``/f/<slug>`` when staff give it one (slugs are unique across organizations because the public
  URL names no organization).
* :class:`FormSubmission` holds every answer, the metadata of the submission (IP address, user
  agent) and the drawn signature, each encrypted by the application (AES-GCM bound to the
  organization, table, column and row, ARCHITECTURE.md section 2). Plain columns hold only
  references and states: form, contact, status, times.
* :class:`SurveyTally` rows are written for survey-mode forms only, one per chosen option or
  rating, *without* a reference to the submission: results are computed in SQL (counts per
  option, averages of ratings) and the tallies cannot be joined back to a person.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from carepost.core import clock
from carepost.core.database import Base, OrgScoped, Timestamps
from carepost.core.ids import new_id

FORM_KINDS = ("form", "survey")
FORM_STATUSES = ("draft", "published", "unpublished")

# A submission's life: ``received`` (stored, nothing else to do), ``pending_confirmation`` (waits
# for the person to confirm through the link sent to the address on file), ``confirmed``
# (effects applied), ``expired`` (the link ran out; nothing was applied).
SUBMISSION_STATUSES = ("received", "pending_confirmation", "confirmed", "expired")


class Form(OrgScoped, Timestamps, Base):
    __tablename__ = "forms"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    public_id: Mapped[str] = mapped_column(String(40), unique=True)
    slug: Mapped[str | None] = mapped_column(String(80), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    kind: Mapped[str] = mapped_column(String(12), default="form")
    status: Mapped[str] = mapped_column(String(16), default="draft")
    language: Mapped[str] = mapped_column(String(8), default="en")
    fields: Mapped[list] = mapped_column(JSON, default=list)
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    version: Mapped[int] = mapped_column(Integer, default=1)
    published_at: Mapped[datetime | None]
    created_by: Mapped[str | None] = mapped_column(String(32))


class FormSubmission(OrgScoped, Base):
    __tablename__ = "form_submissions"
    __table_args__ = (
        Index("ix_form_submissions_form_created", "form_id", "created_at"),
        Index("ix_form_submissions_status_expiry", "status", "confirm_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    form_id: Mapped[str] = mapped_column(String(32), ForeignKey("forms.id", ondelete="CASCADE"), index=True)
    form_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(24))
    # answers and metadata (ip, user agent), one JSON document, encrypted
    data_enc: Mapped[bytes] = mapped_column(LargeBinary)
    signature_png_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    contact_id: Mapped[str | None] = mapped_column(String(32), index=True)
    contact_created: Mapped[bool] = mapped_column(Boolean, default=False)
    # what confirmation will apply: a list of effect names, no values (values are in data_enc)
    effects: Mapped[list] = mapped_column(JSON, default=list)
    outcome: Mapped[dict] = mapped_column(JSON, default=dict)  # ids of what was recorded
    confirm_expires_at: Mapped[datetime | None]
    confirmation_sent_at: Mapped[datetime | None]
    staff_notified_at: Mapped[datetime | None]
    confirmed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


class SurveyTally(OrgScoped, Base):
    """One chosen option or one rating of a survey answer, unlinked from its submission."""

    __tablename__ = "form_survey_tallies"
    __table_args__ = (Index("ix_form_survey_tallies_form_field", "form_id", "field_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    form_id: Mapped[str] = mapped_column(String(32), ForeignKey("forms.id", ondelete="CASCADE"))
    field_key: Mapped[str] = mapped_column(String(40))
    option: Mapped[str | None] = mapped_column(String(200))
    number: Mapped[float | None] = mapped_column(Float)
    # the day only: a tally carries no time precise enough to line up with a visit
    day: Mapped[date] = mapped_column(default=lambda: clock.now().date())
