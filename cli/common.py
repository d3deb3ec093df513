"""What every CLI module shares: the consoles and the one-line error exit."""

from __future__ import annotations

import importlib.util
from typing import Final

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    """One readable error line on stderr and exit status 2 — never a traceback for bad input."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


# What `pip install 'transerve[export]'` adds: the training and export stack that serving never needs.
EXPORT_STACK: Final = ("torch", "onnx", "onnxscript", "safetensors", "sklearn", "num2words", "sacrebleu")


def require_export_stack(command: str, modules: tuple[str, ...] = EXPORT_STACK) -> None:
    """Fail with one line naming the extra when a command needs (part of) the export stack and it is absent."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise fail(f"`transerve {command}` needs the export stack ({', '.join(missing)} not installed): "
                   "pip install 'transerve[export]'")
