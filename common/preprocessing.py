"""Image preprocessing, defined once so training, export verification and serving cannot drift apart.

The zoo trains through :meth:`ImagePreprocessing.apply` and writes its fields into the model's metadata; an
importer writes the fields its library's processor would use (:func:`from_hf_processor`); the server rebuilds
the same object from ``config.yaml`` (:meth:`ImagePreprocessing.from_config`) and runs the same code on decoded
images.

The steps, in the order every library here applies them: colour mode (transparency, palette, grayscale, CMYK
→ RGB), resize on 8-bit pixels with the named PIL filter (to a fixed height × width, or the shortest edge to a
length keeping the aspect ratio, truncating the other as Hugging Face and torchvision do), centre crop to the
model's square (zero padding where the image is smaller), rescale to [0, 1], normalise by mean and std.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps
from transerve.crop_resample import CropGeometry, resize_and_crop

ResampleName = Literal["nearest", "lanczos", "bilinear", "bicubic", "box", "hamming"]
# PIL's numbering, which Hugging Face's ``resample`` uses
PIL_RESAMPLE: dict[int, ResampleName] = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box",
                                         5: "hamming"}


@dataclass(frozen=True)
class ImagePreprocessing:
    size: int  # the square side the model sees
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: ResampleName = "bilinear"
    resize: tuple[int, int] | None = None  # (height, width) to resize to before the crop; None: to size × size
    shortest_edge: int | None = None  # resize keeping the aspect ratio, the shorter side to this (before the crop)
    crop: bool = False  # centre-crop to size × size after resizing
    crop_rounding: Literal["floor", "round"] = "floor"  # the crop's offset: Hugging Face floors, torchvision rounds
    rescale: float = 1 / 255
    normalize: bool = True
    alpha: Literal["black", "drop"] = "black"  # black: composite onto black (the zoo); drop: PIL's convert("RGB")
    exif_transpose: bool = False  # turn the pixels as the EXIF orientation says before anything else

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> ImagePreprocessing:
        """From ``config.yaml``'s ``preprocessing`` mapping (lists for the tuples); an unknown key is an error
        naming it, so that a setting is never silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"preprocessing: unknown setting(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        tuples = {k: tuple(v) for k, v in values.items() if k in ("mean", "std", "resize") and v is not None}
        return cls(**{**values, **tuples})

    def to_config(self) -> dict[str, Any]:
        """The mapping ``config.yaml`` holds: only what differs from the defaults, besides size, mean, std, resample."""
        always = ("size", "mean", "std", "resample")
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in always or value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def apply_one(self, image: Image.Image) -> np.ndarray:
        """Any mode, any size → float32 ``[3, size, size]``."""
        rgb = self._rgb(ImageOps.exif_transpose(image) if self.exif_transpose else image)
        pixels = self._resized_and_cropped(rgb)
        out = np.empty((3, *pixels.shape[:2]), np.float32)
        for channel, table in enumerate(self._tables):  # rescale and normalise: one lookup per 8-bit value
            np.take(table, pixels[..., channel], out=out[channel])
        return out

    def _resized_and_cropped(self, rgb: Image.Image) -> np.ndarray:
        """8-bit ``[H, W, 3]`` after the resize and the crop (resampling only the crop where that gives the
        same pixels: :mod:`transerve.crop_resample`)."""
        height, width = self.resized_shape(rgb.height, rgb.width)
        if self.crop and height >= self.size and width >= self.size and (height, width) != (rgb.height, rgb.width):
            return resize_and_crop(rgb, CropGeometry(
                source=(rgb.height, rgb.width), resized=(height, width),
                offset=(self._offset(height), self._offset(width)), crop=self.size,
                resample=Image.Resampling[self.resample.upper()]))
        if (height, width) != (rgb.height, rgb.width):
            rgb = rgb.resize((width, height), Image.Resampling[self.resample.upper()])
        pixels = np.asarray(rgb)
        return self._center_crop(pixels) if self.crop else pixels

    @functools.cached_property
    def _tables(self) -> list[np.ndarray]:
        """Per channel, the float32 value of each 8-bit level: ``(v · rescale − mean) / std`` computed as the
        array form would compute it, so a lookup gives the same bits."""
        levels = np.arange(256, dtype=np.float32) * np.float32(self.rescale)
        if not self.normalize:
            return [levels] * 3
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        return [((levels - mean[c]) / std[c]).astype(np.float32) for c in range(3)]

    def apply(self, images: Sequence[Image.Image]) -> np.ndarray:
        """A batch ``[N, 3, size, size]``."""
        return np.stack([self.apply_one(im) for im in images]) if images else np.zeros((0, 3, self.size, self.size),
                                                                                      np.float32)

    def _rgb(self, image: Image.Image) -> Image.Image:
        if self.alpha == "black" and image.mode in ("RGBA", "LA", "P", "PA"):  # transparency onto black
            image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))
        return image if image.mode == "RGB" else image.convert("RGB")

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of this shape after the resize step (before the crop)."""
        if self.shortest_edge is not None:
            short, long = min(height, width), max(height, width)
            new_long = int(self.shortest_edge * long / short)
            return (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)
        if self.resize is not None:
            return self.resize
        return (height, width) if self.crop else (self.size, self.size)

    def _center_crop(self, pixels: np.ndarray) -> np.ndarray:
        """The central ``size × size`` (zero padding around an image smaller than that, as both libraries do)."""
        height, width = pixels.shape[:2]
        if height < self.size or width < self.size:
            padded = np.zeros((max(height, self.size), max(width, self.size), 3), pixels.dtype)
            top, left = (padded.shape[0] - height) // 2, (padded.shape[1] - width) // 2
            padded[top:top + height, left:left + width] = pixels
            pixels, height, width = padded, padded.shape[0], padded.shape[1]
        top, left = self._offset(height), self._offset(width)
        return pixels[top:top + self.size, left:left + self.size]

    def _offset(self, length: int) -> int:
        excess = length - self.size
        return excess // 2 if self.crop_rounding == "floor" else round(excess / 2.0)
