"""The ``transerve`` command line: build the demo zoo, look into checkpoints, run them offline."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from transerve import __version__
from transerve.cli.common import console, fail, require_export_stack
from transerve.cli.export_commands import engine_build_command, export_command, inspect_command
from transerve.cli.repo_commands import repo_app
from transerve.cli.serve_command import serve_command

app = typer.Typer(help="transerve: export PyTorch Transformers to ONNX/TensorRT and serve them over gRPC.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
zoo_app = typer.Typer(help="The demo models, trained here on CPU from data that ships in packages.",
                      no_args_is_help=True)
checkpoint_app = typer.Typer(help="Inspect and run PyTorch checkpoint directories offline.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(checkpoint_app, name="checkpoint")
app.add_typer(repo_app, name="repo")
engine_app = typer.Typer(help="TensorRT engines for repository entries (GPU machines).", no_args_is_help=True)
app.add_typer(engine_app, name="engine")
app.command("export")(export_command)
app.command("inspect")(inspect_command)
app.command("serve")(serve_command)
engine_app.command("build")(engine_build_command)





def version_callback(value: bool) -> None:
    if value:
        console.print(f"transerve {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@zoo_app.command("build")
def zoo_build(
    out: Annotated[Path, typer.Option(help="Directory for the checkpoints and zoo_report.json.")] = Path("zoo"),
    force: Annotated[bool, typer.Option("--force", help="Retrain even when a cached build matches.")] = False,
    only: Annotated[list[str] | None, typer.Option(
        help="Build only this model (repeatable): vit-digits, vit-digits-bn, mt-en-de-numbers.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for training.")] = 2,
    repo: Annotated[Path | None, typer.Option(
        help="Also export every model into this model repository (verified ONNX + int8 variant).")] = None,
) -> None:
    """Train vit-digits, vit-digits-bn and mt-en-de-numbers (about 3 minutes on 2 cores).

    A model whose recipe and code are unchanged since its last build is reused
    from OUT, so a second build is instant. Metrics go to OUT/zoo_report.json.
    With --repo the zoo is exported to REPO/NAME (skipped when already current).
    """
    require_export_stack("zoo build")
    import torch
    from transerve.models.zoo.build import build_zoo

    torch.set_num_threads(threads)
    try:
        summary = build_zoo(out, force=force, only=only, on_status=console.print)
        if repo is not None:
            _export_zoo(out, repo, force)
    except ValueError as e:
        raise fail(str(e)) from None
    table = Table("model", "held-out metrics", "train s", "cached", title=f"zoo → {out}")
    for name, rep in summary["models"].items():
        metrics = {k: rep[k] for k in ("test_accuracy", "exact_match", "bleu") if k in rep}
        text = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        table.add_row(name, text, str(rep.get("train_seconds", "")), "yes" if rep.get("cached") else "no")
    console.print(table)


def _export_zoo(out: Path, repo: Path, force: bool) -> None:
    from transerve.export.exporter import ExportError
    from transerve.export.zoo import export_zoo

    try:
        reports = export_zoo(out, repo, force=force, on_status=lambda m: console.print(f"[dim]…[/] {m}",
                                                                                         highlight=False))
    except ExportError as e:
        raise fail(str(e)) from None
    table = Table("entry", "BN left", "attention fused", "max |Δ|", "accuracy (onnx)", title=f"repository → {repo}")
    for name, rep in reports.items():
        bn = sum(c.get("BatchNormalization", 0) for c in rep["op_counts_after"].values())
        attention = rep["attention"]
        fused = (f"{attention['fused']}/{attention['expected']}" if "fused" in attention else
                 ", ".join(f"{g} {a['fused']}/{a['expected']}" for g, a in attention.items()))
        table.add_row(name, str(bn), fused, f"{rep['parity']['max_abs_diff']:.1e}",
                      f"{rep['accuracy'].get('onnx', float('nan')):.4f}")
    console.print(table)


@checkpoint_app.command("show")
def checkpoint_show(directory: Annotated[Path, typer.Argument(help="A checkpoint directory.")]) -> None:
    """Load a checkpoint and print its architecture, config and size."""
    require_export_stack("checkpoint show")
    from transerve.models.checkpoint import CheckpointError, load_checkpoint

    try:
        model, extra = load_checkpoint(directory)
    except CheckpointError as e:
        raise fail(str(e)) from None
    table = Table("field", "value", title=str(directory))
    table.add_row("architecture", type(model).__name__)
    table.add_row("parameters", f"{sum(p.numel() for p in model.parameters()):,}")
    for key, value in vars(model.config).items():
        table.add_row(key, str(value))
    if "report" in extra:
        table.add_row("zoo report", json.dumps(extra["report"].get("test_accuracy", extra["report"])))
    console.print(table)


@checkpoint_app.command("translate")
def checkpoint_translate(
    directory: Annotated[Path, typer.Argument(help="A translator checkpoint directory (with tokenizer.json).")],
    texts: Annotated[list[str], typer.Argument(help="Sentences to translate.")],
    beam_size: Annotated[int, typer.Option(min=1, max=16, help="1 = greedy.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=1024, help="Generation budget per text.")] = 64,
) -> None:
    """Translate with the PyTorch model directly (the offline reference the server is compared to)."""
    require_export_stack("checkpoint translate")
    from transerve.models.checkpoint import CheckpointError
    from transerve.models.translator import TextTranslator

    try:
        translator = TextTranslator.load(directory)
    except CheckpointError as e:
        raise fail(str(e)) from None
    for text in translator.translate(texts, max_new_tokens=max_new_tokens, beam_size=beam_size):
        console.print(text, highlight=False)


if __name__ == "__main__":
    app()
