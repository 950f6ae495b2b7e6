"""Ports: what a lower capability needs from a higher one, filled by the composition root.

ARCHITECTURE.md section 3: a capability never imports one above it. Where it must still reach
upward — accounts writes audit events, the delivery pipeline runs consent's eligibility check —
it declares a :class:`Port` in its own module and calls it; :func:`carepost.assembly.assemble`
fills every port with the function of the capability that owns the behaviour. A port that was
never filled raises :class:`NotAssembled` when called: a process that skipped the composition
root fails closed instead of running with a weaker default.

Ports are not replaced by assigning module attributes, and only the composition root (and tests
that prove the failure) fill or empty them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class NotAssembled(RuntimeError):
    """A required part of CarePost was not assembled (the process bypassed ``carepost.assembly``)."""


_REGISTRY: dict[str, Port] = {}
_lock = threading.Lock()


class Port(Generic[F]):
    """One named function slot. Declare it where it is called; the composition root fills it."""

    def __init__(self, name: str, doc: str):
        self.name = name
        self.__doc__ = doc
        self._impl: F | None = None
        with _lock:
            if name in _REGISTRY:
                raise RuntimeError(f"port {name} declared twice")
            _REGISTRY[name] = self

    @property
    def filled(self) -> bool:
        return self._impl is not None

    @property
    def impl(self) -> F:
        if self._impl is None:
            raise NotAssembled(f"{self.name} is not assembled: start CarePost through carepost.assembly.assemble()")
        return self._impl

    def fill(self, impl: F) -> None:
        if not callable(impl):
            raise TypeError(f"{self.name}: {impl!r} is not callable")
        self._impl = impl

    def empty(self) -> None:
        self._impl = None

    def __call__(self, *args, **kwargs):
        return self.impl(*args, **kwargs)

    def __repr__(self) -> str:
        target = getattr(self._impl, "__qualname__", None) if self._impl else "unfilled"
        return f"<Port {self.name}: {target}>"


def declared_ports() -> dict[str, Port]:
    with _lock:
        return dict(_REGISTRY)


def unfilled_ports() -> list[str]:
    return sorted(name for name, port in declared_ports().items() if not port.filled)
