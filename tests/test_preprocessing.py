"""Image preprocessing gives the same tensor whatever mode the same picture arrives in."""

from __future__ import annotations

import io

import numpy as np
from helpers import png_bytes
from PIL import Image
from transerve.crop_resample import CropGeometry, CropPlan, apply_plan, crop_plan, exact_crop_interval
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



def whole_then_cropped(prep: ImagePreprocessing, image: Image.Image) -> np.ndarray:
    """The reference: resample the whole image, then crop — the libraries' order."""
    height, width = prep.resized_shape(image.height, image.width)
    resample = Image.Resampling[prep.resample.upper()]
    return prep._center_crop(np.asarray(image.resize((width, height), resample)))


def test_resampling_only_the_crop_gives_the_same_pixels() -> None:
    """For every filter, resize mode and source shape (dyadic scales where the crop-only path can run, others
    where it must not, upscaling, shapes where Pillow orders its passes differently) the pixels are exactly
    those of resample-then-crop; and the crop-only path really runs for most of them."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (431, 643, 3), dtype=np.uint8))
    planned = tried = 0
    for resample in ("bilinear", "bicubic", "lanczos", "box", "hamming", "nearest"):
        for prep in (ImagePreprocessing(size=224, resize=(256, 256), crop=True, resample=resample),
                     ImagePreprocessing(size=224, shortest_edge=256, crop=True, resample=resample),
                     ImagePreprocessing(size=200, shortest_edge=229, crop=True, resample=resample,
                                        crop_rounding="round"),
                     ImagePreprocessing(size=384, resize=(512, 512), crop=True, resample=resample)):
            for source in (photo, photo.crop((0, 0, 640, 427)), photo.crop((3, 5, 323, 421)),
                           photo.crop((0, 0, 427, 416))):
                height, width = prep.resized_shape(source.height, source.width)
                geometry = CropGeometry((source.height, source.width), (height, width),
                                        (prep._offset(height), prep._offset(width)), prep.size,
                                        Image.Resampling[resample.upper()])
                planned, tried = planned + (crop_plan(geometry) is not None), tried + 1
                got = prep._resized_and_cropped(source)
                assert np.array_equal(got, whole_then_cropped(prep, source)), (resample, prep, source.size)
    assert planned > tried // 2, (planned, tried)


def test_a_wrong_plan_is_caught() -> None:
    """The noise check can fail: a plan one pixel off, or with the passes in the other order, differs."""
    photo = Image.effect_noise((320, 416), 64).convert("RGB")
    geometry = CropGeometry((416, 320), (256, 256), (16, 16), 224, Image.Resampling.BILINEAR)
    whole = np.asarray(photo.resize((256, 256), Image.Resampling.BILINEAR))[16:240, 16:240]
    shifted = CropPlan(box=(21.25, 26.0, 301.25, 390.0), size=(224, 224), offset=(0, 0))
    assert not np.array_equal(apply_plan(photo, geometry, shifted), whole)
    exact = CropPlan(box=(20.0, 26.0, 300.0, 390.0), size=(224, 224), offset=(0, 0))
    assert (crop_plan(geometry) is not None) == np.array_equal(apply_plan(photo, geometry, exact), whole)


def test_crop_interval_refuses_inexact_scales() -> None:
    assert exact_crop_interval(640, 256, 16, 224) == (40.0, 600.0)
    assert exact_crop_interval(427, 256, 16, 224) == (26.6875, 400.3125)
    assert exact_crop_interval(643, 383, 79, 224) is None  # 643 / 383: not dyadic
