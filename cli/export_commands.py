"""``transerve export`` and ``transerve inspect``: checkpoints → verified model-repository entries."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from transerve.cli.common import console, fail, require_export_stack


class Source(StrEnum):
    vit = "vit"
    transformer = "transformer"
    hf_marian = "hf-marian"
    hf_vit = "hf-vit"
    torchvision_vit = "torchvision-vit"
    timm_vit = "timm-vit"


class TargetName(StrEnum):
    onnxruntime = "onnxruntime"
    standard = "standard"
    tensorrt_legacy = "tensorrt-legacy"




def export_command(
    source: Annotated[Source, typer.Argument(help="What the directory holds: vit or transformer (transerve "
                                             "checkpoints), hf-marian, hf-vit, torchvision-vit, timm-vit.")],
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory, as its library saved it.")],
    repo: Annotated[Path, typer.Option(help="Model repository to write REPO/NAME into.")] = Path("repo"),
    name: Annotated[str | None, typer.Option(help="Entry name (default: the checkpoint folder's name).")] = None,
    target: Annotated[TargetName, typer.Option(help="Runtime the graph is shaped for: onnxruntime (CPU/GPU), "
                                               "standard (plain ONNX ops), tensorrt-legacy (TensorRT < 10.14).")]
    = TargetName.onnxruntime,
    int8: Annotated[bool, typer.Option("--int8", help="Also write an int8 variant (ORT dynamic quantization).")]
    = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write an fp16 variant (for GPUs).")] = False,
    version: Annotated[int, typer.Option(min=1, help="Version folder to write.")] = 1,
    torch_checkpoint: Annotated[bool, typer.Option("--torch-checkpoint", help="Also write the PyTorch checkpoint "
                                                   "that only `serve --backend torch` (the reference) reads.")]
    = False,
    image_recipe: Annotated[str | None, typer.Option(
        help="torchvision-vit: the weights' transform, which a state dict does not carry — a preset "
        "(IMAGENET1K_V1, IMAGENET1K_SWAG_E2E_V1, IMAGENET1K_SWAG_LINEAR_V1) or RESIZE:CROP:INTERPOLATION "
        "(e.g. 256:224:bilinear). Default: IMAGENET1K_V1's, scaled to the model's size.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        min=1, help="Translators: the generation budget (limit and default) in config.yaml. Default: the "
        "checkpoint's own (hf-marian: generation_config.json's max_new_tokens, or max_length − 1), else 64.")]
    = None,
    source_language: Annotated[str | None, typer.Option(
        help="Translators: the language it reads (ISO 639 or BCP-47), for routing by language. hf-marian: "
        "default from tokenizer_config.json's source_lang or the opus-mt-SRC-TGT folder name.")] = None,
    target_language: Annotated[str | None, typer.Option(
        help="Translators: the language it writes. hf-marian: default from tokenizer_config.json's target_lang, "
        "the folder name, or for a multilingual-target model its >>xx<< tokens.")] = None,
) -> None:
    """Export a checkpoint to ONNX, fold BatchNorm, fuse attention, verify parity, write REPO/NAME."""
    require_export_stack("export")
    from transerve.export.exporter import ExportError, ExportOptions, export_translator_entry, export_vit_entry
    from transerve.export.passes import PassError
    from transerve.models.checkpoint import CheckpointError

    opts = ExportOptions(repo=repo, name=name or checkpoint.resolve().name, version=version,
                         target=target.value, int8=int8, fp16=fp16, torch_checkpoint=torch_checkpoint,
                         source=f"{source.value}:{checkpoint}",
                         languages=_languages(source, checkpoint, source_language, target_language),
                         on_status=lambda message: console.print(f"[dim]…[/] {message}", highlight=False))
    try:
        if source in (Source.transformer, Source.hf_marian):
            translator = _load_translator(source, checkpoint)
            report = export_translator_entry(translator.model, translator.tokenizer, opts,
                                             max_new_tokens=max_new_tokens, decoding=translator.decoding)
        else:
            model, meta = _load_vit(source, checkpoint, image_recipe)
            report = export_vit_entry(model, opts, **meta)
    except (CheckpointError, PassError, ExportError) as e:
        raise fail(str(e)) from None
    print_report(report, repo / opts.name)


def _languages(source: Source, checkpoint: Path, source_language: str | None, target_language: str | None
               ) -> dict[str, Any] | None:
    """The entry's ``languages``: from the options, the checkpoint filling what they leave (hf-marian)."""
    from transerve.languages import LanguageCodeError, normalize

    for option, code in (("--source-language", source_language), ("--target-language", target_language)):
        if code is not None:
            try:
                normalize(code)
            except LanguageCodeError as e:
                raise fail(f"{option}: {e}") from None
    if source is Source.hf_marian:
        from transerve.models.importers.marian_languages import marian_languages

        return marian_languages(checkpoint, source_language, target_language)
    if (source_language is None) != (target_language is None):
        raise fail("--source-language and --target-language go together")
    return {"source": source_language, "target": target_language} if source_language else None


def _load_translator(source: Source, checkpoint: Path):  # type: ignore[no-untyped-def]
    from transerve.models.checkpoint import CheckpointError, read_checkpoint_config
    from transerve.models.translator import TextTranslator

    if source is Source.hf_marian:
        from transerve.models.importers.marian import import_hf_marian

        return import_hf_marian(checkpoint)
    arch = read_checkpoint_config(checkpoint)[0]
    if arch != "transformer":
        raise CheckpointError(f"{checkpoint}: holds a {arch}, not a transformer (unsupported architecture for "
                              "this source)")
    return TextTranslator.load(checkpoint)


def _load_vit(source: Source, checkpoint: Path, image_recipe: str | None) -> tuple[Any, dict[str, Any]]:
    from transerve.models.checkpoint import CheckpointError, load_checkpoint
    from transerve.models.importers.vit import VIT_IMPORTERS, import_torchvision_vit
    from transerve.models.vit import ViT

    if image_recipe is not None and source is not Source.torchvision_vit:
        raise CheckpointError(f"--image-recipe is for torchvision-vit ({source.value} checkpoints carry their own)")
    if source is Source.torchvision_vit:
        return import_torchvision_vit(checkpoint, _recipe(image_recipe))
    if source is not Source.vit:
        return VIT_IMPORTERS[source.value](checkpoint)
    loaded, extra = load_checkpoint(checkpoint)
    if not isinstance(loaded, ViT):
        raise CheckpointError(f"{checkpoint}: holds a {type(loaded).__name__}, not a vit (unsupported architecture "
                              "for this source)")
    return loaded, {"labels": _labels(extra, loaded.config.num_classes),
                    "preprocessing": _preprocessing(extra, loaded.config.image_size)}


def _recipe(text: str | None) -> tuple[int, int, str] | None:
    """``--image-recipe``: a preset name, or RESIZE:CROP:INTERPOLATION."""
    from transerve.image_recipes import TORCHVISION_PRESETS
    from transerve.models.checkpoint import CheckpointError

    if text is None:
        return None
    if text in TORCHVISION_PRESETS:
        return TORCHVISION_PRESETS[text]
    parts = text.split(":")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        raise CheckpointError(f"--image-recipe {text!r}: a preset ({', '.join(TORCHVISION_PRESETS)}) or "
                              "RESIZE:CROP:INTERPOLATION such as 256:224:bilinear")
    return int(parts[0]), int(parts[1]), parts[2]


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


def print_preprocessing(entry: Path, source: str = "") -> None:
    """A classifier's image preprocessing as config.yaml holds it, which is what the server applies."""
    import yaml

    config_file = entry / "config.yaml"
    prep = (yaml.safe_load(config_file.read_text()) or {}).get("preprocessing") if config_file.is_file() else None
    if prep:
        console.print(f"preprocessing (config.yaml; what the server applies{'; from ' + source if source else ''}): "
                      + ", ".join(f"{k} {v}" for k, v in prep.items()), highlight=False)


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
        summary = {k: v for k, v in info.items() if k in ("runtime", "max_abs_diff_vs_fp32", "accuracy",
                                                          "token_agreement_vs_pytorch", "runs_on_cpu", "error",
                                                          "speed_vs_fp32")}
        checks.add_row(f"variant {variant}", str(summary))
    console.print(checks)
    if "generation" in report:
        console.print("decoding defaults (config.yaml; a request overrides beam, budget, length penalty): "
                      + ", ".join(f"{k} {v}" for k, v in report["generation"].items()), highlight=False)
    console.print(gate_table(report))
    print_preprocessing(entry, report.get("preprocessing_from", ""))


def gate_table(report: dict[str, Any]) -> Table:
    """Each variant's accuracy gate against fp32 (what `precision: auto` requires before serving it)."""
    gates = Table("variant", "runtime", "logit MAE", "bound", "accuracy (fp32)", "token agreement", "speed × fp32",
                  "gate", title="accuracy gate vs fp32 (export/accuracy_gate.py)")
    notes = []
    for name, info in report.get("variants", {}).items():
        gate, variant = info.get("gate"), f"{name} ({info['form']})" if "form" in info else name
        if "forms" in info:
            notes.append(f"{name} forms measured here: " + ", ".join(
                f"{form} {m['speed_vs_fp32'] or 0:.2f}× {'passed' if m['passed'] else 'failed'}"
                for form, m in info["forms"].items()) + f"; kept {info['form']}")
        if gate is None:
            gates.add_row(variant, info.get("runtime", "onnxruntime"), "", "", "", "", "",
                          "not measured" + (f": {info['error']}" if "error" in info else ""))
            continue
        accuracy = f"{gate['accuracy']:.4f} ({gate['accuracy_fp32']:.4f})" if "accuracy" in gate else ""
        agreement = f"{gate['token_agreement']:.3f}" if "token_agreement" in gate else ""
        gates.add_row(variant, info["runtime"], f"{gate['logit_mae']:.4g}", f"{gate['logit_mae_bound']:.4g}", accuracy,
                      agreement, f"{info.get('speed_vs_fp32', 0):.2f}",
                      "passed" if gate["passed"] else f"failed: {gate['why']}")
    if "bf16_skipped" in report:
        notes.append(f"bf16 not measured: {report['bf16_skipped']}")
    gates.caption = "\n".join(notes) or None
    return gates


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
    require_export_stack("engine build", ("onnx",))
    from transerve.export.tensorrt_engine import EngineBuildError, EngineRequest, build_engines

    request = EngineRequest(entry, precision.value, workspace_gb, timing_cache, force,  # type: ignore[arg-type]
                            on_status=lambda m: console.print(f"[dim]…[/] {m}", highlight=False))
    try:
        results = build_engines(request)
    except (EngineBuildError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    for graph, info in results.items():
        console.print(f"{graph}: {info['plan']} ({'cached' if info['cached'] else 'built'}, key {info['key']})")
