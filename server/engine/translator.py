"""The translator task: texts checked and tokenized, decoded by the continuous scheduler (``scheduler.mode:
continuous``) or by request-level batching, unary or streamed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer
from transerve.server.backends.runner import GraphRunner
from transerve.server.engine.detokenizer import Detokenizer
from transerve.server.engine.document_plan import DocumentPlan, DocumentPlanner, TextLimits, check_text
from transerve.server.engine.loaded_model import Limits, LoadedModel
from transerve.server.engine.metrics import Metrics
from transerve.server.engine.model_config import ModelConfig, token_limit
from transerve.server.engine.scheduler import ContinuousScheduler, SchedulerCaps, SequenceRequest
from transerve.server.engine.sentence_cache import CachedSentence, CacheKey, SentenceCache, SharedSentences
from transerve.server.engine.seq2seq import DecoderLayout, OrtSeq2Seq, pad_ids
from transerve.server.exceptions import ConfigError, DeadlineExceeded, RequestError

MAX_BEAM = 8
MAX_LENGTH_PENALTY = 10.0
Segmentation = Literal["sentences", "whole"]  # a text split into sentences (documents), or one model input

log = logging.getLogger(__name__)


@dataclass
class TranslationResult:
    ids: list[int]
    text: str


@dataclass(frozen=True)
class DecodeOptions:
    """A request's decoding settings, validated against the model's limits (``max_new_tokens`` None: each
    sentence's budget is the model's rule, :mod:`document_plan`)."""

    max_new_tokens: int | None
    beam_size: int
    length_penalty: float


@dataclass(frozen=True)
class TranslateJob:
    """Sources of one request (or a slice of a document's sentences) for request-level batching
    (``scheduler.mode: static``), each with its budget."""

    sources: list[list[int]]
    budgets: list[int]
    options: DecodeOptions


@dataclass(frozen=True)
class StreamPiece:
    """New text of a streamed translation and the tokens made so far (the last piece may be empty)."""

    text: str
    tokens: int


@dataclass(frozen=True)
class TokenProgress:
    ids: list[int]  # every token so far
    final: bool


class TranslatorModel(LoadedModel):
    """Continuous batching through :class:`ContinuousScheduler` (``scheduler.mode: continuous``, the default when
    the entry has ``decoder_step_ragged``), else request-level batching: sources of concurrent requests decoded
    together by the dynamic batcher."""

    def __init__(self, config: ModelConfig, version: str, backend: str, runners: dict[str, GraphRunner],
                 entry: Path, on_batch: Any, limits: Limits, metrics: Metrics | None = None) -> None:
        super().__init__(config, version, backend, runners, on_batch)
        assert config.decoder is not None and config.tokenizer is not None  # checked by ModelConfig
        self.tokenizer = load_tokenizer(entry / config.tokenizer)
        d = config.decoder
        self.layout = DecoderLayout(d.num_layers, d.num_heads, d.head_dim, d.bos_id, d.eos_id, d.pad_id)
        self.rules = config.generation.rules(d.eos_id)
        step = runners.get("decoder_step_ragged") or runners["decoder_step"]  # the ragged step decodes both ways
        self.seq2seq = OrtSeq2Seq(runners["encoder"], step, self.layout, self.rules)
        self.limits = limits
        self.planner = DocumentPlanner(self.tokenizer, d.eos_id, TextLimits(
            config.documents.max_document_chars, config.documents.max_document_sentences, config.max_input_tokens,
            config.max_new_tokens, token_limit(config), config.documents.language))
        self.cache = SentenceCache(int(config.translation_cache_mb * 2**20))
        self.shared = SharedSentences(self.cache)
        self.scheduler: ContinuousScheduler | None = None
        if config.scheduler.mode == "continuous":
            if "decoder_step_ragged" in runners:
                self.scheduler = self._make_scheduler(metrics)
            else:
                log.warning("%s: no decoder_step_ragged graph (exported by an older transerve?): request-level "
                            "batching instead of continuous batching", self.name)

    def _make_scheduler(self, metrics: Metrics | None) -> ContinuousScheduler:
        c, layout = self.config, self.layout
        bound = c.batching.max_queue_time_ms
        caps = SchedulerCaps(c.scheduler.max_active_sequences, c.scheduler.max_cached_tokens,
                             c.batching.max_queue_size, c.scheduler.max_encode_batch,
                             None if bound is None else bound / 1000)

        def finished(request: SequenceRequest) -> None:
            if metrics is not None:
                metrics.request_tokens.labels(self.name).observe(len(request.tokens))
                if request.first_token_at is not None:
                    metrics.time_to_first_token.labels(self.name).observe(request.first_token_at - request.enqueued)

        scheduler = ContinuousScheduler.over_graphs(self.runners["encoder"], self.runners["decoder_step_ragged"],
                                                    layout, caps, name=self.name, on_finish=finished,
                                                    rules=self.rules)
        if metrics is not None:
            stats = scheduler.stats
            metrics.active_sequences.labels(self.name).set_function(lambda: stats.active_sequences)
            metrics.cached_tokens.labels(self.name).set_function(lambda: stats.cached_tokens)
            metrics.cache_slots.labels(self.name).set_function(lambda: stats.cache_slots)
            metrics.tokens_per_second.labels(self.name).set_function(lambda: stats.tokens_per_second)
        return scheduler

    def observe(self, metrics: Metrics) -> None:
        super().observe(metrics)
        if self.scheduler is not None:
            stats = self.scheduler.stats
            metrics.queue_length.labels(self.name).set_function(lambda: stats.queued)
            self.scheduler.on_drop = lambda reason, count: metrics.on_drop(self.name, reason, count)
        counters = {kind: metrics.translation_cache.labels(self.name, kind) for kind in ("hit", "miss", "eviction")}
        self.cache.on_event = lambda kind, count: counters[kind].inc(count)
        cache = self.cache
        metrics.translation_cache_bytes.labels(self.name).set_function(lambda: cache.bytes)

    async def start(self) -> None:
        if self.scheduler is None:
            await super().start()
        else:
            self.scheduler.start()
            await self.warm_up()

    async def aclose(self, grace: float) -> None:
        if self.scheduler is not None:
            await self.scheduler.aclose(grace)
        await super().aclose(grace)

    def encode(self, texts: list[str], field: str) -> list[list[int]]:
        """``segmentation: whole``: each text one model input, refused when longer than the encoder takes."""
        self._check_count(texts, field)
        for i, text in enumerate(texts):
            check_text(text, f"{field}[{i}]", self.limits.max_text_chars, "the limit of")
        eos = self.layout.eos_id
        rows = [[*e.ids, eos] for e in self.tokenizer.encode_batch(texts)]
        for i, row in enumerate(rows):
            if len(row) > self.config.max_input_tokens:
                raise RequestError(f"{field}[{i}]: {len(row)} tokens exceed max_input_tokens "
                                   f"{self.config.max_input_tokens}")
        return rows

    def _check_count(self, texts: list[str], field: str) -> None:
        if not 1 <= len(texts) <= self.config.max_batch_size:
            raise RequestError(f"{field}: {len(texts)} texts, the limit is 1 to {self.config.max_batch_size}")

    def _run_batch(self, payloads: list[TranslateJob]) -> list[list[list[int]]]:
        """Requests with the same beam search settings decode together; each keeps its own budget."""
        results: dict[int, list[list[int]]] = {}
        for beam, penalty in sorted({(p.options.beam_size, p.options.length_penalty) for p in payloads}):
            group = [i for i, p in enumerate(payloads)
                     if (p.options.beam_size, p.options.length_penalty) == (beam, penalty)]
            rows = [r for i in group for r in payloads[i].sources]
            budgets = [b for i in group for b in payloads[i].budgets]
            ids, mask = pad_ids(rows, self.layout.pad_id)
            out = self.seq2seq.generate(ids, mask, budgets, beam_size=beam, length_penalty=penalty)
            start = 0
            for i in group:
                results[i] = out[start:start + len(payloads[i].sources)]
                start += len(payloads[i].sources)
        return [results[i] for i in range(len(payloads))]

    def _options(self, max_new_tokens: int | None, beam_size: int | None, length_penalty: float | None
                 ) -> DecodeOptions:
        if max_new_tokens is not None and max_new_tokens > token_limit(self.config):
            raise RequestError(f"max_new_tokens: {max_new_tokens} exceeds the model's limit of "
                               f"{token_limit(self.config)} (max_new_tokens_limit)")
        beam = beam_size or self.config.beam_size
        if beam > MAX_BEAM:
            raise RequestError(f"beam_size: {beam} exceeds the limit of {MAX_BEAM}")
        penalty = self.config.generation.length_penalty if length_penalty is None else float(length_penalty)
        if not 0.0 <= penalty <= MAX_LENGTH_PENALTY:
            raise RequestError(f"length_penalty: {penalty} is outside 0 to {MAX_LENGTH_PENALTY}")
        return DecodeOptions(max_new_tokens or None, beam, penalty)

    async def translate(self, texts: list[str], max_new_tokens: int | None, deadline: float | None,
                        field: str = "texts", beam_size: int | None = None, length_penalty: float | None = None,
                        segmentation: Segmentation = "sentences", use_cache: bool = True) -> list[TranslationResult]:
        """Each text translated: as a document (its sentences decoded together with every other sentence in
        flight, then put back with the text's own whitespace) or, with ``segmentation="whole"``, as one input."""
        o = self._options(max_new_tokens, beam_size, length_penalty)
        if segmentation == "whole":
            sources = self.encode(texts, field)
            ids = await self._decode(sources, [o.max_new_tokens or self.config.max_new_tokens] * len(sources), o,
                                     deadline)
            return [TranslationResult(r, t) for r, t in zip(ids, self.tokenizer.decode_batch(ids), strict=True)]
        self._check_count(texts, field)
        if deadline is not None and time.monotonic() > deadline:  # not answered late, even from the cache
            raise DeadlineExceeded("deadline passed before translating")
        plans = self.planner.plan(texts, field, o.max_new_tokens)
        done = await self._sentences([s for p in plans for s in p.document.sentences],
                                     [s for p in plans for s in p.sources], [b for p in plans for b in p.budgets],
                                     o, deadline, use_cache)
        results, start = [], 0
        for plan in plans:
            mine = done[start:start + len(plan.sources)]
            results.append(TranslationResult([t for m in mine for t in m.ids],
                                             plan.document.reassemble([m.text for m in mine])))
            start += len(plan.sources)
        return results

    async def _sentences(self, sentences: list[str], sources: list[list[int]], budgets: list[int],
                         o: DecodeOptions, deadline: float | None, use_cache: bool) -> list[CachedSentence]:
        """Each sentence's translation: from the cache or a decode already under way (:class:`SharedSentences`),
        else decoded; ``use_cache=False`` decodes every sentence afresh."""

        async def decode(indices: list[int]) -> list[CachedSentence]:
            ids = await self._decode([sources[i] for i in indices], [budgets[i] for i in indices], o, deadline)
            return [CachedSentence(tuple(r), t) for r, t in zip(ids, self.tokenizer.decode_batch(ids), strict=True)]

        if not (use_cache and self.cache.enabled):
            return await decode(list(range(len(sentences))))
        keys = [CacheKey(s, b, o.beam_size, o.length_penalty) for s, b in zip(sentences, budgets, strict=True)]
        return await self.shared.translate(keys, decode)

    async def _decode(self, sources: list[list[int]], budgets: list[int], o: DecodeOptions,
                      deadline: float | None) -> list[list[int]]:
        """Every source at once: into the continuous batch, or in request-level batches of at most
        ``max_batch_size`` (which the dynamic batcher joins with other requests')."""
        if self.scheduler is not None:
            scheduler = self.scheduler
            return await _all_or_cancel([scheduler.run(s, b, o.beam_size, o.length_penalty, deadline)
                                         for s, b in zip(sources, budgets, strict=True)])
        step = self.config.max_batch_size
        chunks = await _all_or_cancel([
            self.batcher.submit(TranslateJob(sources[i:i + step], budgets[i:i + step], o),
                                size=len(sources[i:i + step]), deadline=deadline)
            for i in range(0, len(sources), step)])
        return [row for chunk in chunks for row in chunk]

    async def warm_up(self) -> None:
        await self.translate(["warm up"], 2, None)

    async def stream(self, text: str, max_new_tokens: int | None, deadline: float | None,
                     beam_size: int | None = None, length_penalty: float | None = None,
                     segmentation: Segmentation = "sentences", use_cache: bool = True) -> AsyncIterator[StreamPiece]:
        """Text pieces as tokens are made, the last one with the final count (its piece may be empty); closing
        the iterator (a cancelled client) takes the sequences out of the batch at the next step. Beam search
        streams its result when it is final (a beam's tokens are not settled before). No piece ever splits a
        character (see :class:`Detokenizer`). A document of several sentences streams sentence by sentence, in
        order, each as soon as it and every earlier one are done (all decode together); the pieces join to the
        unary translation, whitespace included."""
        o = self._options(max_new_tokens, beam_size, length_penalty)
        if segmentation == "whole":
            source = self.encode([text], "text")[0]
            async for piece in self._stream_tokens(source, o.max_new_tokens or self.config.max_new_tokens, o,
                                                   deadline):
                yield piece
            return
        plan = self.planner.plan_one(text, "text", o.max_new_tokens)
        document, made = plan.document, 0
        if len(plan.sources) > 1:
            async for piece in self._stream_sentences(plan, o, deadline, use_cache):
                yield piece
            return
        if document.gap_before(0):
            yield StreamPiece(document.gap_before(0), 0)
        async for piece in self._stream_tokens(plan.sources[0], plan.budgets[0], o, deadline):
            made = piece.tokens
            yield piece
        if document.tail():
            yield StreamPiece(document.tail(), made)

    async def _stream_sentences(self, plan: DocumentPlan, o: DecodeOptions, deadline: float | None,
                                use_cache: bool) -> AsyncIterator[StreamPiece]:
        sentences = plan.document.sentences
        tasks = [asyncio.ensure_future(self._sentences([sentences[i]], [plan.sources[i]], [plan.budgets[i]], o,
                                                       deadline, use_cache))
                 for i in range(len(sentences))]
        made = 0
        try:
            for i, task in enumerate(tasks):
                one = (await task)[0]
                made += len(one.ids)
                yield StreamPiece(plan.document.gap_before(i) + one.text, made)
            yield StreamPiece(plan.document.tail(), made)
        finally:
            for task in tasks:
                task.cancel()

    async def _stream_tokens(self, source: list[int], budget: int, o: DecodeOptions, deadline: float | None
                             ) -> AsyncIterator[StreamPiece]:
        pieces = Detokenizer(self.tokenizer)
        if self.scheduler is None:
            progress = self._static_stream(source, budget, o, deadline)
        else:
            progress = self._scheduled_stream(source, budget, o, deadline)
        async for step in progress:
            piece = pieces.update(step.ids, step.final)
            if piece or step.final:  # the final count goes out even when the last token added no text
                yield StreamPiece(piece, len(step.ids))

    async def _scheduled_stream(self, source: list[int], budget: int, o: DecodeOptions, deadline: float | None
                                ) -> AsyncIterator[TokenProgress]:
        assert self.scheduler is not None
        ids: list[int] = []
        async for event in self.scheduler.generate(source, budget, o.beam_size, o.length_penalty, deadline):
            if event.final is not None:
                yield TokenProgress(event.final, True)
            else:
                ids += event.tokens
                yield TokenProgress(list(ids), False)

    async def _static_stream(self, source: list[int], budget: int, o: DecodeOptions, deadline: float | None
                             ) -> AsyncIterator[TokenProgress]:
        """Greedy: one sequence stepped alone (request-level mode has no shared step to join). A beam search
        settles its tokens only at the end: it decodes with the batch and streams its result whole."""
        if o.beam_size > 1:
            ids = await self.batcher.submit(TranslateJob([source], [budget], o), size=1, deadline=deadline)
            yield TokenProgress(ids[0], True)
            return
        s2s, loop, layout = self.seq2seq, asyncio.get_running_loop(), self.layout
        ids, mask = pad_ids([source], layout.pad_id)
        cross = await loop.run_in_executor(None, s2s.encode, ids, mask)
        past, last = s2s.empty_cache(1), np.array([layout.bos_id])
        tokens: list[int] = []
        for made in range(budget):
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("deadline passed while decoding")
            logits, past = await loop.run_in_executor(None, s2s.step, last, mask, past, cross)
            history = [[layout.bos_id, *tokens]] if self.rules.needs_history else None
            token = int(self.rules.greedy_pick(logits, history, np.array([made + 1 == budget]),
                                               layout.eos_id)[0])
            if token == layout.eos_id:
                break
            tokens.append(token)
            last = np.array([token])
            yield TokenProgress(list(tokens), False)
        yield TokenProgress(tokens, True)


async def _all_or_cancel(coros: list[Any]) -> list[Any]:
    """Like gather, but one failure cancels the rest (their sequences leave the batch)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def load_tokenizer(path: Path) -> Tokenizer:
    """The entry's tokenizer; a missing or unreadable file is a config error naming it (the tokenizers library
    says only "No such file or directory")."""
    if not path.is_file():
        raise ConfigError(f"{path}: tokenizer file missing")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise ConfigError(f"{path}: not a readable tokenizer ({(str(e).splitlines() or [''])[0][:200]})") from None
