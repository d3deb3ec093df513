"""Streaming detokenisation: pieces never split a multi-byte character and always join to the full text.

A byte-level BPE (trained here) splits 'ü', '€' and '🙂' across tokens, so a naive decode of a prefix ends in
U+FFFD; the reference is the tokenizer's own decode of the whole sequence.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transerve.server.engine.detokenizer import Detokenizer

TEXT = "fünf € 🙂 zweiundvierzig"


def byte_level_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["zweiundvierzig", "fünf", "vier"] * 10, trainer)
    return tokenizer


def test_pieces_hold_back_incomplete_characters() -> None:
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode(TEXT).ids
    prefixes = [tokenizer.decode(ids[:n]) for n in range(1, len(ids))]
    assert any(p.endswith("\ufffd") for p in prefixes)  # the case under test really happens
    detok = Detokenizer(tokenizer)
    pieces = [detok.update(ids[:n], final=False) for n in range(1, len(ids) + 1)]
    pieces.append(detok.update(ids, final=True))
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == TEXT
