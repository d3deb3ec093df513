"""``transerve repo``: bring your own ONNX model into a repository (``task: tensor`` entries)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from transerve.cli.common import console, fail

repo_app = typer.Typer(help="Model repository entries for ONNX models made elsewhere.", no_args_is_help=True)
DEFAULT_MAX_BATCH = 64


def tensor_config(name: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                  max_batch_size: int) -> dict[str, Any]:
    """config.yaml of a ``task: tensor`` entry: the graph's tensors, batching over the first axis when allowed."""
    from transerve.export.repository import batching_defaults

    return {"name": name, "task": "tensor", "backend": "onnxruntime", "max_batch_size": max_batch_size,
            "batching": batching_defaults(max_batch_size), "inputs": inputs, "outputs": outputs,
            "files": {"model": "model.onnx"}}


@repo_app.command("add")
def add_command(
    model: Annotated[Path, typer.Argument(help="A single-file ONNX model (weights inside the file).")],
    repo: Annotated[Path, typer.Option(help="Model repository to write REPO/NAME into.")] = Path("repo"),
    name: Annotated[str | None, typer.Option(help="Entry name (default: the file's name without .onnx).")] = None,
    max_batch_size: Annotated[int | None, typer.Option(
        min=1, max=4096, help=f"Largest batch the server forms over the first axis (default {DEFAULT_MAX_BATCH} "
        "when every input and output has a dynamic first dimension; graphs with a fixed one run unbatched)."
    )] = None,
    version: Annotated[int, typer.Option(min=1, help="Version folder to write.")] = 1,
) -> None:
    """Serve any ONNX model through KServe ModelInfer (gRPC and REST): inputs, outputs and their shapes are
    read from the graph, requests are validated against them, and batched when the first axis is dynamic."""
    from transerve.export.repository import write_entry
    from transerve.server.engine.entry_names import check_entry_name
    from transerve.server.engine.tensor_model import batches_on_first_axis, describe_graph

    if not model.is_file():
        raise fail(f"{model}: no such file")
    entry_name = name or model.name.removesuffix(".onnx")
    try:
        check_entry_name(entry_name)
        inputs, outputs = describe_graph(model)
    except ValueError as e:
        raise fail(str(e)) from None
    batchable = batches_on_first_axis(inputs, outputs)
    if max_batch_size and max_batch_size > 1 and not batchable:
        raise fail(f"--max-batch-size {max_batch_size}: the graph's first dimension is fixed on some input or "
                   "output, so requests cannot be batched (leave the option out: it serves unbatched)")
    size = (max_batch_size or DEFAULT_MAX_BATCH) if batchable else 1
    vdir = write_entry(repo, entry_name, version, tensor_config(entry_name, inputs, outputs, size), {})
    shutil.copyfile(model, vdir / "model.onnx")
    console.print(f"{repo / entry_name}: task tensor, max_batch_size {size}; inputs "
                  + ", ".join(f"{t['name']} {t['datatype']} {t['dims']}" for t in inputs) + "; outputs "
                  + ", ".join(f"{t['name']} {t['datatype']} {t['dims']}" for t in outputs), highlight=False)
