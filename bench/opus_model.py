"""An opus-mt-en-de-shaped MarianMT checkpoint with random weights, and its transerve export (cached).

Shape: vocab 58 101, d_model 512, 6 + 6 layers, 8 heads, FFN 2048 — Helsinki-NLP/opus-mt-en-de's, without
its weights (nothing is downloaded). The checkpoint carries a small sentencepiece tokenizer trained here (the
vocabulary is padded to 58 101 entries) because CTranslate2's converter needs tokenizer files.

Used by ``ct2_bench.py`` and ``continuous_bench.py``; both build it on first use under ``--work``.
"""

from __future__ import annotations

import os
from pathlib import Path

VOCAB = 58_101
SHAPE = {"d_model": 512, "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 8,
         "decoder_attention_heads": 8, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048}
if os.environ.get("TRANSERVE_BENCH_SMOKE"):  # tests/test_bench_smoke.py: the same code paths on a tiny model
    VOCAB = 400
    SHAPE = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}


def checkpoint(work: Path) -> Path:
    """``work/opus-shaped``: config, weights and tokenizer files, as ``save_pretrained`` writes them."""
    directory = work / "opus-shaped"
    if (directory / "config.json").is_file():
        return directory
    from transerve.models.importers.random_marian import write_random_marian

    # greedy, no forced EOS: the decode loops compare with CTranslate2's plain greedy search
    return write_random_marian(directory, numbers=range(0, 20000, 7), spm_vocab=300, vocab_size=VOCAB,
                               max_position_embeddings=512, generation=None, forced_eos_token_id=None, **SHAPE)


def exported(work: Path, max_new_tokens: int = 64) -> Path:
    """``work/opus-repo``: the checkpoint through ``transerve export hf-marian`` (fp32 + int8 variants)."""
    repo = work / "opus-repo"
    if (repo / "opus-shaped" / "1" / "export_report.json").is_file():
        return repo
    from transerve.export.exporter import ExportOptions, export_translator_entry
    from transerve.models.importers.marian import import_hf_marian

    imported = import_hf_marian(checkpoint(work))
    export_translator_entry(imported.model, imported.tokenizer,
                            # no bf16 gate: no benchmark here serves the translator's bf16 variant
                            ExportOptions(repo, "opus-shaped", int8=True, bf16=False, default=True, on_status=print),
                            max_new_tokens=max_new_tokens)
    return repo
