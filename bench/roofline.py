"""How close PyTorch eager already is to this CPU's fp32 GEMM peak on the export benchmark's ViTs.

Usage: ``python bench/roofline.py [--repeats 5]``. Measures the sustained fp32 matrix-multiply rate with
``torch.mm`` at 2 threads (the export benchmark's thread count; the best of several large square sizes),
counts each ViT's multiply-adds (every Linear and the patch Conv, plus attention's two batched matmuls) and
prints the share of that peak eager inference reaches at batch 8. A share near 1 means no fp32 engine can be
much faster than eager here — whatever it does with the graph.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import THREADS, command_line, markdown, write_section
from transerve.models.vit import ViT, ViTConfig

CONFIGS = {  # the export benchmark's two models
    "ViT-Tiny/16": ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=192, depth=12, num_heads=3,
                             mlp_ratio=4.0),
    "ViT-B/16": ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, num_heads=12,
                          mlp_ratio=4.0)}


def gemm_peak(repeats: int) -> float:
    """GFLOP/s of the best large square fp32 matmul."""
    best = 0.0
    for n in (1024, 2048, 3072):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


def vit_flops(cfg: ViTConfig) -> float:
    """FLOPs (2 × multiply-adds) of one image."""
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    d, hidden = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    patch = (cfg.image_size // cfg.patch_size) ** 2 * 3 * cfg.patch_size**2 * d
    per_layer = tokens * (4 * d * d + 2 * d * hidden) + 2 * tokens * tokens * d
    return 2.0 * (patch + cfg.depth * per_layer + d * cfg.num_classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    peak = gemm_peak(args.repeats)
    rows = []
    for name, cfg in CONFIGS.items():
        model = ViT(cfg).eval()
        x = torch.randn(8, 3, cfg.image_size, cfg.image_size)
        with torch.inference_mode():
            model(x)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
        images = 8 / statistics.median(times)
        achieved = images * vit_flops(cfg) / 1e9
        rows.append({"model": name, "GFLOP/image": round(vit_flops(cfg) / 1e9, 2),
                     "eager img/s (b8)": round(images, 1),
                     "eager GFLOP/s": round(achieved), "GEMM peak GFLOP/s": round(peak),
                     "eager share of peak": round(achieved / peak, 2),
                     "share the target needs (1.3× Tiny, 1.15× B)":
                         round((1.3 if "Tiny" in name else 1.15) * achieved / peak, 2)})
    table = markdown(rows)
    print(table)
    heading = "## Roofline: eager vs this CPU's fp32 GEMM peak"
    write_section(Path(__file__).with_name("RESULTS.md"), heading,
                  f"{heading} ({THREADS} threads, median of {args.repeats})\n\n{command_line()}\n\n{table}\n")


if __name__ == "__main__":
    main()
