"""Domain events inside one process: how a lower capability lets higher ones react.

An organization is created (accounts) and consent writes its default authorization texts; a
recipient's status changes (delivery) and tracking queues the webhooks. The lower capability
:func:`publish`\\es a named event with ids in the caller's session; the handlers run at once, in
the same transaction, so what they write commits or rolls back with the work that caused it.

Handlers are registered by the composition root (:mod:`carepost.assembly`), never by import
side effects. Publishing before the root has assembled the process raises
:class:`~carepost.core.ports.NotAssembled`: an event nobody was wired to hear is a defect, not
a silent no-op. Event names are declared in :data:`EVENTS` so a typo fails at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from carepost.core.ports import NotAssembled

EVENTS: dict[str, str] = {
    "organization.created": "An organization was created (org_id). Consent writes its default texts.",
    "message.recipient_event": "A recipient's delivery event was recorded (recipient, event rows). Tracking emits webhooks.",
    "account.notice": "A person must be told something by email (kind, org_id, ids). Delivered over protected mail.",
    "consent.unsubscribed": "A contact or address opted out of a topic or of all marketing (org_id, ids and codes). Tracking emits webhooks.",
    "consent.subscribed": "A contact opted in to a topic or to marketing again (org_id, ids and codes). Tracking emits webhooks.",
    "authorization.signed": "A patient's authorization was recorded (org_id, ids and codes). Tracking emits webhooks.",
    "authorization.revoked": "A patient's authorization was revoked (org_id, ids and codes). Tracking emits webhooks.",
}

Handler = Callable[..., Any]

_handlers: dict[str, list[Handler]] = {}
_assembled = False
_lock = threading.Lock()


def declare(name: str, description: str) -> None:
    """Declare an event a capability publishes (names are ``<object>.<what happened>``)."""
    with _lock:
        EVENTS.setdefault(name, description)


def subscribe(name: str, handler: Handler) -> None:
    """The composition root wires a handler to an event (idempotent for the same handler)."""
    if name not in EVENTS:
        raise KeyError(f"unknown event {name!r}")
    with _lock:
        handlers = _handlers.setdefault(name, [])
        if handler not in handlers:
            handlers.append(handler)


def mark_assembled(value: bool = True) -> None:
    global _assembled
    _assembled = value


def reset() -> None:
    """Forget every handler (tests that prove the fail-closed path)."""
    with _lock:
        _handlers.clear()
    mark_assembled(False)


def handlers(name: str) -> list[Handler]:
    with _lock:
        return list(_handlers.get(name, ()))


def publish(name: str, *args, **kwargs) -> list[Any]:
    """Run every handler of ``name`` now, in order; their results in a list. Handlers receive the
    arguments as given (the caller's session first, then ids and rows — never PHI values)."""
    if name not in EVENTS:
        raise KeyError(f"unknown event {name!r}")
    if not _assembled:
        raise NotAssembled(f"event {name} published before carepost.assembly.assemble() wired its handlers")
    return [handler(*args, **kwargs) for handler in handlers(name)]
