"""Offline decode loop: transerve's exported graphs on ONNX Runtime vs CTranslate2, same checkpoint.

Usage: ``python bench/ct2_bench.py [--work /tmp/transerve-bench] [--repeats 5]`` (needs ctranslate2:
``pip install -e ".[bench]"``; builds the opus-mt-en-de-shaped random checkpoint and its export on first
use, ~2 min).

Protocol (the issue's): 16 sources × 20 tokens (19 random vocabulary pieces + EOS), exactly 32 generated
tokens (EOS suppressed until then, ``min_decoding_length`` for CTranslate2), greedy, 2 threads for both, batch
16 and batch 1 (16 sources one after another). Figures are tokens/s, medians over ``--repeats``; both
engines are loaded once and measured in the same run, alternating. The int8 rows are ORT dynamic
quantization of both graphs (``transerve export --int8``) and CTranslate2's ``compute_type="int8"``; token
agreement is against the same engine's fp32 output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from transerve.server.backends.sessions import make_session
from transerve.server.engine.seq2seq import DecoderLayout, OrtSeq2Seq

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import command_line, machine, markdown, verdict, write_section
from opus_model import checkpoint, exported

SOURCES, SOURCE_LEN, NEW_TOKENS, THREADS = 16, 20, 32, 2


class TranserveLoop:
    """The plain offline loop: encoder once, then one decoder step per token, argmax with EOS held back."""

    def __init__(self, vdir: Path, config: dict, suffix: str = "") -> None:
        d = config["decoder"]
        layout = DecoderLayout(d["num_layers"], d["num_heads"], d["head_dim"], d["bos_id"], d["eos_id"], d["pad_id"])
        self.s2s = OrtSeq2Seq(make_session(vdir / f"encoder{suffix}.onnx", THREADS),
                              make_session(vdir / f"decoder_step_ragged{suffix}.onnx", THREADS), layout)

    def __call__(self, sources: np.ndarray) -> np.ndarray:
        s2s = self.s2s
        mask = np.ones_like(sources)
        cross = s2s.encode(sources, mask)
        past, last, out = s2s.empty_cache(len(sources)), np.full(len(sources), s2s.layout.bos_id), []
        for _ in range(NEW_TOKENS):
            logits, past = s2s.step(last, mask, past, cross)
            logits[:, s2s.layout.eos_id] = -np.inf
            last = logits.argmax(-1)
            out.append(last)
        return np.stack(out, 1)


class CT2Loop:
    def __init__(self, model_dir: Path, compute_type: str, vocab: list[str]) -> None:
        import ctranslate2

        self.translator = ctranslate2.Translator(str(model_dir), device="cpu", compute_type=compute_type,
                                                 inter_threads=1, intra_threads=THREADS)
        self.vocab, self.index = vocab, {p: i for i, p in enumerate(vocab)}

    def __call__(self, sources: np.ndarray) -> np.ndarray:
        tokens = [[self.vocab[i] for i in row] for row in sources.tolist()]
        results = self.translator.translate_batch(tokens, beam_size=1, max_decoding_length=NEW_TOKENS,
                                                  min_decoding_length=NEW_TOKENS, max_batch_size=len(tokens))
        return np.array([[self.index[t] for t in r.hypotheses[0]] for r in results])


def converted(work: Path) -> Path:
    out = work / "opus-ct2"
    if not (out / "model.bin").is_file():
        import ctranslate2

        ctranslate2.converters.TransformersConverter(str(checkpoint(work))).convert(str(out), force=True)
    return out


def tokens_per_second(loop, sources: np.ndarray, batch: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for i in range(0, len(sources), batch):
        loop(sources[i:i + batch])
    return len(sources) * NEW_TOKENS / (time.perf_counter() - start)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/transerve-bench"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    repo = exported(args.work)
    vdir = repo / "opus-shaped" / "1"
    config = yaml.safe_load((repo / "opus-shaped" / "config.yaml").read_text())
    import json

    vocab_map = json.loads((checkpoint(args.work) / "vocab.json").read_text())
    vocab = [p for p, _ in sorted(vocab_map.items(), key=lambda kv: kv[1])]
    rng = np.random.default_rng(0)
    eos = config["decoder"]["eos_id"]
    sources = np.concatenate([rng.integers(2, 300, (SOURCES, SOURCE_LEN - 1)), np.full((SOURCES, 1), eos)], 1)
    engines = {"transerve fp32": TranserveLoop(vdir, config), "transerve int8": TranserveLoop(vdir, config, ".int8"),
               "ct2 fp32": CT2Loop(converted(args.work), "float32", vocab),
               "ct2 int8": CT2Loop(converted(args.work), "int8", vocab)}
    ct2_sources = sources[:, :-1]  # CTranslate2 appends EOS to Marian sources itself
    outputs = {name: (e(ct2_sources) if name.startswith("ct2") else e(sources)) for name, e in engines.items()}
    speed: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            src = ct2_sources if name.startswith("ct2") else sources
            for batch in (16, 1):
                speed.setdefault((name, batch), []).append(tokens_per_second(engine, src, batch))
    med = {k: statistics.median(v) for k, v in speed.items()}
    rows = []
    for batch in (16, 1):
        for precision, target in (("fp32", 1.25 if batch == 16 else 1.05), ("int8", 1.1 if batch == 16 else 1.3)):
            ours, theirs = med[(f"transerve {precision}", batch)], med[(f"ct2 {precision}", batch)]
            rows.append({"batch": batch, "precision": precision, "transerve tok/s": round(ours),
                         "CTranslate2 tok/s": round(theirs), "ratio": round(ours / theirs, 2),
                         "target": verdict(f"≥ {target}", ours >= target * theirs),
                         "token agreement vs own fp32": "—" if precision == "fp32" else
                         f"transerve {agreement(outputs['transerve int8'], outputs['transerve fp32']):.3f} / "
                         f"ct2 {agreement(outputs['ct2 int8'], outputs['ct2 fp32']):.3f}"})
    same = agreement(outputs["transerve fp32"], outputs["ct2 fp32"])
    table = markdown(rows)
    print(table)
    print(f"transerve fp32 vs CTranslate2 fp32 token agreement: {same:.3f}")
    heading = "## Offline decode loop vs CTranslate2"
    write_section(Path(__file__).with_name("RESULTS.md"), heading,
                  f"{heading}: opus-mt-en-de-shaped random Marian, {SOURCES} sources × {SOURCE_LEN} tokens, "
                  f"{NEW_TOKENS} new tokens, greedy, {THREADS} threads (median of {args.repeats})\n\n"
                  f"{command_line()}\n\n{machine()}\n\n{table}\n\n"
                  f"Same checkpoint, same tokens: transerve fp32 and CTranslate2 fp32 agree on {same:.1%} of the "
                  f"generated tokens.\n")


if __name__ == "__main__":
    main()
