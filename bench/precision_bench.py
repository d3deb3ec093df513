"""ViT by precision: transerve's variants against PyTorch and OpenVINO in the same run.

Usage: ``python bench/precision_bench.py [--repeats 5] [--quick]``

Models (random weights, nothing downloaded): ViT-Tiny/16 and ViT-B/16 at 224 px, batch 1 and 8. Every
pipeline gets 2 threads. Pipelines:

* ``transerve-fp32`` / ``transerve-int8`` — our export on ONNX Runtime (int8: dynamic, per channel);
* ``transerve-bf16`` — our export on OpenVINO with the bf16 hint (what ``precision: bf16`` serves);
* ``openvino-bf16`` — OpenVINO on its own: ``openvino.convert_model`` of the PyTorch module, bf16 hint;
* ``eager-fp32``, ``eager-bf16-autocast``, ``eager-bf16-weights`` — PyTorch ``inference_mode``.

Each figure is images/s, the median of ``--repeats`` timed runs (min–max beside it), and each pipeline's
logit MAE against ``transerve-fp32`` on the same input. "Accurate" means MAE ≤ 0.01 (the export's gate for
unit-scale logits). Targets (issue 15): transerve's best accurate variant ≥ 1.0 × the best peer and ≥ 1.2 ×
PyTorch eager bf16 (the better of autocast and bf16 weights). Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from transerve.export import precision
from transerve.export.variants import run_times
from transerve.export.weights_file import save_graphs
from transerve.models.vit import ViT, ViTConfig
from transerve.server.backends.openvino_runner import OpenVinoRunner, openvino_available
from transerve.server.backends.sessions import make_session

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import RESULTS, THREADS, command_line, machine, markdown, ours, write_section

MAE_BOUND = 0.01
PROFILE_READING = (
    "Reading on the AMD EPYC with AVX512-BF16 and no AMX (2 vCPUs), from the batch-1 profile above: "
    "transerve-bf16 spends ≈ 88 % of its time in OpenVINO's avx512_bf16 brgemm FullyConnected kernels, and "
    "those are slower at 197 tokens than PyTorch's bf16 `addmm` (both oneDNN) — in the profile measured while "
    "writing this, 54.1 vs 45.0 ms per image; PyTorch gives the difference back in its attention "
    "(`_scaled_dot_product_flash_attention_for_cpu`, ≈ 20 % of its time, against ≈ 6 % for OpenVINO's fused "
    "subgraph). The ceiling line above bounds the ratio to eager bf16 from the profile of the same run: when "
    "PyTorch's GEMMs run as fast as in that profile (ceiling 1.15), removing all of transerve's non-GEMM work "
    "could not reach 1.2 at batch 1, and the target is missed; when they run slower (ceiling 1.28 in the make "
    "bench run at 7744d06) it is met. That is why this row flips between runs: eager bf16 weights measured 16.0, "
    "12.4 and 10.6 img/s at ViT-B/16 batch 1 in three runs on this shared VM, transerve-bf16 16.4–17.7. At "
    "batch 8 the GEMMs amortise better and the target is met. Tried on this CPU while profiling, none of which "
    "closes the fast-eager case: static input shapes for OpenVINO (16.8 "
    "vs 16.5 img/s, noise); ONNX Runtime int8 forms, which would be 1.5–1.8 × bf16 here (VNNI) but miss the "
    "0.01 logit-MAE gate on these random-weight ViTs — dynamic per-channel (what `--int8` writes) MAE 0.0116 / "
    "0.0136 at batch 1 / 8, per-token activation scales (a MatMulInteger rewrite) MAE 0.0100 at 0.8 × its speed, "
    "weight-only MatMulNBits 8-bit (block 32 or 128, int8 compute) MAE 0.008–0.0099 but 13–15 img/s, keeping "
    "the MLP's second projection in fp32 MAE 0.0100 / 0.0110 at 16 img/s. What would close it: OpenVINO's "
    "FullyConnected as fast as PyTorch's addmm at M = 197 (or serving the GEMMs through PyTorch's bf16 path), "
    "or an int8 that passes the gate — the gate measures against random weights, whose logits (mean |logit| "
    "≈ 0.48) leave quantisation noise little room, while the zoo's trained vit-digits passes it in int8 (MAE "
    "0.0089, test accuracy 99.72 vs 99.44 % in fp32). Reading on "
    "the Xeon with AMX (2 vCPUs, an earlier run): the fully connected layers run on AMX bf16 tiles at about "
    "1.7 TFLOP/s — about 73 % of the time — so batch 8 of ViT-B/16 is compute-bound in the GEMMs, where "
    "PyTorch's bf16 weights use the same oneDNN kernels; of the rest, the attention subgraph is about 15 % and "
    "the Transpose/Split that OpenVINO makes of our packed-QKV `Attention` node about 7 %.")
Runner = Callable[[np.ndarray], np.ndarray]
PEERS = ("openvino-bf16", "eager-bf16-autocast", "eager-bf16-weights")


def eager_runners(model: ViT) -> dict[str, Runner]:
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)

    def fp32(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    def autocast(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(torch.from_numpy(x)).float().numpy()

    def weights(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return bf16_model(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()

    return {"eager-fp32": fp32, "eager-bf16-autocast": autocast, "eager-bf16-weights": weights}


def openvino_own(model: ViT, image_size: int) -> Runner:
    """OpenVINO converting the PyTorch module itself (no transerve export), bf16 hint."""
    import openvino as ov

    example = torch.zeros(1, 3, image_size, image_size)
    converted = ov.convert_model(model, example_input=example)
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "bf16",
                                                          "INFERENCE_NUM_THREADS": THREADS,
                                                          "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: x})
        return np.array(request.get_output_tensor(0).data)

    return run


def pipelines(model: ViT, folder: Path) -> dict[str, Runner]:
    fused = ours(model)
    save_graphs(folder, {"model": fused, "model_int8": precision.quantize_int8(copy.deepcopy(fused))})
    runners: dict[str, Runner] = {}
    for name, path in (("transerve-fp32", folder / "model.onnx"), ("transerve-int8", folder / "model_int8.onnx")):
        session = make_session(path, THREADS)
        runners[name] = lambda x, s=session: s.run(None, {"images": x})[0]
    if openvino_available():
        ov_runner = OpenVinoRunner(folder / "model.onnx", THREADS, "bf16")
        runners["transerve-bf16"] = lambda x: ov_runner.run(None, {"images": x})[0]
        runners["openvino-bf16"] = openvino_own(model, model.config.image_size)
    return {**runners, **eager_runners(model)}


def bench_model(label: str, cfg: ViTConfig, batches: list[int], repeats: int) -> list[dict[str, object]]:
    torch.manual_seed(0)
    model = ViT(cfg).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runners = pipelines(model, Path(tmp))
        for batch in batches:
            x = np.random.default_rng(0).standard_normal((batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
            reference = runners["transerve-fp32"](x)
            stats = {}
            for name, run in runners.items():
                mae = float(np.abs(run(x) - reference).mean())
                times = run_times(lambda r=run, x=x: r(x), repeats, warmup=2)
                stats[name] = (batch / statistics.median(times), batch / max(times), batch / min(times), mae)
            rows.append(summary_row(label, batch, stats))
            print(rows[-1], flush=True)
    return rows


def summary_row(label: str, batch: int, stats: dict[str, tuple[float, float, float, float]]) -> dict[str, object]:
    """One table row: each pipeline's img/s (min–max) and MAE, then the targets' ratios, met or missed."""
    ours_accurate = {k: v for k, v in stats.items() if k.startswith("transerve") and v[3] <= MAE_BOUND}
    best = max(ours_accurate, key=lambda k: ours_accurate[k][0])
    peers = {k: v for k, v in stats.items() if k in PEERS}
    eager_bf16 = max(stats[k][0] for k in ("eager-bf16-autocast", "eager-bf16-weights"))
    row: dict[str, object] = {"model": label, "batch": batch}
    for name, (median, low, high, mae) in stats.items():
        row[name] = f"{median:.1f} ({low:.1f}–{high:.1f}), MAE {mae:.3g}"
    row["best accurate transerve"] = best
    if peers:
        best_peer = max(peers, key=lambda k: peers[k][0])
        ratio = stats[best][0] / peers[best_peer][0]
        row["vs best peer (≥ 1.0)"] = f"{ratio:.2f} × {best_peer} {'met' if ratio >= 1.0 else 'MISSED'}"
    ratio = stats[best][0] / eager_bf16
    row["vs eager bf16 (≥ 1.2)"] = f"{ratio:.2f} {'met' if ratio >= 1.2 else 'MISSED'}"
    return row


Spent = dict[tuple[str, str], float]  # (node or op, kernel) -> seconds per run


def profile_openvino(cfg: ViTConfig, batch: int, runs: int = 5) -> Spent:
    """Where transerve-bf16's time goes on OpenVINO: its per-node counters, summed by node and kernel kind."""
    import openvino as ov

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_graphs(Path(tmp), {"model": ours(ViT(cfg).eval())})
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(Path(tmp) / "model.onnx")), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": THREADS,
                                       "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
        request = compiled.create_infer_request()
        x = np.random.default_rng(0).standard_normal((batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
        for _ in range(3):
            request.infer({"images": x})
        spent: Spent = {}
        for _ in range(runs):  # the counters hold the last inference only
            request.infer({"images": x})
            for node in request.profiling_info:
                key = (node.node_type, node.exec_type)
                spent[key] = spent.get(key, 0.0) + node.real_time.total_seconds() / runs
    return spent


def profile_eager_bf16(cfg: ViTConfig, batch: int, runs: int = 5) -> Spent:
    """Where PyTorch eager with bf16 weights spends its time: the profiler's self CPU time per aten op."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = ViT(cfg).eval().to(torch.bfloat16)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, cfg.image_size, cfg.image_size))
                         .astype(np.float32)).to(torch.bfloat16)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
    return {(event.key, "aten"): event.self_cpu_time_total / 1e6 / runs for event in prof.key_averages()
            if event.self_cpu_time_total > 0}


GEMM_KINDS = ("FullyConnected", "aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul")


def gemm_seconds(spent: Spent) -> float:
    return sum(seconds for (kind, _), seconds in spent.items() if kind in GEMM_KINDS)


def profile_table(spent: Spent, top: int = 6) -> str:
    total = sum(spent.values())
    lines = ["| node / op | kernel | ms per run | share |", "|---|---|---|---|"]
    lines += [f"| {kind} | {kernel} | {seconds * 1e3:.2f} | {100 * seconds / total:.1f} % |"
              for (kind, kernel), seconds in sorted(spent.items(), key=lambda item: -item[1])[:top]]
    gemm = gemm_seconds(spent)
    lines.append(f"| all matrix multiplications |  | {gemm * 1e3:.2f} | {100 * gemm / total:.1f} % |")
    lines.append(f"| total |  | {total * 1e3:.2f} | 100 % |")
    return "\n".join(lines)


def batch1_profile(cfg: ViTConfig) -> str:
    """ViT-B/16 at batch 1 on both sides of the eager-bf16 target, and the ratio no non-GEMM work can beat:
    PyTorch's total over transerve's GEMM time alone (both call oneDNN's bf16 GEMMs)."""
    ours_spent, eager_spent = profile_openvino(cfg, 1), profile_eager_bf16(cfg, 1)
    ceiling = sum(eager_spent.values()) / gemm_seconds(ours_spent)
    return (f"Where the time goes at ViT-B/16 batch 1, this run (transerve-bf16: OpenVINO's per-node counters, "
            f"mean of 5 runs after warm-up; eager-bf16-weights: torch.profiler's self CPU time per op, same "
            f"runs):\n\n**transerve-bf16**\n\n{profile_table(ours_spent)}\n\n**eager-bf16-weights**\n\n"
            f"{profile_table(eager_spent)}\n\nCeiling from this profile: even with everything but its matrix "
            f"multiplications gone, transerve-bf16 would be {ceiling:.2f} × eager-bf16-weights "
            f"({'above' if ceiling >= 1.2 else 'below'} the 1.2 target).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tiny ViT, batch 1, 1 repeat: the smoke test")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if args.quick:
        models = {"ViT-micro (smoke)": ViTConfig(image_size=32, patch_size=16, num_classes=10, dim=32, depth=1,
                                                 num_heads=2)}
        batches, repeats = [1], 1
    else:
        models = {"ViT-Tiny/16": ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=192, depth=12,
                                           num_heads=3, mlp_ratio=4.0),
                  "ViT-B/16": ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12,
                                        num_heads=12, mlp_ratio=4.0)}
        batches, repeats = [1, 8], args.repeats
    rows = [row for label, cfg in models.items() for row in bench_model(label, cfg, batches, repeats)]
    table = markdown(rows)
    print(machine())
    print(table)
    if not args.quick:
        import openvino

        profile = batch1_profile(models["ViT-B/16"])
        print(profile)
        section = (f"## Precision: ViT images/s by pipeline (median of {repeats}, min–max; torch {torch.__version__}, "
                   f"OpenVINO {openvino.__version__}, onnx {onnx.__version__}, {THREADS} threads)\n\n"
                   f"{machine()}\n\n{command_line()}\n\n{table}\n\n{profile}\n\n{PROFILE_READING}\n")
        write_section(RESULTS, "## Precision:", section)


if __name__ == "__main__":
    main()
