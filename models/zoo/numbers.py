"""``mt-en-de-numbers``: the translator trained on English → German number words."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import sacrebleu
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor, nn
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.models.translator import SPECIAL_TOKENS, TextTranslator, pad_batch
from transerve.models.zoo.numbers_data import NumbersDataConfig, Pair, make_split
from transerve.models.zoo.training import TrainConfig, seed_everything, train


@dataclass
class NumbersRecipe:
    """Everything that decides the trained weights (hashed for the zoo cache)."""

    data: NumbersDataConfig = field(default_factory=NumbersDataConfig)
    # Small enough that BPE keeps German compounds in morphemes (drei|hundert|zwei|und|vier|zig),
    # which is what lets the model compose numbers it never saw.
    vocab_size: int = 100
    model: TransformerConfig = field(default_factory=lambda: TransformerConfig(
        vocab_size=100, d_model=128, num_heads=4, num_encoder_layers=3, num_decoder_layers=3, ffn_dim=256,
        dropout=0.1, max_len=64))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=6, batch_size=128, lr=2e-3))
    max_new_tokens: int = 40


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Joint BPE over both languages; Metaspace keeps spaces so decoding restores the exact text."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                       show_progress=False))
    return tok


def encode_pairs(tok: Tokenizer, pairs: Sequence[Pair], eos_id: int) -> list[tuple[list[int], list[int]]]:
    src = tok.encode_batch([s for s, _ in pairs])
    tgt = tok.encode_batch([t for _, t in pairs])
    return [([*s.ids, eos_id], [*t.ids, eos_id]) for s, t in zip(src, tgt, strict=True)]


def length_bucketed(examples: list[tuple[list[int], list[int]]], batch_size: int,
                    rng: random.Random) -> list[list[int]]:
    """Batches of similar source length (little padding), in random order."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = batch_size * 32
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i:i + chunk], key=lambda j: len(examples[j][0]))
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def evaluate(translator: TextTranslator, pairs: Sequence[Pair], max_new_tokens: int,
             batch_size: int = 256) -> dict[str, float]:
    hyps: list[str] = []
    for i in range(0, len(pairs), batch_size):
        hyps += translator.translate([s for s, _ in pairs[i:i + batch_size]], max_new_tokens)
    refs = [t for _, t in pairs]
    exact = sum(h == r for h, r in zip(hyps, refs, strict=True)) / max(1, len(refs))
    # German number words are single compounds: character-level BLEU-4 is the informative variant.
    bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize="char").score
    return {"exact_match": exact, "bleu": round(bleu, 2)}


def build_mt_numbers(recipe: NumbersRecipe | None = None) -> tuple[TextTranslator, dict]:
    recipe = recipe or NumbersRecipe()
    train_pairs, test_pairs = make_split(recipe.data)
    seed_everything(recipe.train.seed)
    tok = train_tokenizer([t for p in train_pairs for t in p], recipe.vocab_size)
    cfg = TransformerConfig(**{**recipe.model.__dict__, "vocab_size": tok.get_vocab_size()})
    model = Seq2SeqTransformer(cfg)
    examples = encode_pairs(tok, train_pairs, cfg.eos_id)
    rng = random.Random(recipe.train.seed)
    steps = (len(examples) + recipe.train.batch_size - 1) // recipe.train.batch_size

    def batches(epoch: int) -> Iterator[tuple[Tensor, ...]]:
        for idx in length_bucketed(examples, recipe.train.batch_size, rng):
            src, keep = pad_batch([examples[i][0] for i in idx], cfg.pad_id)
            tgt, _ = pad_batch([[cfg.bos_id] + examples[i][1] for i in idx], cfg.pad_id)
            yield src, keep, tgt

    def loss_fn(m: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        src, keep, tgt = batch
        logits = m(src, keep, tgt[:, :-1])  # predict token t+1 from tokens ≤ t
        return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=cfg.pad_id,
                               label_smoothing=0.1)

    start = time.perf_counter()
    train(model, batches, steps, loss_fn, recipe.train, "mt-en-de-numbers")
    seconds = time.perf_counter() - start
    translator = TextTranslator(model, tok)
    metrics = evaluate(translator, test_pairs, recipe.max_new_tokens)
    report = {
        "task": "translate",
        **metrics,
        "test_examples": len(test_pairs),
        "train_examples": len(train_pairs),
        "vocab_size": tok.get_vocab_size(),
        "parameters": model.num_parameters(),
        "train_seconds": round(seconds, 1),
    }
    return translator, report
