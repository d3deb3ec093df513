"""The translator task: texts checked and tokenized, decoded by the continuous scheduler (``scheduler.mode:
continuous``) or by request-level batching, unary or streamed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from transerve.constrained import Constraints
from transerve.server.backends.runner import GraphRunner
from transerve.server.engine.detokenizer import Detokenizer
from transerve.server.engine.document_plan import DocumentPlan, DocumentPlanner, TextLimits, check_text
from transerve.server.engine.documents import Segmented
from transerve.server.engine.glossary import Glossaries, GlossaryEntry, read_glossary_file
from transerve.server.engine.html_translate import PageLimits, translate_pages
from transerve.server.engine.loaded_model import Limits, LoadedModel
from transerve.server.engine.metrics import Metrics
from transerve.server.engine.model_config import ModelConfig, token_limit
from transerve.server.engine.scheduler import ContinuousScheduler, SchedulerCaps, SequenceRequest
from transerve.server.engine.scoring import SentenceReport, SentenceScorer, report_document
from transerve.server.engine.sentence_cache import CachedSentence, CacheKey, SentenceCache, SharedSentences
from transerve.server.engine.seq2seq import DecoderLayout, OrtSeq2Seq
from transerve.server.engine.static_decode import greedy_stream, run_jobs
from transerve.server.engine.translation_types import (
    NO_REPORT,
    DecodeOptions,
    Markup,
    ReportOptions,
    Segmentation,
    StreamPiece,
    TokenProgress,
    TranslateJob,
    TranslationResult,
    all_or_cancel,
    assemble,
)
from transerve.server.exceptions import ConfigError, DeadlineExceeded, RequestError

MAX_BEAM = 8
MAX_LENGTH_PENALTY = 10.0

log = logging.getLogger(__name__)


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
        self.scorer = None if config.scoring is None or "decoder_score" not in runners else SentenceScorer(
            runners["encoder"], runners["decoder_score"], self.layout, self.tokenizer, config.scoring.alignment_layer,
            runners.get("decoder_align"))
        own = read_glossary_file(entry / config.glossary) if config.glossary else []
        self.glossaries = Glossaries(own, self.tokenizer, english=config.documents.language == "en")
        self.page_limits = PageLimits(config.documents.max_document_chars, config.documents.max_document_sentences,
                                      config.documents.language)
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

    async def start(self, warm: bool = True) -> None:
        if self.scheduler is None:
            await super().start(warm)
        else:
            self.scheduler.start()
            if warm:
                await self.warm_up()

    async def aclose(self, grace: float) -> None:
        if self.scheduler is not None:
            await self.scheduler.aclose(grace)
        await super().aclose(grace)

    def encode(self, texts: list[str], field: str, prefix: tuple[int, ...] = ()) -> list[list[int]]:
        """``segmentation: whole``: each text one model input, refused when longer than the encoder takes."""
        self._check_count(texts, field)
        for i, text in enumerate(texts):
            check_text(text, f"{field}[{i}]", self.limits.max_text_chars, "the limit of")
        eos = self.layout.eos_id
        rows = [[*prefix, *e.ids, eos] for e in self.tokenizer.encode_batch(texts)]
        for i, row in enumerate(rows):
            if len(row) > self.config.max_input_tokens:
                raise RequestError(f"{field}[{i}]: {len(row)} tokens exceed max_input_tokens "
                                   f"{self.config.max_input_tokens}")
        return rows

    def _check_count(self, texts: list[str], field: str) -> None:
        if not 1 <= len(texts) <= self.config.max_batch_size:
            raise RequestError(f"{field}: {len(texts)} texts, the limit is 1 to {self.config.max_batch_size}")

    def _run_batch(self, payloads: list[TranslateJob]) -> list[list[list[int]]]:
        return run_jobs(self.seq2seq, payloads)

    def _options(self, max_new_tokens: int | None, beam_size: int | None, length_penalty: float | None,
                 glossary: Sequence[GlossaryEntry] = (), target_token: str | None = None) -> DecodeOptions:
        if max_new_tokens is not None and max_new_tokens > token_limit(self.config):
            raise RequestError(f"max_new_tokens: {max_new_tokens} exceeds the model's limit of "
                               f"{token_limit(self.config)} (max_new_tokens_limit)")
        beam = beam_size or self.config.beam_size
        if beam > MAX_BEAM:
            raise RequestError(f"beam_size: {beam} exceeds the limit of {MAX_BEAM}")
        penalty = self.config.generation.length_penalty if length_penalty is None else float(length_penalty)
        if not 0.0 <= penalty <= MAX_LENGTH_PENALTY:
            raise RequestError(f"length_penalty: {penalty} is outside 0 to {MAX_LENGTH_PENALTY}")
        token = None if target_token is None else self.tokenizer.token_to_id(target_token)
        if target_token is not None and token is None:
            raise RequestError(f"target_language: model {self.name!r} has no token {target_token!r} in its vocabulary")
        return DecodeOptions(max_new_tokens or None, beam, penalty, self.glossaries.for_request(glossary),
                             () if token is None else (token,))

    async def translate(self, texts: list[str], max_new_tokens: int | None, deadline: float | None,
                        field: str = "texts", beam_size: int | None = None, length_penalty: float | None = None,
                        segmentation: Segmentation = "sentences", use_cache: bool = True,
                        report: ReportOptions = NO_REPORT, glossary: Sequence[GlossaryEntry] = (),
                        markup: Markup = "text", target_token: str | None = None) -> list[TranslationResult]:
        """Each text translated: as a document (its sentences decoded together with every other sentence in
        flight, then put back with the text's own whitespace) or, with ``segmentation="whole"``, as one input.
        ``report``: each result's sentences scored and aligned (:mod:`scoring`); ``glossary``: terms the
        translations must use, beside the model's own (:mod:`glossary`); ``markup="html"``: each text an HTML
        page (:mod:`html_translate`); ``target_token``: a multilingual model's token for the target language."""
        o = self._options(max_new_tokens, beam_size, length_penalty, glossary, target_token)
        self._check_report(report, segmentation, markup)
        if segmentation == "whole":
            return await self._translate_whole(texts, field, o, deadline, report)
        self._check_count(texts, field)
        if deadline is not None and time.monotonic() > deadline:  # not answered late, even from the cache
            raise DeadlineExceeded("deadline passed before translating")
        if markup == "html":
            async def blocks(texts: list[str], fields: list[str], align: bool) -> list[TranslationResult]:
                aligned = ReportOptions(alignments=align and self.scorer is not None)
                return await self._documents(texts, fields, o, deadline, use_cache, aligned)

            return await translate_pages(texts, field, self.page_limits, blocks)
        return await self._documents(texts, [f"{field}[{i}]" for i in range(len(texts))], o, deadline, use_cache,
                                     report)

    def _check_report(self, report: ReportOptions, segmentation: Segmentation, markup: Markup) -> None:
        if markup == "html" and (report.wanted or segmentation == "whole"):
            raise RequestError("format: html returns the page, not sentence scores or alignments, and splits it "
                               "into sentences (no segmentation WHOLE)")
        if report.wanted and self.scorer is None:
            raise RequestError(f"{'scores' if report.scores else 'alignments'}: model {self.name!r} has no scoring "
                               "graph (decoder_score; entries exported before scores existed) — export it again")

    async def _documents(self, texts: list[str], fields: list[str], o: DecodeOptions, deadline: float | None,
                         use_cache: bool, report: ReportOptions) -> list[TranslationResult]:
        plans = [self.planner.plan_one(t, f, o.max_new_tokens, o.prefix) for t, f in zip(texts, fields, strict=True)]
        sentences = [s for p in plans for s in p.document.sentences]
        done = await self._sentences(sentences, [s for p in plans for s in p.sources],
                                     [b for p in plans for b in p.budgets], o, deadline, use_cache,
                                     [c for p, f in zip(plans, fields, strict=True)
                                      for c in o.constraints(p.document.sentences, f)])
        results, pieces = assemble(plans, done)
        if report.wanted:
            await self._report(results, [p.document for p in plans], [p.sources for p in plans], pieces, report)
        return results

    async def _translate_whole(self, texts: list[str], field: str, o: DecodeOptions, deadline: float | None,
                               report: ReportOptions) -> list[TranslationResult]:
        sources = self.encode(texts, field, o.prefix)
        ids = await self._decode(sources, [o.max_new_tokens or self.config.max_new_tokens] * len(sources), o,
                                 deadline, o.constraints(texts, field))
        outputs = [TranslationResult(r, t) for r, t in zip(ids, self.tokenizer.decode_batch(ids), strict=True)]
        if report.wanted:
            wholes = [Segmented(text, ((0, len(text)),)) for text in texts]
            await self._report(outputs, wholes, [[s] for s in sources], [[(r.ids, r.text)] for r in outputs], report)
        return outputs

    async def _report(self, results: list[TranslationResult], documents: list[Segmented],
                      sources: list[list[list[int]]], outputs: list[list[tuple[list[int], str]]],
                      report: ReportOptions) -> None:
        """Each result's sentence reports, scored off the event loop."""
        scorer = self.scorer
        assert scorer is not None

        def work() -> list[list[SentenceReport]]:
            return [report_document(scorer, d, s, o, report.alignments, report.scores)
                    for d, s, o in zip(documents, sources, outputs, strict=True)]

        for result, reports in zip(results, await asyncio.get_running_loop().run_in_executor(None, work),
                                   strict=True):
            result.sentences = reports

    async def _sentences(self, sentences: list[str], sources: list[list[int]], budgets: list[int],
                         o: DecodeOptions, deadline: float | None, use_cache: bool, constraints: list[Constraints]
                         ) -> list[CachedSentence]:
        """Each sentence's translation: from the cache or a decode already under way (:class:`SharedSentences`),
        else decoded; ``use_cache=False`` decodes every sentence afresh."""

        async def decode(indices: list[int]) -> list[CachedSentence]:
            ids = await self._decode([sources[i] for i in indices], [budgets[i] for i in indices], o, deadline,
                                     [constraints[i] for i in indices])
            return [CachedSentence(tuple(r), t) for r, t in zip(ids, self.tokenizer.decode_batch(ids), strict=True)]

        if not (use_cache and self.cache.enabled):
            return await decode(list(range(len(sentences))))
        keys = [CacheKey(s, b, o.beam_size, o.length_penalty, c.terms)
                for s, b, c in zip(sentences, budgets, constraints, strict=True)]
        return await self.shared.translate(keys, decode)

    async def _decode(self, sources: list[list[int]], budgets: list[int], o: DecodeOptions,
                      deadline: float | None, constraints: list[Constraints]) -> list[list[int]]:
        """Every source at once: into the continuous batch, or in request-level batches of at most
        ``max_batch_size`` (which the dynamic batcher joins with other requests'); a source with glossary terms
        decodes with the constrained beam (``o.beam_for``)."""
        if self.scheduler is not None:
            scheduler = self.scheduler
            return await all_or_cancel([scheduler.run(s, b, o.beam_for(c), o.length_penalty, deadline, c)
                                         for s, b, c in zip(sources, budgets, constraints, strict=True)])
        step, jobs, order = self.config.max_batch_size, [], []
        for beam in sorted({o.beam_for(c) for c in constraints}):
            mine = [i for i, c in enumerate(constraints) if o.beam_for(c) == beam]
            for at in range(0, len(mine), step):
                part = mine[at:at + step]
                order += part
                jobs.append(TranslateJob([sources[i] for i in part], [budgets[i] for i in part],
                                         replace(o, beam_size=beam), [constraints[i] for i in part]))
        chunks = await all_or_cancel([self.batcher.submit(j, size=len(j.sources), deadline=deadline) for j in jobs])
        out: list[list[int]] = [[] for _ in sources]
        for i, row in zip(order, (row for chunk in chunks for row in chunk), strict=True):
            out[i] = row
        return out

    async def warm_up(self) -> None:
        await self.translate(["warm up"], 2, None)

    async def stream(self, text: str, max_new_tokens: int | None, deadline: float | None,
                     beam_size: int | None = None, length_penalty: float | None = None,
                     segmentation: Segmentation = "sentences", use_cache: bool = True,
                     glossary: Sequence[GlossaryEntry] = (), markup: Markup = "text", target_token: str | None = None
                     ) -> AsyncIterator[StreamPiece]:
        """Text pieces as tokens are made, the last one with the final count (its piece may be empty); closing
        the iterator (a cancelled client) takes the sequences out of the batch at the next step. Beam search
        streams its result when it is final (a beam's tokens are not settled before). No piece ever splits a
        character (see :class:`Detokenizer`). A document of several sentences streams sentence by sentence, in
        order, each as soon as it and every earlier one are done (all decode together); the pieces join to the
        unary translation, whitespace included. An HTML page streams whole, when it is rendered."""
        if markup == "html":
            [page] = await self.translate([text], max_new_tokens, deadline, "text", beam_size, length_penalty,
                                          segmentation, use_cache, NO_REPORT, glossary, markup, target_token)
            yield StreamPiece(page.text, len(page.ids))
            return
        o = self._options(max_new_tokens, beam_size, length_penalty, glossary, target_token)
        if segmentation == "whole":
            source = self.encode([text], "text", o.prefix)[0]
            async for piece in self._stream_tokens(source, o.max_new_tokens or self.config.max_new_tokens, o,
                                                   deadline, o.constraints([text], "text")[0]):
                yield piece
            return
        plan = self.planner.plan_one(text, "text", o.max_new_tokens, o.prefix)
        document, made = plan.document, 0
        constraints = o.constraints(document.sentences, "text")
        if len(plan.sources) > 1:
            async for piece in self._stream_sentences(plan, o, deadline, use_cache, constraints):
                yield piece
            return
        if document.gap_before(0):
            yield StreamPiece(document.gap_before(0), 0)
        async for piece in self._stream_tokens(plan.sources[0], plan.budgets[0], o, deadline, constraints[0]):
            made = piece.tokens
            yield piece
        if document.tail():
            yield StreamPiece(document.tail(), made)

    async def _stream_sentences(self, plan: DocumentPlan, o: DecodeOptions, deadline: float | None,
                                use_cache: bool, constraints: list[Constraints]) -> AsyncIterator[StreamPiece]:
        sentences = plan.document.sentences
        tasks = [asyncio.ensure_future(self._sentences([sentences[i]], [plan.sources[i]], [plan.budgets[i]], o,
                                                       deadline, use_cache, [constraints[i]]))
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

    async def _stream_tokens(self, source: list[int], budget: int, o: DecodeOptions, deadline: float | None,
                             constraints: Constraints) -> AsyncIterator[StreamPiece]:
        pieces = Detokenizer(self.tokenizer)
        if self.scheduler is None:
            progress = self._static_stream(source, budget, o, deadline, constraints)
        else:
            progress = self._scheduled_stream(source, budget, o, deadline, constraints)
        async for step in progress:
            piece = pieces.update(step.ids, step.final)
            if piece or step.final:  # the final count goes out even when the last token added no text
                yield StreamPiece(piece, len(step.ids))

    async def _scheduled_stream(self, source: list[int], budget: int, o: DecodeOptions, deadline: float | None,
                                constraints: Constraints) -> AsyncIterator[TokenProgress]:
        assert self.scheduler is not None
        ids: list[int] = []
        async for event in self.scheduler.generate(source, budget, o.beam_for(constraints), o.length_penalty,
                                                   deadline, constraints=constraints):
            if event.final is not None:
                yield TokenProgress(event.final, True)
            else:
                ids += event.tokens
                yield TokenProgress(list(ids), False)

    async def _static_stream(self, source: list[int], budget: int, o: DecodeOptions, deadline: float | None,
                             constraints: Constraints) -> AsyncIterator[TokenProgress]:
        """Greedy: one sequence stepped alone. A beam search settles its tokens only at the end: it decodes with
        the batch and streams its result whole."""
        beam = o.beam_for(constraints)
        if beam == 1:
            async for progress in greedy_stream(self.seq2seq, source, budget, deadline):
                yield progress
            return
        job = TranslateJob([source], [budget], replace(o, beam_size=beam), [constraints])
        ids = await self.batcher.submit(job, size=1, deadline=deadline)
        yield TokenProgress(ids[0], True)


def load_tokenizer(path: Path) -> Tokenizer:
    """The entry's tokenizer; a missing or unreadable file is a config error naming it (the tokenizers library
    says only "No such file or directory")."""
    if not path.is_file():
        raise ConfigError(f"{path}: tokenizer file missing")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise ConfigError(f"{path}: not a readable tokenizer ({(str(e).splitlines() or [''])[0][:200]})") from None
