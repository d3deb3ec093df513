"""The continuous-batching scheduler against offline decoding of the PyTorch model, without a server.

Reference: ``translate_ids`` (PyTorch eager, KV-cached, each source alone) — tokens must be identical.
The scheduler runs the exported, fused ``encoder`` and ``decoder_step_ragged`` graphs on ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from helpers import offline_ids, until
from transerve.export.graphs import export_ragged_step, export_translator
from transerve.export.passes import optimize
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.server.backends.sessions import make_session
from transerve.server.engine.scheduler import ContinuousScheduler, DecoderLayout, SchedulerCaps
from transerve.server.exceptions import DeadlineExceeded, QueueFull

VOCAB = 48


@pytest.fixture(scope="module")
def graphs() -> tuple[Seq2SeqTransformer, Any, Any]:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=VOCAB, d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                            ffn_dim=64, dropout=0.0)
    model = Seq2SeqTransformer(cfg).eval()
    encoder, _ = export_translator(model)
    ragged = export_ragged_step(model)
    optimize(encoder, "onnxruntime", expected_attention=2)
    optimize(ragged, "onnxruntime", expected_attention=4)
    return model, make_session(encoder.SerializeToString()), make_session(ragged.SerializeToString())


def scheduler(graphs: tuple[Seq2SeqTransformer, Any, Any], **caps: Any) -> ContinuousScheduler:
    model, encoder, step = graphs
    c = model.config
    layout = DecoderLayout(c.num_decoder_layers, c.num_heads, c.d_model // c.num_heads, c.bos_id, c.eos_id, c.pad_id)
    return ContinuousScheduler.over_graphs(encoder, step, layout, SchedulerCaps(**caps), name="test")


def offline(model: Seq2SeqTransformer, source: list[int], max_new: int, beam: int) -> list[int]:
    return offline_ids(model, source, max_new, beam)


def sources(count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[*rng.integers(4, VOCAB, int(n)).tolist(), 2] for n in rng.integers(1, 14, count)]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_mixed_requests_joining_mid_decode_equal_offline(graphs: tuple[Seq2SeqTransformer, Any, Any]) -> None:
    model = graphs[0]
    first, second = sources(6, seed=1), sources(6, seed=2)
    plan = [(s, 4 + 3 * i, 1 + (i % 3)) for i, s in enumerate(first + second)]  # budgets 4..37, beams 1..3

    async def main() -> list[list[int]]:
        s = scheduler(graphs)
        s.start()
        started = asyncio.Event()

        async def one(source: list[int], budget: int, beam: int, wait: bool) -> list[int]:
            if wait:
                await started.wait()  # join a batch that is already decoding
            out: list[int] = []
            async for event in s.generate(source, budget, beam):
                started.set()
                if event.final is not None:
                    out = event.final
            return out

        results = await asyncio.gather(*(one(src, b, k, i >= len(first)) for i, (src, b, k) in enumerate(plan)))
        await s.aclose()
        assert s.stats.cached_tokens == 0 and s.stats.active_sequences == 0
        return list(results)

    got = run(main())
    expected = [offline(model, src, b, k) for src, b, k in plan]
    assert got == expected
    assert any(len(e) > 5 for e in expected)  # not a trivially short decode


def test_greedy_stream_tokens_join_to_the_final(graphs: tuple[Seq2SeqTransformer, Any, Any]) -> None:
    async def main() -> tuple[list[int], list[int]]:
        s = scheduler(graphs)
        s.start()
        streamed: list[int] = []
        final: list[int] = []
        async for event in s.generate(sources(1, seed=5)[0], 20):
            streamed += event.tokens
            final = event.final or final
        await s.aclose()
        return streamed, final

    streamed, final = run(main())
    assert final[:len(streamed)] == streamed and len(final) - len(streamed) <= 1


class GatedRunner:
    """A step runner that can be held closed, so requests pile up behind a running step."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.gate, self.entered = inner, threading.Event(), threading.Event()
        self.gate.set()
        self.output_names = [o.name for o in inner.get_outputs()]  # no IOBinding: the scheduler's copying path
        self.hold_when: Any = None  # checked as each step starts: True closes the gate before that step
        self.rows = 0  # rows in the step that entered last

    def run(self, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.hold_when is not None and self.hold_when():
            self.gate.clear()
        self.rows = len(feeds["input_ids"])
        self.entered.set()
        assert self.gate.wait(20)
        return list(self.inner.run(names, feeds))


def test_cancelled_and_expired_requests_free_the_cache(graphs: tuple[Seq2SeqTransformer, Any, Any]) -> None:
    model, encoder, step = graphs
    gated = GatedRunner(step)

    async def main() -> None:
        s = scheduler((model, encoder, gated))
        s.start()
        # once every sequence holds a cached token, the next step waits: none can finish before the clients leave
        gated.hold_when = lambda: s.stats.cached_tokens >= 20
        streams = [s.generate(src, 30) for src in sources(20, seed=7)]
        firsts = await asyncio.gather(*(anext(g) for g in streams))  # every one is decoding
        assert all(e.tokens for e in firsts)
        assert s.stats.cached_tokens > 0
        for g in streams:
            await g.aclose()  # the client goes away mid-decode
        gated.hold_when = None
        gated.gate.set()
        kept = await s.run(sources(1, seed=8)[0], 5)  # the loop survives and serves the next request
        assert kept == offline(model, sources(1, seed=8)[0], 5, 1)
        gated.gate.clear()
        gated.entered.clear()
        blocker = asyncio.ensure_future(s.run(sources(1, seed=9)[0], 30))
        assert await asyncio.to_thread(gated.entered.wait, 10)
        deadline = time.monotonic() + 0.01
        late = asyncio.ensure_future(s.run(sources(1, seed=10)[0], 5, deadline=deadline))
        # queued behind the held step, and the 10 ms deadline passes while it waits
        await until(lambda: s.stats.queued == 1 and time.monotonic() > deadline, "queued past the deadline")
        gated.gate.set()
        with pytest.raises(DeadlineExceeded):
            await late
        await blocker
        await s.aclose()
        assert s.stats.cached_tokens == 0 and s.stats.active_sequences == 0 and s.stats.queued == 0

    run(main())


def test_caps_queue_then_refuse(graphs: tuple[Seq2SeqTransformer, Any, Any]) -> None:
    model, encoder, step = graphs
    gated = GatedRunner(step)

    async def main() -> None:
        s = scheduler((model, encoder, gated), max_active_sequences=2, max_queue_size=3)
        s.start()
        gated.gate.clear()
        running = [asyncio.ensure_future(s.run(src, 6)) for src in sources(2, seed=11)]
        assert await asyncio.to_thread(gated.entered.wait, 10)  # two rows: the cap
        waiting = [asyncio.ensure_future(s.run(src, 6)) for src in sources(3, seed=12)]
        await until(lambda: s.stats.queued == 3, "three requests queued behind the cap")
        assert s.stats.queued == 3
        with pytest.raises(QueueFull, match="queue full"):
            await s.run(sources(1, seed=13)[0], 6)
        with pytest.raises(QueueFull, match="exceeds the scheduler's caps"):
            await s.run(sources(1, seed=13)[0], 6, beam_size=3)  # 3 rows can never fit 2
        gated.gate.set()
        results = await asyncio.gather(*running, *waiting)
        srcs = sources(2, seed=11) + sources(3, seed=12)
        assert results == [offline(model, src, 6, 1) for src in srcs]
        await s.aclose()

    run(main())


def test_close_finishes_accepted_sequences_then_refuses(graphs: tuple[Seq2SeqTransformer, Any, Any]) -> None:
    model, encoder, step = graphs
    srcs = sources(6, seed=21)
    gated = GatedRunner(step)

    async def main() -> list[list[int]]:
        s = scheduler((model, encoder, gated), max_active_sequences=3)  # three decode, three wait in the queue
        s.start()
        gated.gate.clear()  # the first step holds until every request is accepted
        pending = [asyncio.ensure_future(s.run(src, 25)) for src in srcs]
        assert await asyncio.to_thread(gated.entered.wait, 10)
        await until(lambda: gated.rows + s.stats.queued == 6, "every request accepted (decoding or queued)")
        gated.gate.set()
        await s.aclose(grace=30)
        with pytest.raises(QueueFull, match="shutting down"):
            await s.run(srcs[0], 5)
        return [p.result() for p in pending]  # all done by the time the drain returned

    assert run(main()) == [offline(model, src, 25, 1) for src in srcs]
