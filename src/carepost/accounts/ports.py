"""What accounts needs from capabilities above it, filled by the composition root.

Accounts sits below audit (audit's routes need accounts' permissions), yet every sign-in,
key and membership change must be audited in the same transaction. Accounts therefore calls
these ports; :mod:`carepost.assembly` fills them with ``audit.service.record`` and
``record_for``. Unfilled, they raise ``NotAssembled``: nothing in accounts runs unaudited.
"""

from __future__ import annotations

from carepost.core.ports import Port

record = Port("accounts.audit_record", "audit.service.record(session, **event): append one audit event.")
record_for = Port("accounts.audit_record_for",
                  "audit.service.record_for(session, principal, request, action, **kwargs): an event for a caller.")
# The training gate (issue 16 item 10): whether a caller holding phi:read_unmasked has acknowledged
# the organization's current policies and training; filled with compliance.training.phi_gate.
phi_gate = Port("accounts.phi_gate",
                "compliance.training.phi_gate(session, principal) -> None, or why this caller may not open PHI now; "
                "session None: from memory only, LookupError when the database must be asked.")
