"""Image preprocessing, defined once so training and serving cannot drift apart.

The zoo trains through :meth:`ImagePreprocessing.apply` and writes its fields
into the model's metadata; the server rebuilds the same object from
``config.yaml`` and runs the same code on decoded PNG/JPEG images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ImagePreprocessing:
    size: int  # square side the model expects
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: str = "bilinear"  # a PIL filter name

    def apply_one(self, image: Image.Image) -> np.ndarray:
        """Any mode, any size → float32 ``[3, size, size]``: RGB, resized, scaled to [0, 1], normalised."""
        if image.mode in ("RGBA", "LA", "P"):  # flatten transparency onto black, the digits' background
            image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))
        filter_ = Image.Resampling[self.resample.upper()]
        rgb = image.convert("RGB").resize((self.size, self.size), filter_)
        x = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)  # [H, W, 3]
        normalised = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return normalised.astype(np.float32).transpose(2, 0, 1).copy()  # [3, H, W]

    def apply(self, images: Sequence[Image.Image]) -> np.ndarray:
        """A batch ``[N, 3, size, size]``."""
        return np.stack([self.apply_one(im) for im in images]) if images else np.zeros((0, 3, self.size, self.size),
                                                                                      np.float32)
