"""Serving's numpy search (``transerve.search``) against the offline PyTorch search, token for token.

Reference: ``transerve.models.decoding`` (PyTorch eager, KV-cached, each source alone). The numpy search
runs (a) over the same PyTorch model (only the search differs), (b) over the exported graphs on ONNX
Runtime in both scheduler modes: request-level (``OrtSeq2Seq.generate``, what ``scheduler.mode: static``
runs) and continuous (``ContinuousScheduler``). Greedy and beam sizes 1–5, length penalties 0.5–2, mixed
source lengths. Tolerance: none — token ids must be identical.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import offline_ids
from test_transformer import ragged_sources, random_model
from transerve.export.exporter import ort_seq2seq
from transerve.export.graphs import export_encoder, export_ragged_step
from transerve.export.passes import optimize
from transerve.models.decoding import model_step, select_rows, translate_ids
from transerve.search import beam_search, greedy_search, log_softmax, strip_special
from transerve.server.backends.sessions import make_session
from transerve.server.engine.scheduler import ContinuousScheduler, SchedulerCaps
from transerve.server.engine.seq2seq import pad_ids

BEAMS = [1, 2, 3, 4, 5]
PENALTIES = [0.5, 1.0, 2.0]
LENGTHS = [3, 9, 6, 1, 12]


def numpy_translate(model: Any, src: torch.Tensor, keep: torch.Tensor, max_new: int, beam: int,
                    penalty: float) -> list[list[int]]:
    """The numpy search driving the PyTorch model's cached decode (state: the model's KV cache, as arrays)."""
    cfg = model.config
    rows = torch.arange(src.shape[0]).repeat_interleave(beam)
    memory_kv = select_rows(model.memory_kv(model.encode(src, keep)), rows)
    torch_step = model_step(model, memory_kv, keep.index_select(0, rows))

    def step(last: np.ndarray, state: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        past = None if state is None else [(torch.from_numpy(state[2 * i]), torch.from_numpy(state[2 * i + 1]))
                                           for i in range(len(state) // 2)]
        with torch.no_grad():
            log_probs, present = torch_step(torch.from_numpy(last), past)
        return log_probs.numpy(), [t.numpy() for kv in present for t in kv]

    if beam == 1:
        return greedy_search(step, None, src.shape[0], cfg.bos_id, cfg.eos_id, max_new, cfg.pad_id)
    best = beam_search(step, None, src.shape[0], beam, cfg.bos_id, cfg.eos_id, max_new, penalty)
    return [strip_special(h.tokens, cfg.eos_id) for h in best]


@pytest.mark.parametrize("beam", BEAMS)
@pytest.mark.parametrize("penalty", PENALTIES)
def test_numpy_search_equals_torch_search_on_the_model(beam: int, penalty: float) -> None:
    model = random_model(seed=0)
    src, keep = ragged_sources(LENGTHS, seed=beam)
    expected = translate_ids(model, src, keep, 14, beam_size=beam, length_penalty=penalty)
    assert numpy_translate(model, src, keep, 14, beam, penalty) == expected
    assert len({tuple(t) for t in expected}) > 1  # the sources really decode differently


def test_log_softmax_matches_torch() -> None:
    x = np.random.default_rng(1).standard_normal((4, 50)).astype(np.float32) * 10
    np.testing.assert_allclose(log_softmax(x), torch.from_numpy(x).log_softmax(-1).numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def exported() -> tuple[Any, Any, Any]:
    """The PyTorch model and its fused encoder / ragged step on ONNX Runtime (as a repository entry holds)."""
    model = random_model(seed=0)
    encoder, step = export_encoder(model), export_ragged_step(model)
    optimize(encoder, "onnxruntime", expected_attention=2)
    optimize(step, "onnxruntime", expected_attention=4)
    return model, make_session(encoder.SerializeToString()), make_session(step.SerializeToString())


def decode_both_modes(model: Any, encoder: Any, step: Any, rows: list[list[int]], budget: int, beam: int,
                      penalty: float) -> tuple[list[list[int]], list[list[int]]]:
    """(request-level: one padded batch through ``OrtSeq2Seq.generate``, continuous: ``ContinuousScheduler``)."""
    seq2seq = ort_seq2seq(model, encoder, step)
    ids, mask = pad_ids(rows, model.config.pad_id)
    static = seq2seq.generate(ids, mask, budget, beam_size=beam, length_penalty=penalty)

    async def continuous() -> list[list[int]]:
        scheduler = ContinuousScheduler.over_graphs(encoder, step, seq2seq.layout, SchedulerCaps(), name="search")
        scheduler.start()
        try:
            return list(await asyncio.gather(*(scheduler.run(r, budget, beam, penalty) for r in rows)))
        finally:
            await scheduler.aclose()

    return static, asyncio.run(asyncio.wait_for(continuous(), 120))


def offline_alone(model: Any, rows: list[list[int]], budget: int, beam: int, penalty: float) -> list[list[int]]:
    """The PyTorch reference: each source decoded alone."""
    return [offline_ids(model, row, budget, beam, penalty) for row in rows]


def assert_modes_equal_offline(model: Any, encoder: Any, step: Any, rows: list[list[int]], budget: int) -> None:
    """Greedy and beams 1–5 × length penalties 0.5–2, both modes, token for token."""
    for beam in BEAMS:
        for penalty in PENALTIES:
            expected = offline_alone(model, rows, budget, beam, penalty)
            static, continuous = decode_both_modes(model, encoder, step, rows, budget, beam, penalty)
            assert static == expected, (beam, penalty, "static")
            assert continuous == expected, (beam, penalty, "continuous")


@pytest.mark.parametrize("beam", BEAMS)
@pytest.mark.parametrize("penalty", PENALTIES)
def test_both_scheduler_modes_decode_like_pytorch(exported: tuple[Any, Any, Any], beam: int,
                                                  penalty: float) -> None:
    model, encoder, step = exported
    src, keep = ragged_sources(LENGTHS, seed=beam)
    rows = [src[i, :int(keep[i].sum())].tolist() for i in range(len(LENGTHS))]
    static, continuous = decode_both_modes(model, encoder, step, rows, 14, beam, penalty)
    expected = offline_alone(model, rows, 14, beam, penalty)
    assert static == expected  # request-level batching: one padded batch through the ragged step
    assert continuous == expected


@pytest.mark.slow
def test_zoo_translator_both_modes_decode_like_pytorch(zoo_dir: Path, zoo_repo: Path) -> None:
    from transerve.models.translator import TextTranslator

    translator = TextTranslator.load(zoo_dir / "mt-en-de-numbers")
    vdir = zoo_repo / "mt-en-de-numbers" / "1"
    texts = ["seven", "three hundred and forty-two", "nineteen eighty-four", "the first",
             "two hundred thousand and twelve", "ninety-nine"]
    eos = translator.model.config.eos_id
    rows = [[*e.ids, eos] for e in translator.tokenizer.encode_batch(texts)]
    assert_modes_equal_offline(translator.model, make_session(vdir / "encoder.onnx"),
                               make_session(vdir / "decoder_step_ragged.onnx"), rows, 40)
