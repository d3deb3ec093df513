"""Export benchmark: our fused export against PyTorch eager and three ONNX Runtime pipelines.

Usage: ``python bench/export_bench.py [--quick] [--repeats 7]``

Models (random weights, nothing downloaded): ViT-Tiny (192 wide, 12 deep,
3 heads) and ViT-B/16 (768, 12, 12), 224×224, plus the zoo entries from
``repo/`` when present. Every pipeline runs under the same thread counts
(torch 2 threads; ORT intra-op 2, inter-op 1); each figure is the median over
``--repeats`` timed runs after warm-up. Ratios are against anchors measured in
the same run. Tables go to stdout and to ``bench/RESULTS.md``.

Pipelines:
* ``eager`` — PyTorch, ``torch.inference_mode``.
* ``ort-plain`` — the exporter's plain graph at opset 18 (attention as MatMul→Softmax→MatMul), ORT defaults.
* ``ort-transformers`` — that graph after ``onnxruntime.transformers.optimizer`` (model_type vit).
* ``ort-onnxscript`` — that graph after ``onnxscript.rewriter.ort_fusions.optimize_for_ort``.
* ``transerve`` — our export (opset 23, BN folded, attention fused, cleaned).
* ``ort-plain-int8`` / ``transerve-int8`` — ORT dynamic int8 (per-channel) of each.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from transerve.export import graphs, precision
from transerve.export.passes import optimize
from transerve.export.variants import run_times
from transerve.models.vit import ViT, ViTConfig
from transerve.server.backends.cpu import cores, cpu_info, simd_summary
from transerve.server.backends.sessions import make_session

RESULTS = Path(__file__).with_name("RESULTS.md")
THREADS = 2


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    return statistics.median(run_times(fn, repeats, warmup)) * 1e3


def export_plain(model: ViT, opset: int) -> onnx.ModelProto:
    """The exporter's own graph of ``forward`` (its onnxscript clean-up included), nothing of ours."""
    return graphs.export_vit(model, opset, class_token_only=False)


def ort_transformers(plain: onnx.ModelProto, cfg: ViTConfig) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory() as tmp:  # it mishandles in-memory protos of this size; give it a file
        path = Path(tmp) / "plain.onnx"
        onnx.save_model(plain, str(path))
        return optimize_model(str(path), model_type="vit", num_heads=cfg.num_heads, hidden_size=cfg.dim).model


def ort_onnxscript(plain: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, _ = optimize_for_ort(ir.serde.deserialize_model(copy.deepcopy(plain)))
    return ir.serde.serialize_model(model)


def ours(model: ViT) -> onnx.ModelProto:
    proto = graphs.export_vit(model)
    optimize(proto, "onnxruntime", model.config.depth)
    return proto


def pipelines(model: ViT) -> dict[str, Callable[[np.ndarray], object]]:
    plain = export_plain(model, 18)
    fused = ours(model)
    protos = {"ort-plain": plain, "ort-transformers": ort_transformers(plain, model.config),
              "ort-onnxscript": ort_onnxscript(plain), "transerve": fused,
              "ort-plain-int8": precision.quantize_int8(plain), "transerve-int8": precision.quantize_int8(fused)}
    runners: dict[str, Callable[[np.ndarray], object]] = {}

    def eager(x: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    runners["eager"] = eager
    for name, proto in protos.items():
        session = make_session(proto.SerializeToString(), THREADS)
        runners[name] = lambda x, s=session: s.run(None, {s.get_inputs()[0].name: x})
    return runners


def bench_vit(label: str, cfg: ViTConfig, batches: list[int], repeats: int) -> list[dict[str, object]]:
    torch.manual_seed(0)
    model = ViT(cfg).eval()
    runners = pipelines(model)
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
        times = {name: median_ms(lambda r=run, x=x: r(x), repeats) for name, run in runners.items()}
        best_ort = min(times[k] for k in ("ort-plain", "ort-transformers", "ort-onnxscript"))
        rows.append({"model": label, "batch": batch, **{k: round(batch * 1e3 / v, 1) for k, v in times.items()},
                     "vs eager": round(times["eager"] / times["transerve"], 2),
                     "vs best ORT": round(best_ort / times["transerve"], 2),
                     "int8 vs ORT int8": round(times["ort-plain-int8"] / times["transerve-int8"], 2)})
        print(rows[-1], flush=True)
    return rows


def verdict(target: str, met: bool) -> str:
    """A target with its mark, as every table with targets writes it."""
    return f"{target} {'met' if met else 'MISSED'}"


def markdown(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="ViT-Tiny only, 3 repeats (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    models = {"ViT-Tiny/16": ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=192, depth=12,
                                       num_heads=3, mlp_ratio=4.0)}
    if not args.quick:
        models["ViT-B/16"] = ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12,
                                       num_heads=12, mlp_ratio=4.0)
    repeats = 3 if args.quick else args.repeats
    rows = [row for label, cfg in models.items() for row in bench_vit(label, cfg, [1, 8], repeats)]
    table = markdown(rows)
    print(table)
    section = (f"## Export: images/s by pipeline (median of {repeats}; torch {torch.__version__}, "
               f"{THREADS} threads)\n\n{command_line()}\n\n{table}\n")
    write_section(RESULTS, "## Export:", section)


def command_line() -> str:
    """The line every RESULTS.md section carries: how to reproduce it."""
    return f"Command: `{' '.join(['python', *sys.argv])}`"


def machine() -> str:
    """CPU model, its SIMD flags that matter here, and the commit: printed beside every table."""
    model, flags = cpu_info()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"CPU: {model}, {cores()} cores, flags {simd_summary(flags)}; commit {commit or '?'}"


def results_path(default: Path) -> Path:
    """Where results go: ``default`` (bench/RESULTS.md), or ``TRANSERVE_BENCH_RESULTS`` — the smoke test's
    file, so that a one-iteration run overwrites no measured figure (plots go beside it)."""
    return Path(os.environ.get("TRANSERVE_BENCH_RESULTS", default))


def versions() -> str:
    """The versions of what the benchmarks compare, for the line under every table's heading."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("onnxruntime", "torch", "openvino", "ctranslate2", "grpcio", "ray"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return "Versions: " + ", ".join(found)


def with_machine(section: str, line: str) -> str:
    """``section`` with the machine line (CPU, flags, commit) and the versions under its heading, unless the
    script already put a machine line there."""
    if "\nCPU: " in section:
        return section
    heading, _, rest = section.partition("\n")
    return f"{heading}\n\n{line}. {versions()}\n{rest}"


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace this benchmark's section of RESULTS.md (see :func:`results_path`) in place, keeping the others;
    a new section goes last. Every section carries the machine line."""
    path, section = results_path(path), with_machine(section, machine())
    text = path.read_text() if path.exists() else "# Benchmark results\n\nEach section is written by its script.\n\n"
    head, *parts = text.split("\n## ")
    sections = ["## " + p.rstrip("\n") + "\n" for p in parts]
    mine = [i for i, p in enumerate(sections) if p.startswith(heading)]
    if mine:  # rewritten where it stands, so a rerun of one script keeps the file's order
        sections[mine[0]] = section.rstrip("\n") + "\n"
        sections = [p for i, p in enumerate(sections) if i not in mine[1:]]
    else:
        sections.append(section.rstrip("\n") + "\n")
    path.write_text("\n".join([head.rstrip("\n") + "\n", *sections]))


if __name__ == "__main__":
    main()
