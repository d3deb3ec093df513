"""What each library's published preprocessing recipe means as an :class:`ImagePreprocessing`.

An imported classifier must see an image as its own library would prepare it (``import`` → same
probabilities), so each importer turns its checkpoint's settings into these fields and refuses, by name, a
setting that cannot be reproduced. What each library does besides its transform (checked against its code):

- Hugging Face (``load_image``, then the image processor): PIL decoding; EXIF orientation applied
  (``ImageOps.exif_transpose``); transparency dropped (``convert("RGB")``); crop offset floored.
- timm (``ImageDataset`` and the eval transform): PIL, ``convert("RGB")``; EXIF not applied; transparency
  dropped; crop offset rounded (torchvision's ``CenterCrop``).
- torchvision (a weights' ``transforms()`` on a PIL image): as timm.

Palette, grayscale, CMYK and 16-bit images become RGB by PIL's ``convert("RGB")`` in all three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from transerve.preprocessing import PIL_RESAMPLE, ImagePreprocessing, ResampleName

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's and torchvision's defaults

HF_KNOWN = {"do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb"}
HF_IGNORED = {"image_processor_type", "feature_extractor_type", "processor_class", "_processor_class",
              "input_data_format", "data_format", "return_tensors", "device", "default_to_square"}


def from_hf_processor(config: dict[str, Any], model_size: int) -> ImagePreprocessing:
    """What a Hugging Face ViT-family image processor (``ViTImageProcessor``, ``DeiTImageProcessor`` and their
    fast variants) does with ``preprocessor_config.json``'s settings; a setting it would apply that this cannot
    reproduce raises ``ValueError`` naming it. Images decode as ``transformers.image_utils.load_image`` loads
    them: EXIF orientation applied, transparency dropped by ``convert("RGB")``."""
    unsupported = sorted(k for k, v in config.items() if k not in HF_KNOWN | HF_IGNORED and v not in (None, False))
    if unsupported:
        raise ValueError(f"preprocessor_config.json: {', '.join(unsupported)} not supported (transerve reproduces "
                         f"{', '.join(sorted(HF_KNOWN))})")
    resize, shortest, crop = _hf_geometry(config, model_size)
    resample = PIL_RESAMPLE.get(int(config.get("resample", 2)))
    if resample is None:
        raise ValueError(f"preprocessor_config.json: resample {config['resample']!r} is not a PIL filter")
    return ImagePreprocessing(
        size=model_size, mean=_triple(config.get("image_mean", (0.5, 0.5, 0.5))),
        std=_triple(config.get("image_std", (0.5, 0.5, 0.5))), resample=resample, resize=resize,
        shortest_edge=shortest, crop=crop,
        rescale=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0,
        normalize=bool(config.get("do_normalize", True)), alpha="drop", exif_transpose=True)


def _hf_geometry(config: dict[str, Any], model_size: int) -> tuple[tuple[int, int] | None, int | None, bool]:
    """(resize to height × width before the crop, or the shortest edge's length; crop or not), checked to end at
    the model's square."""
    do_resize = config.get("do_resize", True)
    resize, shortest = _hf_size(config) if do_resize else (None, None)
    crop = bool(config.get("do_center_crop", False))
    if crop:
        final = _hf_crop_side(config)
    elif not do_resize or shortest is not None:
        raise ValueError("preprocessor_config.json: without do_center_crop, do_resize false or size.shortest_edge "
                         "gives images of varying shape; not supported")
    else:
        final = resize[0] if resize is not None and resize[0] == resize[1] else None
    if final != model_size:
        raise ValueError(f"preprocessor_config.json: makes {final or 'non-square'} px images; the model takes "
                         f"{model_size} px")
    return (resize if crop else None), shortest, crop


def _hf_size(config: dict[str, Any]) -> tuple[tuple[int, int] | None, int | None]:
    size = config.get("size", {"height": 224, "width": 224})
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if "height" in size and "width" in size:
        return (int(size["height"]), int(size["width"])), None
    if set(size) == {"shortest_edge"}:
        return None, int(size["shortest_edge"])
    raise ValueError(f"preprocessor_config.json: size {size} not supported (height and width, or shortest_edge)")


def _hf_crop_side(config: dict[str, Any]) -> int | None:
    crop = config.get("crop_size", {"height": 224, "width": 224})
    if isinstance(crop, int):
        return crop
    return int(crop["height"]) if crop.get("height") == crop.get("width") else None


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def from_timm_cfg(cfg: dict[str, Any], model_size: int) -> ImagePreprocessing:
    """timm's evaluation transform for a ``pretrained_cfg`` (``interpolation``, ``crop_pct``,
    ``crop_mode``, ``mean``, ``std``): resize to ``floor(size / crop_pct)`` — the shortest edge (``center``) or
    both sides (``squash``) — then a centre crop to ``size``."""
    # the model's own size: a model built with another img_size keeps its architecture's pretrained_cfg, whose
    # input_size then describes the published weights, not this model
    size = model_size
    mode = cfg.get("crop_mode", "center")
    if mode not in ("center", "squash"):
        raise ValueError(f"pretrained_cfg: crop_mode {mode!r} not supported (center, squash)")
    scale = math.floor(size / float(cfg.get("crop_pct") or 0.875))
    return ImagePreprocessing(
        size=size, mean=_triple(cfg.get("mean", IMAGENET_MEAN)), std=_triple(cfg.get("std", IMAGENET_STD)),
        resample=_named(cfg.get("interpolation", "bicubic")),
        resize=(scale, scale) if mode == "squash" else None, shortest_edge=scale if mode == "center" else None,
        crop=True, crop_rounding="round", alpha="drop")


# torchvision's published ViT weights: (resize_size, crop_size, interpolation) of each one's transforms()
TORCHVISION_PRESETS: dict[str, tuple[int, int, ResampleName]] = {
    "IMAGENET1K_V1": (256, 224, "bilinear"),  # vit_b_16, vit_b_32, vit_l_16, vit_l_32
    "IMAGENET1K_SWAG_E2E_V1": (384, 384, "bicubic"),  # vit_b_16 (vit_l_16: 512, vit_h_14: 518)
    "IMAGENET1K_SWAG_LINEAR_V1": (224, 224, "bicubic"),
}


def torchvision_recipe(resize_size: int, crop_size: int, interpolation: str, model_size: int) -> ImagePreprocessing:
    """torchvision's ``ImageClassification`` transform: shortest edge to ``resize_size``, centre crop
    ``crop_size``, ImageNet mean and std."""
    if crop_size != model_size:
        raise ValueError(f"crop size {crop_size} does not match the model's {model_size} px")
    return ImagePreprocessing(size=crop_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              resample=_named(interpolation), shortest_edge=resize_size, crop=True,
                              crop_rounding="round", alpha="drop")


def _named(name: str) -> ResampleName:
    for known in PIL_RESAMPLE.values():
        if name == known:
            return known
    raise ValueError(f"interpolation {name!r} not supported ({', '.join(PIL_RESAMPLE.values())})")
