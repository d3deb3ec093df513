"""``transerve export`` and ``transerve inspect``: checkpoints → verified model-repository entries."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


class Source(StrEnum):
    vit = "vit"
    transformer = "transformer"


class TargetName(StrEnum):
    onnxruntime = "onnxruntime"
    standard = "standard"
    tensorrt_legacy = "tensorrt-legacy"


def fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def export_command(
    source: Annotated[Source, typer.Argument(help="What the checkpoint holds: vit or transformer.")],
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (config.json + model.safetensors).")],
    repo: Annotated[Path, typer.Option(help="Model repository to write REPO/NAME into.")] = Path("repo"),
    name: Annotated[str | None, typer.Option(help="Entry name (default: the checkpoint folder's name).")] = None,
    target: Annotated[TargetName, typer.Option(help="Runtime the graph is shaped for: onnxruntime (CPU/GPU), "
                                               "standard (plain ONNX ops), tensorrt-legacy (TensorRT < 10.14).")]
    = TargetName.onnxruntime,
    int8: Annotated[bool, typer.Option("--int8", help="Also write an int8 variant (ORT dynamic quantization).")]
    = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write an fp16 variant (for GPUs).")] = False,
    version: Annotated[int, typer.Option(min=1, help="Version folder to write.")] = 1,
) -> None:
    """Export a checkpoint to ONNX, fold BatchNorm, fuse attention, verify parity, write REPO/NAME."""
    from transerve.export.exporter import ExportError, ExportOptions, export_translator_entry, export_vit_entry
    from transerve.export.passes import PassError
    from transerve.models.checkpoint import CheckpointError, load_checkpoint
    from transerve.models.translator import TextTranslator

    opts = ExportOptions(repo=repo, name=name or checkpoint.resolve().name, version=version,
                         target=target.value, int8=int8, fp16=fp16, source=f"{source.value}:{checkpoint}",
                         on_status=lambda message: console.print(f"[dim]…[/] {message}", highlight=False))
    try:
        model, extra = load_checkpoint(checkpoint)
        expected = {"vit": "ViT", "transformer": "Seq2SeqTransformer"}[source.value]
        if type(model).__name__ != expected:
            raise CheckpointError(f"{checkpoint}: holds a {type(model).__name__}, not a {source.value} "
                                  f"(unsupported architecture for this source)")
        if source is Source.vit:
            report = export_vit_entry(model, opts, labels=_labels(extra, model.config.num_classes),  # type: ignore[arg-type]
                                      preprocessing=_preprocessing(extra, model.config.image_size))  # type: ignore[union-attr]
        else:
            translator = TextTranslator.load(checkpoint)
            report = export_translator_entry(translator.model, translator.tokenizer, opts)
    except (CheckpointError, PassError, ExportError) as e:
        raise fail(str(e)) from None
    print_report(report, repo / opts.name)


def _labels(extra: dict[str, Any], num_classes: int) -> list[str]:
    labels = extra.get("report", {}).get("labels") or extra.get("labels")
    return list(labels) if labels else [str(i) for i in range(num_classes)]


def _preprocessing(extra: dict[str, Any], image_size: int) -> dict[str, Any]:
    prep = extra.get("report", {}).get("preprocessing") or extra.get("preprocessing")
    return dict(prep) if prep else {"size": image_size, "mean": [0.5] * 3, "std": [0.5] * 3, "resample": "bilinear"}


def inspect_command(entry: Annotated[Path, typer.Argument(help="A repository entry, e.g. repo/vit-digits.")]) -> None:
    """Print an entry's export report: passes, op counts before/after, parity, accuracy, variants."""
    import onnx

    from transerve.export.repository import latest_version, read_report

    try:
        report = read_report(entry)
        for path in sorted(latest_version(entry).glob("*.onnx")):
            try:
                onnx.checker.check_model(str(path))
            except Exception as e:
                raise ValueError(f"{path}: corrupt ONNX ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e)) from None
    print_report(report, entry)


def print_report(report: dict[str, Any], entry: Path) -> None:
    passes = Table("graph", "pass", "nodes changed", "details", title=f"{entry} — passes (target {report['target']})")
    for p in report["passes"]:
        details = ", ".join(f"{k} {v}" for k, v in p["changed"].items()) + "".join(f"\n⚠ {w}" for w in p["warnings"])
        passes.add_row(p["graph"], p["name"], str(p["nodes_changed"]), details)
    console.print(passes)
    ops = Table("graph", "op", "before", "after", title="op counts")
    for graph, after in report["op_counts_after"].items():
        before = report["op_counts_before"][graph]
        for op in sorted(set(before) | set(after)):
            if before.get(op, 0) != after.get(op, 0) or op in ("Attention", "BatchNormalization"):
                ops.add_row(graph, op, str(before.get(op, 0)), str(after.get(op, 0)))
    console.print(ops)
    checks = Table("check", "value", title="verification")
    for key, value in {**report["parity"], **{f"accuracy.{k}": v for k, v in report["accuracy"].items()}}.items():
        checks.add_row(key, f"{value:.3g}" if isinstance(value, float) else str(value))
    for variant, info in report.get("variants", {}).items():
        summary = {k: v for k, v in info.items() if k in ("max_abs_diff_vs_fp32", "accuracy",
                                                          "token_agreement_vs_pytorch", "runs_on_cpu", "error")}
        checks.add_row(f"variant {variant}", str(summary))
    console.print(checks)


class PrecisionName(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def engine_build_command(
    entry: Annotated[Path, typer.Argument(help="A repository entry, e.g. repo/vit-digits.")],
    precision: Annotated[PrecisionName, typer.Option(help="Engine precision (TensorRT ≥ 11 takes it from the "
                                                     "ONNX variant of that name).")] = PrecisionName.fp16,
    workspace_gb: Annotated[float, typer.Option(min=0.25, help="Builder workspace limit in GiB.")] = 4.0,
    timing_cache: Annotated[Path | None, typer.Option(help="Timing cache file, read and updated.")]
    = Path(".cache/tensorrt-timing.cache"),
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when a cached engine matches.")] = False,
) -> None:
    """Build TensorRT engines (REPO/NAME/<version>/<graph>.plan) for an entry; needs TensorRT 10+ and a GPU.

    Profiles (min/opt/max batch, source and cache length) come from the entry's
    config.yaml; an engine whose (ONNX, TensorRT version, GPU, flags) hash is
    unchanged is reused.
    """
    from transerve.export.tensorrt_engine import EngineBuildError, EngineRequest, build_engines

    request = EngineRequest(entry, precision.value, workspace_gb, timing_cache, force,  # type: ignore[arg-type]
                            on_status=lambda m: console.print(f"[dim]…[/] {m}", highlight=False))
    try:
        results = build_engines(request)
    except (EngineBuildError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    for graph, info in results.items():
        console.print(f"{graph}: {info['plan']} ({'cached' if info['cached'] else 'built'}, key {info['key']})")
