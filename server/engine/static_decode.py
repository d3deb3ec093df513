"""Request-level decoding (``scheduler.mode: static``, or an entry without the ragged step): the dynamic batcher's
batches of sentences decoded together, and one greedy sequence stepped alone for a stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
from transerve.constrained import Constraints, new_beams
from transerve.server.engine.seq2seq import OrtSeq2Seq, pad_ids
from transerve.server.engine.translation_types import TokenProgress, TranslateJob
from transerve.server.exceptions import DeadlineExceeded


def run_jobs(seq2seq: OrtSeq2Seq, payloads: list[TranslateJob]) -> list[list[list[int]]]:
    """Jobs with the same beam search settings decode together; each source keeps its own budget and glossary
    terms (a source with terms runs a constrained search beside the others)."""
    results: dict[int, list[list[int]]] = {}
    pad_id = seq2seq.layout.pad_id
    for beam, penalty in sorted({(p.options.beam_size, p.options.length_penalty) for p in payloads}):
        group = [i for i, p in enumerate(payloads)
                 if (p.options.beam_size, p.options.length_penalty) == (beam, penalty)]
        rows = [r for i in group for r in payloads[i].sources]
        budgets = [b for i in group for b in payloads[i].budgets]
        terms: list[Constraints | None] = []
        for i in group:
            terms += payloads[i].constraints or [None] * len(payloads[i].sources)
        ids, mask = pad_ids(rows, pad_id)
        if any(terms):
            lay = seq2seq.layout
            beams = [new_beams(beam, lay.bos_id, lay.eos_id, b, penalty, seq2seq.rules, c)
                     for b, c in zip(budgets, terms, strict=True)]
            out = seq2seq.generate(ids, mask, budgets, beam_size=beam, length_penalty=penalty, beams=beams)
        else:
            out = seq2seq.generate(ids, mask, budgets, beam_size=beam, length_penalty=penalty)
        start = 0
        for i in group:
            results[i] = out[start:start + len(payloads[i].sources)]
            start += len(payloads[i].sources)
    return [results[i] for i in range(len(payloads))]


async def greedy_stream(seq2seq: OrtSeq2Seq, source: list[int], budget: int, deadline: float | None
                        ) -> AsyncIterator[TokenProgress]:
    """One sequence stepped alone (request-level mode has no shared step to join), each step off the loop."""
    loop, layout, rules = asyncio.get_running_loop(), seq2seq.layout, seq2seq.rules
    ids, mask = pad_ids([source], layout.pad_id)
    cross = await loop.run_in_executor(None, seq2seq.encode, ids, mask)
    past, last = seq2seq.empty_cache(1), np.array([layout.bos_id])
    tokens: list[int] = []
    for made in range(budget):
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("deadline passed while decoding")
        logits, past = await loop.run_in_executor(None, seq2seq.step, last, mask, past, cross)
        history = [[layout.bos_id, *tokens]] if rules.needs_history else None
        token = int(rules.greedy_pick(logits, history, np.array([made + 1 == budget]), layout.eos_id)[0])
        if token == layout.eos_id:
            break
        tokens.append(token)
        last = np.array([token])
        yield TokenProgress(list(tokens), False)
    yield TokenProgress(tokens, True)


__all__ = ["greedy_stream", "run_jobs"]
