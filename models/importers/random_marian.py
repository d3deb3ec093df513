"""A random-weight MarianMT checkpoint with a real sentencepiece tokenizer, for tests and benchmarks.

Nothing is downloaded: the tokenizer is trained here on num2words' English and German, and the vocabulary can
be padded with filler pieces to a real model's size (opus-mt-en-de: 58 101), so shapes — and CTranslate2's
converter, which needs the tokenizer files — see a checkpoint like the real one.

Generation settings are the real opus-mt checkpoints': MarianConfig's library defaults
(``forced_eos_token_id`` = EOS, decoding starts from the pad token) and their
``generation_config.json`` (:data:`OPUS_GENERATION`: beam 4, ``max_length`` 512, the pad token
banned, renormalised scores). ``generation=None`` writes no ``generation_config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

# opus-mt-*'s generation_config.json, less the ids (added per vocabulary: pad banned, start from pad, EOS 0)
OPUS_GENERATION: dict[str, Any] = {"num_beams": 4, "max_length": 512, "renormalize_logits": True}


def write_random_marian(directory: Path, *, numbers: Iterable[int] = range(0, 5000, 3), spm_vocab: int = 200,
                        vocab_size: int | None = None, random_bias: bool = False, seed: int = 0,
                        generation: dict[str, Any] | None = OPUS_GENERATION, **config: Any) -> Path:
    """``save_pretrained`` files of a random MarianMT (``config``: MarianConfig fields over the library's defaults;
    ``generation``: generation_config.json fields over :data:`OPUS_GENERATION`'s ids) into ``directory``."""
    import sentencepiece as spm
    import transformers
    from num2words import num2words

    directory.mkdir(parents=True, exist_ok=True)
    numbers = list(numbers)
    text = [num2words(i) for i in numbers] + [num2words(i, lang="de") for i in numbers]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(directory / "sp"),
                                   vocab_size=spm_vocab, model_type="unigram", minloglevel=2)
    processor = spm.SentencePieceProcessor(model_file=str(directory / "sp.model"))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
              if processor.id_to_piece(i) not in ("<unk>", "<s>", "</s>")]
    vocab = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    for i in range(len(vocab), (vocab_size or 0) - 1):
        vocab[f"▁w{i}"] = i  # filler entries: a real model's vocabulary size over the tokenizer's pieces
    vocab["<pad>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = transformers.MarianTokenizer(vocab=str(directory / "vocab.json"),
                                             source_spm=str(directory / "sp.model"),
                                             target_spm=str(directory / "sp.model"))
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    pad = vocab["<pad>"]
    settings = {"pad_token_id": pad, "decoder_start_token_id": pad, "eos_token_id": 0, **config}
    model = transformers.MarianMTModel(transformers.MarianConfig(vocab_size=len(vocab), **settings)).eval()
    if random_bias:
        with torch.no_grad():
            model.final_logits_bias.normal_()  # a non-zero bias, so mapping it matters
    model.save_pretrained(directory)
    if generation is not None:
        ids = {"bad_words_ids": [[pad]], "bos_token_id": 0, "decoder_start_token_id": pad, "eos_token_id": 0,
               "forced_eos_token_id": model.config.forced_eos_token_id, "pad_token_id": pad}
        transformers.GenerationConfig(**{**ids, **generation}).save_pretrained(directory)
    return directory
