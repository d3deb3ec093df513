"""Image preprocessing gives the same tensor whatever mode the same picture arrives in."""

from __future__ import annotations

import io

import numpy as np
from helpers import png_bytes
from PIL import Image
from transerve.preprocessing import ImagePreprocessing


def test_modes_agree() -> None:
    gray = Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8), mode="L")
    prep = ImagePreprocessing(size=16)
    ref = prep.apply_one(gray)
    assert ref.shape == (3, 16, 16) and ref.dtype == np.float32
    for image in (gray.convert("RGB"), gray.convert("RGBA")):
        np.testing.assert_allclose(prep.apply_one(image), ref, atol=1e-6)
    np.testing.assert_allclose(prep.apply_one(Image.open(io.BytesIO(png_bytes(gray)))), ref, atol=1e-6)


def test_normalisation_range() -> None:
    prep = ImagePreprocessing(size=4)
    black = prep.apply_one(Image.new("L", (4, 4), 0))
    white = prep.apply_one(Image.new("L", (4, 4), 255))
    assert np.allclose(black, -1.0) and np.allclose(white, 1.0)
    assert prep.apply([]).shape == (0, 3, 4, 4)
