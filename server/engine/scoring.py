"""How sure the model was of each translated sentence, and which source words each target word came from.

Both come from one teacher-forced pass of the entry's ``decoder_score`` graph over the finished translation
(its tokens and the closing EOS): each token's log-probability under the model, and every decoder layer's
cross-attention. Scoring after decoding, not during it, costs one parallel pass per sentence instead of work on
every step of every request, keeps the searches (greedy, beam, constrained) free of bookkeeping, and scores a
cached sentence as well as a fresh one. It runs only when a request asks (``scores`` / ``alignments``).

- ``mean_log_prob``: the mean of the tokens' log-probabilities, EOS included — comparable across lengths;
  ``min_token_prob``: the least likely token's probability (one bad word shows there, not in the mean).
- Alignments: each target token points at the source token its ``alignment_layer`` (averaged over heads)
  attends to most (Garg et al. 2019 take the penultimate layer); tokens are grouped into words — runs of
  letters and digits, each other visible character a word of its own (so "forty-two." is four: an HTML tag
  around "two" or before the full stop can follow it) — and each (source word, target word) pair is reported
  once, as character spans.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer
from transerve.server.backends.runner import GraphRunner
from transerve.server.engine.documents import Segmented
from transerve.server.engine.seq2seq import DecoderLayout, pad_ids

WORD = re.compile(r"\w+|[^\w\s]")
SCORE_BATCH = 32  # sentences per pass: bounds the [N, T, V] logits the graph holds


@dataclass(frozen=True)
class WordAlignment:
    source: tuple[int, int]  # character span in the sentence
    target: tuple[int, int]  # character span in its translation


@dataclass(frozen=True)
class SentenceScore:
    mean_log_prob: float
    min_token_prob: float
    alignments: tuple[WordAlignment, ...] = ()


@dataclass(frozen=True)
class ScoredSentence:
    """One sentence to score: its source ids (EOS last) and text, and its translation's ids (no EOS) and text."""

    source: Sequence[int]
    source_text: str
    output: Sequence[int]
    output_text: str


class SentenceScorer:
    """``graph``: ``decoder_score`` (log-probabilities and every layer's attention); ``align_graph``:
    ``decoder_align`` (the alignment layer's attention alone, about a third of the work), used for alignments
    without scores when it was exported for this ``alignment_layer``."""

    def __init__(self, encoder: GraphRunner, graph: GraphRunner, layout: DecoderLayout, tokenizer: Tokenizer,
                 alignment_layer: int, align_graph: GraphRunner | None = None) -> None:
        self.encoder, self.graph, self.layout, self.tokenizer = encoder, graph, layout, tokenizer
        self.alignment_layer = alignment_layer
        self._align_candidate, self._align_checked = align_graph, False

    @property
    def align_graph(self) -> GraphRunner | None:
        """``decoder_align`` when it was exported for this ``alignment_layer`` (checked on first use: reading
        its inputs makes its session)."""
        if not self._align_checked:
            exported_for = sum(n.startswith("cross_k_") for n in _input_names(self._align_candidate)) - 1
            if exported_for != self.alignment_layer:
                self._align_candidate = None
            self._align_checked = True
        return self._align_candidate

    def score(self, sentences: Sequence[ScoredSentence], align: bool, scores: bool = True) -> list[SentenceScore]:
        """Each sentence's scores (zero when not ``scores``) and, when ``align``, its word alignments."""
        out: list[SentenceScore] = []
        for start in range(0, len(sentences), SCORE_BATCH):
            batch = sentences[start:start + SCORE_BATCH]
            if scores or self.align_graph is None:
                out += self._score_batch(batch, align)
            else:
                attention = self.aligned([s.source for s in batch], [s.output for s in batch])
                out += [SentenceScore(0.0, 0.0, self._align(s, attention[i])) for i, s in enumerate(batch)]
        return out

    def _inputs(self, sources: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
                ) -> tuple[dict[str, np.ndarray], list[list[int]], list[np.ndarray]]:
        """The feeds both graphs share (decoder inputs, source mask, cross K/V), the targets, the cross K/V."""
        lay = self.layout
        ids, mask = pad_ids(sources, lay.pad_id)
        cross = self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})
        targets = [[*o, lay.eos_id] for o in outputs]
        width = max(2, max(len(t) for t in targets))  # the graphs take T ≥ 2 (export_score)
        inputs = np.full((len(targets), width), lay.pad_id, np.int64)
        for i, t in enumerate(targets):
            inputs[i, :len(t)] = [lay.bos_id, *t[:-1]]
        return {"input_ids": inputs, "attention_mask": mask}, targets, cross

    def aligned(self, sources: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> np.ndarray:
        """The alignment layer's cross-attention ``[N, T, S]`` from ``decoder_align``."""
        assert self.align_graph is not None
        feeds, _, cross = self._inputs(sources, outputs)
        names = [f"cross_{k}_{i}" for i in range(self.alignment_layer + 1) for k in ("k", "v")]
        return self.align_graph.run(None, {**feeds, **dict(zip(names, cross, strict=False))})[0]

    def teacher_forced(self, sources: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
                       ) -> tuple[list[np.ndarray], np.ndarray]:
        """Each output's token log-probabilities (EOS appended and scored) and the alignment layer's
        cross-attention ``[N, T, S]`` (rows padded)."""
        feeds, targets, cross = self._inputs(sources, outputs)
        target_ids = np.full_like(feeds["input_ids"], self.layout.pad_id)
        for i, t in enumerate(targets):
            target_ids[i, :len(t)] = t
        names = [f"cross_{k}_{i}" for i in range(self.layout.num_layers) for k in ("k", "v")]
        log_probs, attention = self.graph.run(None, {**feeds, "target_ids": target_ids,
                                                     **dict(zip(names, cross, strict=True))})
        return [log_probs[i, :len(t)] for i, t in enumerate(targets)], attention[:, self.alignment_layer]

    def _score_batch(self, batch: Sequence[ScoredSentence], align: bool) -> list[SentenceScore]:
        token_log_probs, attention = self.teacher_forced([s.source for s in batch], [s.output for s in batch])
        scores = []
        for i, (sentence, lp) in enumerate(zip(batch, token_log_probs, strict=True)):
            pairs = self._align(sentence, attention[i]) if align else ()
            scores.append(SentenceScore(float(lp.mean()), float(np.exp(lp.min())), pairs))
        return scores

    def _align(self, sentence: ScoredSentence, attention: np.ndarray) -> tuple[WordAlignment, ...]:
        """Word pairs from each target token's most attended source token (EOS on either side left out)."""
        source_words = _token_words(sentence.source_text, self.tokenizer.encode(sentence.source_text).offsets)
        target_words = _token_words(sentence.output_text, self._target_offsets(sentence.output, sentence.output_text))
        real = min(len(source_words), len(sentence.source) - 1)
        if real <= 0:
            return ()
        pairs: dict[tuple[tuple[int, int], tuple[int, int]], None] = {}
        for t, target in enumerate(target_words):
            source = source_words[int(attention[t, :real].argmax())]
            if target is not None and source is not None:
                pairs[(source, target)] = None
        return tuple(WordAlignment(s, t) for s, t in sorted(pairs, key=lambda p: (p[1], p[0])))

    def _target_offsets(self, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
        """Each output token's span in its decoded text: the growth of the decoded prefix (clamped, since a
        decoder may tidy spaces differently once more text follows)."""
        prefixes = self.tokenizer.decode_batch([list(ids[:i + 1]) for i in range(len(ids))]) if ids else []
        spans, end = [], 0
        for prefix in prefixes:
            new_end = min(max(end, len(prefix)), len(text))
            spans.append((end, new_end))
            end = new_end
        return spans


def _input_names(runner: object) -> list[str]:
    """A runner's input names (an ORT session's ``get_inputs``, a GraphRunner's ``input_names``)."""
    if runner is None:
        return []
    names = getattr(runner, "input_names", None)
    return list(names) if names is not None else [i.name for i in runner.get_inputs()]  # type: ignore[attr-defined]


def _token_words(text: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int] | None]:
    """For each token span, the span of the word (:data:`WORD`) its first visible character is
    in; None for a token that covers only spaces or nothing."""
    words = [m.span() for m in WORD.finditer(text)]
    starts = [w[0] for w in words]
    out: list[tuple[int, int] | None] = []
    for start, end in offsets:
        visible = next((i for i in range(start, end) if not text[i].isspace()), None)
        if visible is None:
            out.append(None)
            continue
        index = int(np.searchsorted(starts, visible, side="right")) - 1
        out.append(words[index] if index >= 0 and words[index][0] <= visible < words[index][1] else None)
    return out


@dataclass(frozen=True)
class SentenceReport:
    """One sentence of a translated text: where it is in the text and its translation in the result, its score,
    and its word alignments as spans of the whole text and the whole translation."""

    source: tuple[int, int]
    target: tuple[int, int]
    score: SentenceScore


def report_document(scorer: SentenceScorer, document: Segmented, sources: Sequence[Sequence[int]],
                    outputs: Sequence[tuple[Sequence[int], str]], align: bool, scores: bool = True
                    ) -> list[SentenceReport]:
    """Every sentence of one translated document: its spans, score and (when ``align``) word alignments."""
    _, target_spans = document.reassemble_spans([text for _, text in outputs])
    scored = scorer.score([ScoredSentence(src, sentence, ids, text) for src, sentence, (ids, text)
                           in zip(sources, document.sentences, outputs, strict=True)], align, scores)
    return [SentenceReport(span, target, shifted(score, span[0], target[0]))
            for span, target, score in zip(document.spans, target_spans, scored, strict=True)]


def shifted(score: SentenceScore, source_at: int, target_at: int) -> SentenceScore:
    """``score`` with its alignments moved from sentence offsets to document offsets."""
    moved = tuple(WordAlignment((a.source[0] + source_at, a.source[1] + source_at),
                                (a.target[0] + target_at, a.target[1] + target_at)) for a in score.alignments)
    return SentenceScore(score.mean_log_prob, score.min_token_prob, moved)


__all__ = ["ScoredSentence", "SentenceReport", "SentenceScore", "SentenceScorer", "WordAlignment", "report_document",
           "shifted"]
