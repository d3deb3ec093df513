"""Import Vision Transformers from local checkpoint directories into :class:`ViT`.

Formats (nothing is downloaded; each reads a directory as its library saves it):

* ``hf-vit`` — Hugging Face ``ViTForImageClassification``: ``config.json`` + ``model.safetensors``
  (or ``pytorch_model.bin``), optional ``preprocessor_config.json``.
* ``torchvision-vit`` — a ``vit_b_16``-style state dict (``*.pth``/``*.pt``/``*.safetensors``);
  heads from an optional ``config.json`` (``{"num_heads": 12}``), else width / 64 as in every
  torchvision ViT but ViT-H.
* ``timm-vit`` — timm's ``VisionTransformer`` as ``save_pretrained`` writes it: ``config.json``
  (``architecture``, ``num_classes``, ``pretrained_cfg``) + ``model.safetensors``/``pytorch_model.bin``.

All three are the pre-norm ViT of our :class:`ViT` (class token, learned positions including the
class token, exact GELU); only names, the fused or split QKV layout and ε differ. Each importer
maps names explicitly and loads with ``strict=True``, so a checkpoint that does not fit its config
is an error naming the tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transerve.image_recipes import from_hf_processor, from_timm_cfg, torchvision_recipe
from transerve.models.checkpoint import CheckpointError
from transerve.models.vit import ViT, ViTConfig

StateDict = dict[str, Tensor]


def read_weights(directory: Path, names: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")) -> StateDict:
    """The first weights file found among ``names`` (then any *.safetensors / *.pth / *.pt / *.bin)."""
    candidates = [directory / n for n in names] + sorted(
        p for ext in ("*.safetensors", "*.pth", "*.pt", "*.bin") for p in directory.glob(ext))
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(names)}, *.pth, *.pt, *.bin)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or unreadable weights ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg})") from None


def need(state: StateDict, key: str, source: Path) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: tensor {key!r} missing — not a checkpoint of this architecture")
    return state[key]


def block_count(state: StateDict, prefix: str) -> int:
    """Number of numbered blocks ``prefix{i}.`` present."""
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def grid_image_size(pos_embed: Tensor, patch: int, prefix: int = 1) -> int:
    """The image side whose patch grid, after ``prefix`` token rows, fills the position table."""
    side = math.isqrt(pos_embed.shape[1] - prefix)
    if side * side != pos_embed.shape[1] - prefix:
        raise CheckpointError(f"position table of {pos_embed.shape[1]} rows is not {prefix} + a square grid")
    return side * patch


def block_state(get: Callable[[str], Tensor], qkv: tuple[Tensor, Tensor], names: dict[str, str], i: int) -> StateDict:
    """One of our blocks' tensors from a source block; ``names`` maps our suffix → theirs."""
    ours = {"attn.qkv.weight": qkv[0], "attn.qkv.bias": qkv[1]}
    ours.update({ours_key: get(theirs.format(i=i)) for ours_key, theirs in names.items()})
    return {f"blocks.{i}.{k}": v for k, v in ours.items()}


def build(cfg: ViTConfig, state: StateDict, source: Path) -> ViT:
    model = ViT(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: does not match its config: {str(e).splitlines()[-1].strip()}") from None
    return model.eval()


def hf_heads(state: StateDict, directory: Path) -> tuple[StateDict, int, bool]:
    """The classifier heads: ``classifier`` (ViT, DeiT), or DeiT-with-teacher's ``cls_classifier`` and
    ``distillation_classifier``, whose logits the library averages. → (our head tensors, classes, two heads)."""
    if "cls_classifier.weight" in state:
        heads = {"head.weight": "cls_classifier.weight", "head.bias": "cls_classifier.bias",
                 "head_dist.weight": "distillation_classifier.weight", "head_dist.bias": "distillation_classifier.bias"}
    else:
        heads = {"head.weight": "classifier.weight", "head.bias": "classifier.bias"}
    tensors = {ours: need(state, theirs, directory) for ours, theirs in heads.items()}
    return tensors, int(tensors["head.weight"].shape[0]), "head_dist.weight" in tensors


def import_hf_vit(directory: Path) -> tuple[ViT, dict[str, Any]]:
    """``ViTForImageClassification``, ``DeiTForImageClassification`` and ``DeiTForImageClassificationWithTeacher``
    (class and distillation tokens; the two heads' logits averaged, as the library's inference does)."""
    config = read_json(directory / "config.json")
    state = read_weights(directory)
    p = next((f"{m}." for m in ("vit", "deit") if any(k.startswith(f"{m}.") for k in state)), "")
    get = lambda k: need(state, p + k, directory)  # noqa: E731
    heads, num_classes, with_teacher = hf_heads(state, directory)
    distilled = p + "embeddings.distillation_token" in state  # DeiT
    cfg = ViTConfig(image_size=int(config.get("image_size", 224)), patch_size=int(config.get("patch_size", 16)),
                    in_chans=int(config.get("num_channels", 3)), num_classes=num_classes,
                    dim=int(config["hidden_size"]), depth=int(config["num_hidden_layers"]),
                    num_heads=int(config["num_attention_heads"]),
                    mlp_ratio=int(config["intermediate_size"]) / int(config["hidden_size"]),
                    norm_eps=float(config.get("layer_norm_eps", 1e-12)), distillation_token=distilled,
                    distillation_head=with_teacher)
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{directory / 'config.json'}: hidden_act {config['hidden_act']!r} unsupported (gelu)")
    ours = {"patch_embed.proj.weight": get("embeddings.patch_embeddings.projection.weight"),
            "patch_embed.proj.bias": get("embeddings.patch_embeddings.projection.bias"),
            "cls_token": get("embeddings.cls_token"), "pos_embed": get("embeddings.position_embeddings"),
            "norm.weight": get("layernorm.weight"), "norm.bias": get("layernorm.bias"), **heads}
    if distilled:
        ours["dist_token"] = get("embeddings.distillation_token")
    for i in range(cfg.depth):
        a = f"encoder.layer.{i}.attention."
        qkv = (torch.cat([get(f"{a}attention.{n}.weight") for n in ("query", "key", "value")]),
               torch.cat([get(f"{a}attention.{n}.bias") for n in ("query", "key", "value")]))
        names = {"norm1.weight": "encoder.layer.{i}.layernorm_before.weight",
                 "norm1.bias": "encoder.layer.{i}.layernorm_before.bias",
                 "attn.proj.weight": "encoder.layer.{i}.attention.output.dense.weight",
                 "attn.proj.bias": "encoder.layer.{i}.attention.output.dense.bias",
                 "norm2.weight": "encoder.layer.{i}.layernorm_after.weight",
                 "norm2.bias": "encoder.layer.{i}.layernorm_after.bias",
                 "mlp.fc1.weight": "encoder.layer.{i}.intermediate.dense.weight",
                 "mlp.fc1.bias": "encoder.layer.{i}.intermediate.dense.bias",
                 "mlp.fc2.weight": "encoder.layer.{i}.output.dense.weight",
                 "mlp.fc2.bias": "encoder.layer.{i}.output.dense.bias"}
        ours.update(block_state(get, qkv, names, i))
    labels = [config.get("id2label", {}).get(str(i), str(i)) for i in range(cfg.num_classes)]
    source = "preprocessor_config.json" if (directory / "preprocessor_config.json").is_file() else \
        "the image processor's defaults (no preprocessor_config.json)"
    return build(cfg, ours, directory), {"labels": labels, "preprocessing": hf_preprocessing(directory, cfg),
                                         "preprocessing_from": source}


def hf_preprocessing(directory: Path, cfg: ViTConfig) -> dict[str, Any]:
    """``preprocessor_config.json`` as the library's image processor applies it (without one: the processor's
    defaults at the model's size); a setting transerve cannot reproduce is an error naming it."""
    path = directory / "preprocessor_config.json"
    settings = read_json(path) if path.is_file() else {"size": {"height": cfg.image_size, "width": cfg.image_size}}
    try:
        return from_hf_processor(settings, cfg.image_size).to_config()
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from None


def import_torchvision_vit(directory: Path, recipe: tuple[int, int, str] | None = None) -> tuple[ViT, dict[str, Any]]:
    """``recipe``: the weights' (resize size, crop size, interpolation) — a torchvision state dict carries no
    transform. Default: IMAGENET1K_V1's (shortest edge to 256/224 of the model's size, bilinear)."""
    state = read_weights(directory, ())
    meta = read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    get = lambda k: need(state, k, directory)  # noqa: E731
    conv = get("conv_proj.weight")
    dim, patch = conv.shape[0], conv.shape[-1]
    depth = block_count(state, "encoder.layers.encoder_layer_")
    cfg = ViTConfig(image_size=grid_image_size(get("encoder.pos_embedding"), patch), patch_size=patch,
                    in_chans=conv.shape[1], num_classes=get("heads.head.weight").shape[0], dim=dim, depth=depth,
                    num_heads=int(meta.get("num_heads", dim // 64)),
                    mlp_ratio=get("encoder.layers.encoder_layer_0.mlp.0.weight").shape[0] / dim, norm_eps=1e-6)
    ours = {"patch_embed.proj.weight": conv, "patch_embed.proj.bias": get("conv_proj.bias"),
            "cls_token": get("class_token"), "pos_embed": get("encoder.pos_embedding"),
            "norm.weight": get("encoder.ln.weight"), "norm.bias": get("encoder.ln.bias"),
            "head.weight": get("heads.head.weight"), "head.bias": get("heads.head.bias")}
    layer = "encoder.layers.encoder_layer_{i}."
    names = {"norm1.weight": layer + "ln_1.weight", "norm1.bias": layer + "ln_1.bias",
             "attn.proj.weight": layer + "self_attention.out_proj.weight",
             "attn.proj.bias": layer + "self_attention.out_proj.bias",
             "norm2.weight": layer + "ln_2.weight", "norm2.bias": layer + "ln_2.bias",
             "mlp.fc1.weight": layer + "mlp.0.weight", "mlp.fc1.bias": layer + "mlp.0.bias",
             "mlp.fc2.weight": layer + "mlp.3.weight", "mlp.fc2.bias": layer + "mlp.3.bias"}
    for i in range(depth):
        qkv = (get(layer.format(i=i) + "self_attention.in_proj_weight"),
               get(layer.format(i=i) + "self_attention.in_proj_bias"))  # already [q; k; v]
        ours.update(block_state(get, qkv, names, i))
    resize, crop, interpolation = recipe or (round(cfg.image_size * 256 / 224), cfg.image_size, "bilinear")
    try:
        prep = torchvision_recipe(resize, crop, interpolation, cfg.image_size)
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    return build(cfg, ours, directory), {"labels": [str(i) for i in range(cfg.num_classes)],
                                         "preprocessing": prep.to_config(),
                                         "preprocessing_from": f"torchvision recipe {resize}:{crop}:{interpolation}"
                                                               + ("" if recipe else " (IMAGENET1K_V1's, scaled)")}


_TIMM_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}


def import_timm_vit(directory: Path) -> tuple[ViT, dict[str, Any]]:
    config = read_json(directory / "config.json")
    state = read_weights(directory)
    get = lambda k: need(state, k, directory)  # noqa: E731
    conv = get("patch_embed.proj.weight")
    dim, patch = conv.shape[0], conv.shape[-1]
    arch = str(config.get("architecture", ""))
    heads = int(config.get("model_args", {}).get("num_heads") or
                next((h for size, h in _TIMM_HEADS.items() if f"_{size}_" in arch), dim // 64))
    pretrained = config.get("pretrained_cfg", {})
    distilled = "dist_token" in state  # deit_*_distilled_*: VisionTransformerDistilled, heads averaged at inference
    cfg = ViTConfig(image_size=grid_image_size(get("pos_embed"), patch, 2 if distilled else 1), patch_size=patch,
                    in_chans=conv.shape[1], num_classes=get("head.weight").shape[0], dim=dim,
                    depth=block_count(state, "blocks."), num_heads=heads,
                    mlp_ratio=get("blocks.0.mlp.fc1.weight").shape[0] / dim, norm_eps=1e-6,
                    distillation_token=distilled, distillation_head=distilled)
    pool = config.get("global_pool", "token")
    if pool not in ("token", None):  # our ViT (and its class-token export) classifies the class token
        raise CheckpointError(f"{directory}: timm global_pool {pool!r} is not supported (class-token pooling only)")
    unsupported = [k for k in state if k.startswith(("fc_norm.", "norm_pre.")) or ".ls1." in k or "reg_token" in k]
    if unsupported:
        raise CheckpointError(f"{directory}: timm variant with {unsupported[0]!r} is not supported (plain ViT only)")
    ours = {k: v for k, v in state.items()}  # timm's names are ours
    model = build(cfg, ours, directory)
    labels = config.get("label_names") or [str(i) for i in range(cfg.num_classes)]
    try:
        prep = from_timm_cfg(pretrained, cfg.image_size)
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    return model, {"labels": list(labels), "preprocessing": prep.to_config(),
                   "preprocessing_from": "config.json pretrained_cfg"}


VIT_IMPORTERS: dict[str, Callable[[Path], tuple[ViT, dict[str, Any]]]] = {
    "hf-vit": import_hf_vit, "torchvision-vit": import_torchvision_vit, "timm-vit": import_timm_vit}
