"""An opus-mt-en-de-shaped MarianMT checkpoint with random weights, and its transerve export (cached).

Shape: vocab 58 101, d_model 512, 6 + 6 layers, 8 heads, FFN 2048 — Helsinki-NLP/opus-mt-en-de's, without
its weights (nothing is downloaded). The checkpoint carries a small sentencepiece tokenizer trained here (the
vocabulary is padded to 58 101 entries) because CTranslate2's converter needs tokenizer files.

Used by ``ct2_bench.py`` and ``continuous_bench.py``; both build it on first use under ``--work``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 58_101
SHAPE = {"d_model": 512, "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 8,
         "decoder_attention_heads": 8, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048}


def checkpoint(work: Path) -> Path:
    """``work/opus-shaped``: config, weights and tokenizer files, as ``save_pretrained`` writes them."""
    directory = work / "opus-shaped"
    if (directory / "config.json").is_file():
        return directory
    import sentencepiece as spm
    import transformers
    from num2words import num2words

    directory.mkdir(parents=True, exist_ok=True)
    text = [num2words(i) for i in range(0, 20000, 7)] + [num2words(i, lang="de") for i in range(0, 20000, 7)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(directory / "sp"),
                                   vocab_size=300, model_type="unigram", minloglevel=2)
    processor = spm.SentencePieceProcessor(model_file=str(directory / "sp.model"))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
              if processor.id_to_piece(i) not in ("<unk>", "<s>", "</s>")]
    vocab = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    for i in range(len(vocab), VOCAB - 1):
        vocab[f"▁w{i}"] = i  # filler entries: the real model's vocabulary size, the tokenizer's pieces
    vocab["<pad>"] = VOCAB - 1
    (directory / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = transformers.MarianTokenizer(vocab=str(directory / "vocab.json"),
                                             source_spm=str(directory / "sp.model"),
                                             target_spm=str(directory / "sp.model"))
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.MarianConfig(vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=VOCAB - 1,
                                       decoder_start_token_id=VOCAB - 1, eos_token_id=0, forced_eos_token_id=None,
                                       **SHAPE)
    transformers.MarianMTModel(config).eval().save_pretrained(directory)
    return directory


def exported(work: Path, max_new_tokens: int = 64) -> Path:
    """``work/opus-repo``: the checkpoint through ``transerve export hf-marian`` (fp32 + int8 variants)."""
    repo = work / "opus-repo"
    if (repo / "opus-shaped" / "1" / "export_report.json").is_file():
        return repo
    from transerve.export.exporter import ExportOptions, export_translator_entry
    from transerve.models.importers.marian import import_hf_marian

    imported = import_hf_marian(checkpoint(work))
    export_translator_entry(imported.model, imported.tokenizer,
                            ExportOptions(repo, "opus-shaped", int8=True, default=True, on_status=print),
                            max_new_tokens=max_new_tokens)
    return repo
