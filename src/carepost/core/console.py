"""The command line's two consoles and its one way to stop with an error, shared by ``cli.py`` and
every capability's ``commands.py``. Messages name the option or field at fault and never carry
PHI (they go to a terminal that may be logged)."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on standard error and exit with ``code`` (1: refused, 2: bad usage)."""
    err.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)
