"""Does fusion ever cost speed? Our graphs against unfused exports of the same zoo models.

Usage: ``python bench/fusion_bench.py [--zoo zoo] [--repeats 15]`` (needs ``transerve zoo build`` first).

For each zoo model, side by side under ORT (intra-op 2 threads), batch 1 and 16:
* ``unfused`` — the plain export at opset 18: attention as MatMul→Softmax→MatMul, BN not folded;
* ``exporter`` — the plain export at opset 23 (the exporter's own Attention nodes, BN not folded);
* ``transerve`` — that graph after our passes (BN folded, attention fused, cleaned).
Translator graphs are timed as ``encoder`` (12-token sources) and one ``decoder_step`` with a
10-token cache. Medians over ``--repeats``; results into ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from transerve.export import graphs
from transerve.export.passes import optimize
from transerve.models.checkpoint import load_checkpoint
from transerve.models.transformer import Seq2SeqTransformer
from transerve.models.vit import ViT
from transerve.server.backends.sessions import make_session

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import command_line, markdown, median_ms, write_section

Feeds = Callable[[int], dict[str, np.ndarray]]


def vit_variants(model: ViT) -> dict[str, dict[str, onnx.ModelProto]]:
    fused = graphs.export_vit(model)
    exporter = copy.deepcopy(fused)
    optimize(fused, "onnxruntime", model.config.depth)
    return {"model": {"unfused": graphs.export_vit(model, 18), "exporter": exporter, "transerve": fused}}


def translator_variants(model: Seq2SeqTransformer) -> dict[str, dict[str, onnx.ModelProto]]:
    cfg = model.config
    raw = dict(zip(("encoder", "decoder_step"), graphs.export_translator(model), strict=True))
    unfused = dict(zip(("encoder", "decoder_step"), graphs.export_translator(model, 18), strict=True))
    expected = {"encoder": cfg.num_encoder_layers, "decoder_step": 2 * cfg.num_decoder_layers}
    out = {}
    for graph, proto in raw.items():
        fused = copy.deepcopy(proto)
        optimize(fused, "onnxruntime", expected[graph])
        out[graph] = {"unfused": unfused[graph], "exporter": proto, "transerve": fused}
    return out


def translator_feeds(model: Seq2SeqTransformer) -> dict[str, Feeds]:
    cfg = model.config
    h, d, layers = cfg.num_heads, cfg.d_model // cfg.num_heads, cfg.num_decoder_layers

    def encoder(batch: int) -> dict[str, np.ndarray]:
        ids = np.random.default_rng(0).integers(4, cfg.vocab_size, (batch, 12))
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def step(batch: int) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.full((batch, 1), 5, np.int64), "attention_mask": np.ones((batch, 12), np.int64)}
        for i in range(layers):
            for kind in "kv":
                feeds[f"past_{kind}_{i}"] = np.zeros((batch, h, 10, d), np.float32)
                feeds[f"cross_{kind}_{i}"] = np.zeros((batch, h, 12, d), np.float32)
        return feeds

    return {"encoder": encoder, "decoder_step": step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo"))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in ("vit-digits", "vit-digits-bn", "mt-en-de-numbers"):
        model, _ = load_checkpoint(args.zoo / name)
        if isinstance(model, ViT):
            variants = vit_variants(model)
            size = model.config.image_size
            feeds: dict[str, Feeds] = {"model": lambda b, s=size: {
                "images": np.random.default_rng(0).standard_normal((b, 3, s, s)).astype(np.float32)}}
        else:
            assert isinstance(model, Seq2SeqTransformer)
            variants, feeds = translator_variants(model), translator_feeds(model)
        for graph, protos in variants.items():
            sessions = {k: make_session(p.SerializeToString()) for k, p in protos.items()}
            for batch in (1, 16):
                f = feeds[graph](batch)
                ms = {k: median_ms(lambda s=s, f=f: s.run(None, f), args.repeats, warmup=5)
                      for k, s in sessions.items()}
                rows.append({"model": name, "graph": graph, "batch": batch,
                             **{f"{k} ms": round(v, 3) for k, v in ms.items()},
                             "fused vs unfused": round(ms["unfused"] / ms["transerve"], 2),
                             "fused vs exporter": round(ms["exporter"] / ms["transerve"], 2)})
                print(rows[-1], flush=True)
    table = markdown(rows)
    print(table)
    write_section(Path(__file__).with_name("RESULTS.md"), "## Fusion",
                  f"## Fusion never costs speed: zoo graphs, ms per call (median of {args.repeats}, ORT 2 threads)"
                  f"\n\n{command_line()}\n\n{table}\n")


if __name__ == "__main__":
    main()
