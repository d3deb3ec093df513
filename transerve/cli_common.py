"""What every CLI module shares: the consoles and the one-line error exit."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    """One readable error line on stderr and exit status 2 — never a traceback for bad input."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)
