"""Resize-then-centre-crop that resamples only the crop, where that gives PIL's very pixels.

Hugging Face, timm and torchvision resize the whole image and then cut its centre out, so a quarter or more of
the resampling is thrown away. PIL can resample just a source interval (``box``) and then gives the same pixels
when (a) every filter centre comes out as the same number both ways — a dyadic scale and float32-exact interval
ends make every step exact (:func:`exact_crop_interval`) — and (b) PIL runs its two passes (horizontal,
vertical; each rounds to 8 bits) in the same order for both geometries. Recent Pillow picks that order from the
shapes, so (b) is checked once per geometry on a noise image (:func:`crop_plan`) rather than assumed; where
either fails, the whole image is resampled as the libraries do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class CropGeometry:
    source: tuple[int, int]  # (height, width) of the image as decoded
    resized: tuple[int, int]  # (height, width) the libraries resize to
    offset: tuple[int, int]  # (top, left) of the crop in the resized image
    crop: int  # the crop's side
    resample: Image.Resampling


@dataclass(frozen=True)
class CropPlan:
    box: tuple[float, float, float, float]  # the source interval PIL resamples (left, top, right, bottom)
    size: tuple[int, int]  # (width, height) PIL resamples it to
    offset: tuple[int, int]  # (top, left) still to cut: 0 on an axis resampled to the crop alone


def resize_and_crop(image: Image.Image, geometry: CropGeometry) -> np.ndarray:
    """8-bit ``[crop, crop, 3]``: the pixels of resizing ``image`` to ``geometry.resized`` and cutting the crop out,
    computed with as little resampling as stays exact. ``image`` must be RGB and no smaller than the crop."""
    plan = crop_plan(geometry)
    return apply_plan(image, geometry, plan) if plan is not None else resize_whole(image, geometry)


def resize_whole(image: Image.Image, geometry: CropGeometry) -> np.ndarray:
    """The libraries' way: resample everything, then crop."""
    (height, width), (top, left), side = geometry.resized, geometry.offset, geometry.crop
    pixels = np.asarray(image.resize((width, height), geometry.resample))
    return pixels[top:top + side, left:left + side]


def apply_plan(image: Image.Image, geometry: CropGeometry, plan: CropPlan) -> np.ndarray:
    (top, left), side = plan.offset, geometry.crop
    return np.asarray(image.resize(plan.size, geometry.resample, box=plan.box))[top:top + side, left:left + side]


@functools.lru_cache(maxsize=512)
def crop_plan(geometry: CropGeometry) -> CropPlan | None:
    """How to resample only the crop for this geometry, or None where only the whole resample is exact. Checked
    on noise once per geometry (the pass order is a property of the shapes, not of the pixels)."""
    (height, width), (new_height, new_width), (top, left) = geometry.source, geometry.resized, geometry.offset
    rows = exact_crop_interval(height, new_height, top, geometry.crop)
    columns = exact_crop_interval(width, new_width, left, geometry.crop)
    if rows is None and columns is None:
        return None
    left_edge, right_edge = columns or (0.0, float(width))
    top_edge, bottom_edge = rows or (0.0, float(height))
    plan = CropPlan(box=(left_edge, top_edge, right_edge, bottom_edge),
                    size=(geometry.crop if columns else new_width, geometry.crop if rows else new_height),
                    offset=(0 if rows else top, 0 if columns else left))
    noise = Image.effect_noise((width, height), 64).convert("RGB")
    return plan if np.array_equal(apply_plan(noise, geometry, plan), resize_whole(noise, geometry)) else None


@functools.lru_cache(maxsize=1024)
def exact_crop_interval(length: int, resized: int, offset: int, crop: int) -> tuple[float, float] | None:
    """The source interval ``(start, end)`` on one axis whose resample to ``crop`` pixels gives exactly the pixels
    ``offset … offset + crop`` of resampling the whole axis to ``resized`` — or None where it might not.

    PIL places output pixel ``i`` of an interval ``[a, b)`` at ``a + (i + ½) · (b − a) / n`` (``a`` and ``b`` as
    float32) and derives its filter taps from that centre alone. Where the scale ``length / resized`` is a
    dyadic fraction and both ends are float32 values, each of those numbers is exact, so the centres are the
    same bits however (and with whatever fused operations) they are computed."""
    scale = Fraction(length, resized)
    if scale.denominator & (scale.denominator - 1):  # not a power of two
        return None
    start, end = offset * scale, (offset + crop) * scale
    if any(Fraction(float(np.float32(v))) != v for v in (start, end, crop * scale)):
        return None
    return float(start), float(end)
