"""Image path benchmark: served Classify of real JPEG photos against an offline pipeline, and preprocessing against
the libraries' own.

Usage: ``python bench/image_bench.py [--seconds 3] [--repeats 5] [--quick]``. The photos are scikit-learn's two
427 × 640 sample JPEGs. The model is ViT-Tiny-shaped at 224 px (192 wide, 12 deep, random weights) exported
here as a Hugging Face DeiT checkpoint would be (``DeiTImageProcessor``: resize 256 × 256 bicubic, centre crop
224, ImageNet mean and std).

(1) served vs offline, images/s: ``Classify`` with the JPEG bytes, 16 one-image requests in flight and 2
    requests of 8 images in flight (one grpc.aio client on uvloop sharing the 2 cores), served as ``instances: 1``
    with 2 ORT threads and as ``instances: 2`` with 1 (the better compared), against one process that
    decodes the same bytes, preprocesses them the same way and runs ONNX Runtime on the same graph in its best
    batch and thread setting (batch 8 or 16, 2 threads or two 1-thread sessions side by side) — target ≥ 0.9;
(2) preprocessing per image (decoded photo in, normalised array out), single-threaded: transerve's against
    Hugging Face's ``DeiTImageProcessor`` with the PIL backend, and — where torchvision imports — with the
    torchvision backend and against timm's eval transform (``crop_pct`` 0.875: resize the shorter side to 256,
    crop 224), each compared with the transerve recipe for the same settings — target ≥ 1.5× faster, with the
    outputs compared (max |Δ|, share of values off by more than 1e-3). PyPI's torchvision for torch 2.13 is
    built for CUDA and does not import against the CPU torch; ``--torchvision-shim`` declares the two operators
    its import needs so the transforms can be measured (``pip install --no-deps torchvision==0.28.0``, then
    uninstall it: transformers and timm fail to import beside a torchvision that does not).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import uvloop
from PIL import Image
from transerve.export.exporter import ExportOptions, export_vit_entry
from transerve.image_recipes import from_hf_processor, from_timm_cfg
from transerve.models.vit import ViT, ViTConfig
from transerve.server.backends.sessions import make_session
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import command_line, markdown, median_ms, verdict, write_section
from server_bench import start, variant

DEIT = {"do_resize": True, "size": {"height": 256, "width": 256}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
HEADING = "## Image path"


def photos() -> list[bytes]:
    from sklearn.datasets import load_sample_images

    out = []
    for array in load_sample_images().images:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def export_tiny(repo: Path, quick: bool) -> None:
    depth = 2 if quick else 12
    cfg = ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=192, depth=depth, num_heads=3, mlp_ratio=4.0)
    torch.manual_seed(0)
    prep = from_hf_processor(DEIT, 224).to_config()
    export_vit_entry(ViT(cfg).eval(), ExportOptions(repo, "deit-tiny"), labels=[str(i) for i in range(1000)],
                     preprocessing=prep)


def offline_rate(graph: Path, jpegs: list[bytes], seconds: float) -> tuple[float, str]:
    """The best images/s of decode + preprocessing + ORT in one process, over batch and thread settings."""
    prep = from_hf_processor(DEIT, 224)
    pool = ThreadPoolExecutor(2)
    best, label = 0.0, ""
    for threads, sessions in ((2, 1), (1, 2)):
        runners = [make_session(graph, threads) for _ in range(sessions)]
        for batch in (8, 16):
            def one(runner: Any, batch: int = batch) -> None:
                images = [prep.apply_one(Image.open(io.BytesIO(jpegs[i % len(jpegs)]))) for i in range(batch)]
                runner.run(None, {"images": np.stack(images)})

            done, stop = 0, time.perf_counter() + seconds
            while time.perf_counter() < stop:
                list(pool.map(one, runners))
                done += batch * sessions
            rate = done / seconds
            if rate > best:
                best, label = rate, f"batch {batch}, {sessions} × {threads}-thread session"
    return best, label


async def served_rate(address: str, jpegs: list[bytes], per_request: int, in_flight: int, seconds: float) -> float:
    images = [tpb.Image(encoded=jpegs[i % len(jpegs)]) for i in range(per_request)]
    payload = tpb.ClassifyRequest(model="deit-tiny", images=images, top_k=1).SerializeToString()
    async with grpc.aio.insecure_channel(address) as channel:
        assert (await tpb_grpc.ClassifierStub(channel).Classify(tpb.ClassifyRequest.FromString(payload))).results
        classify = channel.unary_unary("/transerve.v1.Classifier/Classify")
        for _ in range(4):
            await classify(payload)
        stop = time.perf_counter() + seconds

        async def client() -> int:
            done = 0
            while time.perf_counter() < stop:
                await classify(payload)
                done += per_request
            return done

        return sum(await asyncio.gather(*(client() for _ in range(in_flight)))) / seconds


SERVED_SETTINGS = (("1 instance × 2 threads", {}, []), ("2 instances × 1 thread", {"instances": 2}, ["--threads", "1"]))


def serving_rows(repo: Path, jpegs: list[bytes], seconds: float, repeats: int) -> list[dict[str, object]]:
    """Each load shape against the offline anchor, served in both settings (every row shown, the better one
    compared with the target, as the offline side takes its best)."""
    offline = [offline_rate(repo / "deit-tiny" / "1" / "model.onnx", jpegs, seconds) for _ in range(repeats)]
    anchor = statistics.median(r for r, _ in offline)
    measured: dict[tuple[int, int], list[tuple[str, list[float]]]] = {}
    for label, batching, server_args in SERVED_SETTINGS:
        served_repo = variant(repo, repo.parent / label.replace(" ", "-"), "x", batching=batching, model="deit-tiny")
        process, address = start(served_repo, *server_args)
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                for shape in ((1, 16), (8, 2)):
                    rates = [runner.run(served_rate(address, jpegs, *shape, seconds)) for _ in range(repeats)]
                    measured.setdefault(shape, []).append((label, rates))
        finally:
            process.terminate()
            process.wait(60)
    rows = []
    for (per_request, in_flight), settings in measured.items():
        best = max(statistics.median(r) for _, r in settings)
        for label, rates in settings:
            ratio = statistics.median(rates) / anchor
            rows.append({"served": f"{in_flight} requests of {per_request} JPEG in flight, {label}",
                         "images/s": f"{statistics.median(rates):.1f} ({min(rates):.1f}–{max(rates):.1f})",
                         "offline anchor images/s": f"{anchor:.1f} ({offline[0][1]})",
                         "served / offline": f"{ratio:.2f}",
                         "target": verdict("≥ 0.9", ratio >= 0.9) if statistics.median(rates) == best else ""})
    return rows


PREP = "preprocessing (427 × 640 photo → 3 × 224 × 224)"
TIMM_CFG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def torchvision_importable(shim: bool) -> bool:
    """Whether torchvision imports. With ``shim``, first declare the two operators its import registers fake
    kernels for, so that the CUDA-built wheel PyPI offers for torch 2.13 imports against the CPU torch (its
    compiled operators stay unavailable; the transforms measured here do not use them)."""
    if shim:
        import torch

        library = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        globals()["_SHIM"] = library  # the definitions live as long as the library object
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def their_preprocessors(with_torchvision: bool) -> list[tuple[str, str, Any]]:
    """(label, which transerve recipe it is compared with, callable image → array) for each library pipeline
    that can run here; a label with None says why it cannot."""
    import transformers

    pil_class = getattr(transformers, "DeiTImageProcessorPil", transformers.DeiTImageProcessor)
    pil = pil_class(**DEIT)
    out: list[tuple[str, str, Any]] = [
        ("HF DeiTImageProcessor, PIL backend", "hf", lambda im: pil(im, return_tensors="np")["pixel_values"][0])]
    if not with_torchvision:
        reason = "not run: torchvision does not import (bench --torchvision-shim, with torchvision installed)"
        return [*out, ("HF DeiTImageProcessor, torchvision backend", reason, None),
                ("timm eval transform (crop_pct 0.875, bicubic)", reason, None)]
    from timm.data import create_transform

    fast = transformers.DeiTImageProcessor(**DEIT)
    backend = "torchvision" if any("Torchvision" in c.__name__ for c in type(fast).__mro__) else "PIL"
    timm_transform = create_transform(224, interpolation="bicubic", crop_pct=0.875, mean=TIMM_CFG["mean"],
                                      std=TIMM_CFG["std"])
    return [*out, (f"HF DeiTImageProcessor, {backend} backend", "hf",
                   lambda im: fast(im, return_tensors="pt")["pixel_values"][0].numpy()),
            ("timm eval transform (crop_pct 0.875, bicubic)", "timm", lambda im: timm_transform(im).numpy())]


def preprocessing_rows(jpegs: list[bytes], repeats: int, with_torchvision: bool) -> list[dict[str, object]]:
    torch.set_num_threads(1)  # one image, one thread, as transerve's pool runs each image
    image = Image.open(io.BytesIO(jpegs[0])).convert("RGB")
    image.load()
    ours = {"hf": from_hf_processor(DEIT, 224), "timm": from_timm_cfg(TIMM_CFG, 224)}
    ours_ms = {k: median_ms(lambda p=p: p.apply_one(image), repeats * 20) for k, p in ours.items()}
    rows: list[dict[str, object]] = [
        {PREP: f"transerve, {k} recipe", "ms/image": f"{ms:.2f}", "transerve speed-up": "1.00",
         "max abs Δ vs transerve": "0", "values off by > 1e-3": "", "target": ""} for k, ms in ours_ms.items()]
    for label, recipe, run in their_preprocessors(with_torchvision):
        if run is None:
            rows.append({PREP: label, "ms/image": recipe, "transerve speed-up": "", "max abs Δ vs transerve": "",
                         "values off by > 1e-3": "", "target": ""})
            continue
        delta = np.abs(np.asarray(run(image)) - ours[recipe].apply_one(image))
        theirs_ms = median_ms(lambda r=run: r(image), repeats * 20)
        speed = theirs_ms / ours_ms[recipe]
        rows.append({PREP: label, "ms/image": f"{theirs_ms:.2f}", "transerve speed-up": f"{speed:.2f}",
                     "max abs Δ vs transerve": f"{delta.max():.1e}",
                     "values off by > 1e-3": f"{(delta > 1e-3).mean():.2%}",
                     "target": verdict("≥ 1.5", speed >= 1.5)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a 2-block model, short runs (the smoke test)")
    parser.add_argument("--torchvision-shim", action="store_true",
                        help="let the CUDA-built torchvision wheel import against the CPU torch (see "
                             "torchvision_importable); without torchvision installed it changes nothing")
    args = parser.parse_args()
    with_torchvision = torchvision_importable(args.torchvision_shim)
    jpegs = photos()
    with tempfile.TemporaryDirectory() as work:
        export_tiny(Path(work) / "repo", args.quick)
        serving = markdown(serving_rows(Path(work) / "repo", jpegs, args.seconds, args.repeats))
    prep = markdown(preprocessing_rows(jpegs, args.repeats, with_torchvision))
    print(serving, prep, sep="\n\n")
    depth = "2 blocks (--quick)" if args.quick else "12 blocks"
    write_section(Path(__file__).with_name("RESULTS.md"), HEADING,
                  f"{HEADING}: real JPEG photos through Classify (ViT-Tiny-shaped 224 px, {depth}, DeiT "
                  f"preprocessing; median of {args.repeats} runs of {args.seconds:g} s, min–max in brackets; "
                  f"server and client share the 2 cores)\n\n{command_line()}\n\n{serving}\n\n{prep}\n")


if __name__ == "__main__":
    main()
