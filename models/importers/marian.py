"""Import a Hugging Face MarianMT checkpoint (opus-mt) from a local directory.

Reads what ``MarianMTModel.save_pretrained`` + ``MarianTokenizer.save_pretrained`` write:
``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``), ``vocab.json``,
``source.spm`` (and ``target.spm``). Marian is our post-norm encoder–decoder with
Swish FFNs, split-layout sinusoidal positions, √C-scaled tied embeddings and a
``final_logits_bias``; decoding starts from the pad token and stops at ``</s>`` (id 0).

Decoding follows the checkpoint's own generation settings (``generation_config.json``, as
``from_pretrained`` reads it): default beam size and budget, length penalty, early stopping, bad
words (the pad token), forced EOS and renormalised scores — :mod:`transerve.generation`. A setting
that would change ``generate()``'s output and that transerve does not apply is refused by name,
never ignored.

The tokenizer becomes a ``tokenizers`` Unigram over Marian's own ids (``vocab.json``)
scored with the source sentencepiece model's piece scores, with that model's
precompiled normaliser — the same segmentation sentencepiece makes, without
sentencepiece at serving time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transerve.generation import DecodingDefaults, GenerationRules
from transerve.models.checkpoint import CheckpointError
from transerve.models.importers.marian_languages import TARGET_TOKEN
from transerve.models.importers.vit import StateDict, need, read_json, read_weights
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.models.translator import TextTranslator

# generate() settings that change its output and that transerve does not apply, with their neutral values
UNSUPPORTED = {"do_sample": False, "num_beam_groups": 1, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0,
               "encoder_no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
               "min_length": 0, "min_new_tokens": 0, "forced_bos_token_id": None, "suppress_tokens": None,
               "begin_suppress_tokens": None, "exponential_decay_length_penalty": None, "sequence_bias": None,
               "force_words_ids": None, "constraints": None}
LIBRARY_MAX_LENGTH = 20  # generate()'s budget (decoder start included) when a checkpoint sets none

SPECIALS = ("</s>", "<unk>", "<pad>")


def marian_tokenizer(directory: Path) -> Tokenizer:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise CheckpointError("hf-marian needs sentencepiece to read source.spm: pip install 'transerve[importers]'") \
            from None
    vocab = {str(k): int(v) for k, v in read_json(directory / "vocab.json").items()}
    spm_path = directory / "source.spm"
    if not spm_path.is_file():
        raise CheckpointError(f"{spm_path}: missing (MarianTokenizer's source sentencepiece model)")
    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    try:
        proto.ParseFromString(spm_path.read_bytes())
    except Exception as e:
        raise CheckpointError(f"{spm_path}: not a sentencepiece model ({e})") from None
    scores = {p.piece: p.score for p in proto.pieces}
    floor = min(scores.values(), default=0.0) - 10.0  # pieces sentencepiece lacks are never preferred
    ordered: list[tuple[str, float]] = [(f"<unused{i}>", floor) for i in range(max(vocab.values()) + 1)]
    for piece, index in vocab.items():
        ordered[index] = (piece, scores.get(piece, floor))
    tok = Tokenizer(models.Unigram(ordered, unk_id=vocab.get("<unk>"), byte_fallback=False))
    steps = [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    if proto.normalizer_spec.precompiled_charsmap:
        steps.insert(0, normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # and the target-language tokens a multilingual model reads first (">>de<<"): one id each, as MarianTokenizer
    tok.add_special_tokens([s for s in SPECIALS if s in vocab] + [p for p in vocab if TARGET_TOKEN.fullmatch(p)])
    return tok


def marian_config(directory: Path) -> TransformerConfig:
    c = read_json(directory / "config.json")
    path = directory / "config.json"
    if c.get("encoder_attention_heads") != c.get("decoder_attention_heads") or c.get("encoder_ffn_dim") != c.get(
            "decoder_ffn_dim") or c.get("d_model", 0) % max(1, c.get("encoder_attention_heads", 1)):
        raise CheckpointError(f"{path}: encoder and decoder must share heads and FFN width (unsupported architecture)")
    if c.get("share_encoder_decoder_embeddings", True) is False or c.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{path}: untied embeddings are not supported (opus-mt models tie them)")
    return TransformerConfig(
        vocab_size=int(c["vocab_size"]), d_model=int(c["d_model"]), num_heads=int(c["encoder_attention_heads"]),
        num_encoder_layers=int(c["encoder_layers"]), num_decoder_layers=int(c["decoder_layers"]),
        ffn_dim=int(c["encoder_ffn_dim"]), dropout=0.0, pre_norm=bool(c.get("normalize_before", False)),
        tie_embeddings=True, max_len=int(c.get("max_position_embeddings", 512)), pad_id=int(c["pad_token_id"]),
        bos_id=int(c.get("decoder_start_token_id", c["pad_token_id"])), eos_id=int(c["eos_token_id"]),
        activation=str(c.get("activation_function", "swish")), position_layout="split",
        scale_embeddings=bool(c.get("scale_embedding", True)), output_bias=True)


def _decoder_start(directory: Path, cfg: TransformerConfig) -> TransformerConfig:
    """The generation settings' ``decoder_start_token_id`` wins over ``config.json``'s, as in ``generate()``."""
    start = generation_settings(directory)[0].get("decoder_start_token_id")
    return cfg if start is None else dataclasses.replace(cfg, bos_id=int(start))


def generation_settings(directory: Path) -> tuple[dict[str, Any], Path]:
    """``generation_config.json`` when the checkpoint has one (it wins, as in ``from_pretrained``), else the
    generation fields older checkpoints keep in ``config.json``."""
    path = directory / "generation_config.json"
    if not path.is_file():
        path = directory / "config.json"
    return read_json(path), path


def marian_decoding(directory: Path, cfg: TransformerConfig) -> DecodingDefaults:
    """How ``MarianMTModel.generate()`` decodes this checkpoint when called without arguments."""
    settings, path = generation_settings(directory)
    odd = [f"{k}={settings[k]!r}" for k, neutral in UNSUPPORTED.items() if settings.get(k) not in (neutral, None)]
    if odd:
        raise CheckpointError(f"{path}: {', '.join(odd)}: generate() would apply {'these' if len(odd) > 1 else 'this'}"
                              " and transerve does not (it applies num_beams, max_length/max_new_tokens, "
                              "length_penalty, early_stopping, bad_words_ids, forced_eos_token_id, renormalize_logits)")
    forced = settings.get("forced_eos_token_id")
    if isinstance(forced, list):
        forced = forced[0] if len(set(forced)) == 1 else forced
    if forced is not None and forced != cfg.eos_id:
        raise CheckpointError(f"{path}: forced_eos_token_id {forced} is not the EOS token {cfg.eos_id} (unsupported)")
    if settings.get("max_new_tokens"):
        budget = int(settings["max_new_tokens"])
    elif settings.get("max_length"):
        budget = int(settings["max_length"]) - 1  # max_length counts the decoder start token
    else:
        budget = min(LIBRARY_MAX_LENGTH + 1, cfg.max_len) - 1
    raw_penalty = settings.get("length_penalty")
    penalty = 1.0 if raw_penalty is None else float(raw_penalty)
    if not 0.0 <= penalty <= 10.0:
        raise CheckpointError(f"{path}: length_penalty {penalty} is outside 0 to 10 (unsupported)")
    early = settings.get("early_stopping") or False
    rules = GenerationRules.from_settings(settings.get("bad_words_ids") or (), forced is not None,
                                          bool(settings.get("renormalize_logits")), early, cfg.eos_id)
    return DecodingDefaults(int(settings.get("num_beams") or 1), max(1, min(budget, cfg.max_len - 1)), penalty,
                            rules)


def _linear(state: StateDict, ours: str, theirs: str, out: StateDict) -> None:
    out[f"{ours}.weight"], out[f"{ours}.bias"] = state[f"{theirs}.weight"], state[f"{theirs}.bias"]


def _stacked(state: StateDict, ours: str, theirs: list[str], out: StateDict) -> None:
    """Our fused projections = their separate ones stacked along the output axis."""
    out[f"{ours}.weight"] = torch.cat([state[f"{t}.weight"] for t in theirs])
    out[f"{ours}.bias"] = torch.cat([state[f"{t}.bias"] for t in theirs])


def marian_state(state: StateDict, cfg: TransformerConfig, source: Path) -> StateDict:
    p = "model." if any(k.startswith("model.") for k in state) else ""
    shared = need(state, f"{p}shared.weight", source)
    out: StateDict = {"src_embed.weight": shared, "tgt_embed.weight": shared, "lm_head.weight": shared,
                      "lm_head.bias": need(state, "final_logits_bias", source).reshape(-1)}
    for i in range(cfg.num_encoder_layers):
        t, o = f"{p}encoder.layers.{i}", f"encoder.{i}"
        need(state, f"{t}.self_attn.q_proj.weight", source)
        _stacked(state, f"{o}.attn.qkv", [f"{t}.self_attn.{n}_proj" for n in "qkv"], out)
        for ours, theirs in [("attn.proj", "self_attn.out_proj"), ("norm_out1", "self_attn_layer_norm"),
                             ("ffn.net.0", "fc1"), ("ffn.net.3", "fc2"), ("norm_out2", "final_layer_norm")]:
            _linear(state, f"{o}.{ours}", f"{t}.{theirs}", out)
    for i in range(cfg.num_decoder_layers):
        t, o = f"{p}decoder.layers.{i}", f"decoder.{i}"
        need(state, f"{t}.encoder_attn.q_proj.weight", source)
        _stacked(state, f"{o}.self_attn.qkv", [f"{t}.self_attn.{n}_proj" for n in "qkv"], out)
        _stacked(state, f"{o}.cross_attn.kv", [f"{t}.encoder_attn.{n}_proj" for n in "kv"], out)
        for ours, theirs in [("self_attn.proj", "self_attn.out_proj"), ("norm_out1", "self_attn_layer_norm"),
                             ("cross_attn.q", "encoder_attn.q_proj"), ("cross_attn.proj", "encoder_attn.out_proj"),
                             ("norm_out2", "encoder_attn_layer_norm"), ("ffn.net.0", "fc1"), ("ffn.net.3", "fc2"),
                             ("norm_out3", "final_layer_norm")]:
            _linear(state, f"{o}.{ours}", f"{t}.{theirs}", out)
    return out


def import_hf_marian(directory: Path) -> TextTranslator:
    cfg = _decoder_start(directory, marian_config(directory))
    state = read_weights(directory)
    try:
        mapped = marian_state(state, cfg, directory)
    except KeyError as e:
        raise CheckpointError(f"{directory}: tensor {e} missing — not a MarianMT checkpoint") from None
    model = Seq2SeqTransformer(cfg)
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: does not match its config: {str(e).splitlines()[-1].strip()}") from None
    return TextTranslator(model.eval(), marian_tokenizer(directory), marian_decoding(directory, cfg))
