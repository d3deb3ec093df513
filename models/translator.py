"""Text in, text out: the translator model together with its tokenizer.

Sources are encoded as ``ids + [EOS]`` and right-padded with ``PAD``; the
keep-mask marks real tokens. This is the offline reference the server's
outputs are compared against.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor
from transerve.generation import DecodingDefaults
from transerve.models.checkpoint import CheckpointError, load_checkpoint
from transerve.models.decoding import translate_ids
from transerve.models.transformer import Seq2SeqTransformer

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3 = pad, bos, eos, unk (TransformerConfig defaults)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad id lists → ids [B, S] and keep-mask [B, S]."""
    width = max((len(r) for r in rows), default=1)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, ids != pad_id


class TextTranslator:
    """``decoding``: how the checkpoint decodes by default (an imported one's own generation settings)."""

    def __init__(self, model: Seq2SeqTransformer, tokenizer: Tokenizer,
                 decoding: DecodingDefaults | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decoding = decoding or DecodingDefaults()

    @classmethod
    def load(cls, directory: Path) -> TextTranslator:
        model, _ = load_checkpoint(directory)
        if not isinstance(model, Seq2SeqTransformer):
            raise CheckpointError(f"{directory}: holds a {type(model).__name__}, not a translator")
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (a translator checkpoint needs its tokenizer)")
        try:
            return cls(model, Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise CheckpointError(f"{path}: corrupt tokenizer ({e})") from None

    def encode_sources(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        eos = self.model.config.eos_id
        return pad_batch([[*enc.ids, eos] for enc in self.tokenizer.encode_batch(list(texts))],
                         self.model.config.pad_id)

    def translate(self, texts: Sequence[str], max_new_tokens: int | None = None, beam_size: int | None = None,
                  length_penalty: float | None = None) -> list[str]:
        """Unset settings are the checkpoint's defaults (:attr:`decoding`)."""
        if not texts:
            return []
        d = self.decoding
        src, keep = self.encode_sources(texts)
        ids = translate_ids(self.model, src, keep, max_new_tokens or d.max_new_tokens, beam_size or d.beam_size,
                            d.length_penalty if length_penalty is None else length_penalty, rules=d.rules)
        return self.tokenizer.decode_batch(ids)
