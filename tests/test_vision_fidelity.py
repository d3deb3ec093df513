"""Imported classifiers see images as their library's own processor makes them, on real photos.

The photos ship with scikit-learn (``china.jpg``, ``flower.jpg``: 427 × 640 JPEGs); besides them, a non-square
crop, and grayscale, CMYK, transparent and EXIF-rotated versions. The reference is Hugging Face's own pipeline:
``transformers.image_utils.load_image`` (which applies the EXIF orientation) and the model's image processor
(``ViTImageProcessor``, ``DeiTImageProcessor``, slow: PIL resampling), in fp32. Tolerance: pixel values within
1e-4 max-abs; served class probabilities within 1e-4 of the library's processor + model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from helpers import image_bytes, running_server
from PIL import Image
from transerve.image_recipes import from_hf_processor
from transerve.preprocessing import ImagePreprocessing
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

IMAGES = Path(__file__).parent / "data" / "images"

transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs transformers")
TOL = 1e-4
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
PROCESSORS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit-224": ("ViTImageProcessor", {"do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2,
                                      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                                      "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_convert_rgb": True}),
    "deit-256-crop-224": ("DeiTImageProcessor", {"do_resize": True, "size": {"height": 256, "width": 256},
                                                 "resample": 3, "do_center_crop": True,
                                                 "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
                                                 "rescale_factor": 1 / 255, "do_normalize": True, **IMAGENET,
                                                 "do_convert_rgb": True}),
    "vit-lanczos-no-normalize": ("ViTImageProcessor", {"size": {"height": 224, "width": 224}, "resample": 1,
                                                       "do_normalize": False, "do_convert_rgb": True}),
}


def photo(name: str) -> Image.Image:
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name))


def variant(kind: str) -> bytes:
    """The photo as a user would send it: JPEG (or PNG where the mode needs it), in one of the forms real files
    come in."""
    china = photo("china.jpg")
    images = {"china": china, "flower": photo("flower.jpg"), "crop": china.crop((100, 50, 420, 290)),
              "gray": china.convert("L"), "cmyk": china.convert("CMYK"), "tall": china.crop((0, 0, 150, 427))}
    if kind == "rgba":
        rgba = china.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(china.size))
        return image_bytes(rgba, "PNG")
    if kind == "exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
        return image_bytes(china, "JPEG", quality=95, exif=exif.tobytes())
    return image_bytes(images[kind], "JPEG", quality=95)


KINDS = ["china", "flower", "crop", "tall", "gray", "cmyk", "rgba", "exif-rotated"]


def hf_pixels(processor: str, settings: dict[str, Any], data: bytes, path: Path) -> np.ndarray:
    """What the library feeds its model: ``load_image`` on the file, then the processor."""
    from transformers.image_utils import load_image

    path.write_bytes(data)
    image = load_image(str(path))
    out = getattr(transformers, processor)(**settings)(image, return_tensors="np")["pixel_values"]
    return np.asarray(out[0], np.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(PROCESSORS))
def test_preprocessing_equals_the_hf_processor_on_photos(name: str, kind: str, tmp_path: Path) -> None:
    processor, settings = PROCESSORS[name]
    data = variant(kind)
    expected = hf_pixels(processor, settings, data, tmp_path / "photo")
    ours = from_hf_processor(settings, 224).apply_one(Image.open(io.BytesIO(data)))
    assert ours.shape == expected.shape == (3, 224, 224)
    np.testing.assert_allclose(ours, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("dropped", ["crop", "interpolation", "exif"])
def test_the_parity_check_catches_a_dropped_step(dropped: str, tmp_path: Path) -> None:
    """Each step matters on real photos: without it the pixels move far beyond the tolerance."""
    processor, settings = PROCESSORS["deit-256-crop-224"]
    data = variant("exif-rotated" if dropped == "exif" else "china")
    expected = hf_pixels(processor, settings, data, tmp_path / "photo")
    right = from_hf_processor(settings, 224)
    wrong = ImagePreprocessing.from_config({**right.to_config(), **{
        "crop": {"crop": False, "resize": None}, "interpolation": {"resample": "bilinear"},
        "exif": {"exif_transpose": False}}[dropped]})
    assert np.abs(right.apply_one(Image.open(io.BytesIO(data))) - expected).max() <= TOL
    assert np.abs(wrong.apply_one(Image.open(io.BytesIO(data))) - expected).max() > 100 * TOL


@pytest.mark.parametrize(("settings", "words"), [
    ({"do_pad": True}, "do_pad not supported"),
    ({"size": {"longest_edge": 224}}, "size {'longest_edge': 224} not supported"),
    ({"size": {"height": 256, "width": 256}}, "makes 256 px images; the model takes 224 px"),
    ({"resample": 9}, "resample 9 is not a PIL filter"),
])
def test_settings_that_cannot_be_reproduced_are_refused_by_name(settings: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("{", r"\{").replace("}", r"\}")):
        from_hf_processor(settings, 224)


def write_hf_deit_checkpoint(directory: Path) -> Any:
    """A random ViT at 224 px saved as Hugging Face saves DeiT's ``facebook/deit-*-patch16-224``: ``model_type:
    vit`` and a ``DeiTImageProcessor`` config (resize 256 bicubic, centre crop 224, ImageNet mean and std)."""
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=224, patch_size=32, num_labels=7)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(directory)
    processor, settings = PROCESSORS["deit-256-crop-224"]
    (directory / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": processor, **settings}))
    return model


@pytest.mark.slow
def test_a_served_deit_checkpoint_answers_as_the_library(tmp_path: Path) -> None:
    """Export hf-vit, serve fp32, classify the photos as JPEG bytes: probabilities within 1e-4 of the library's
    processor + model on the same files."""
    from transerve.cli import app
    from typer.testing import CliRunner

    model = write_hf_deit_checkpoint(tmp_path / "ckpt")
    result = CliRunner().invoke(app, ["export", "hf-vit", str(tmp_path / "ckpt"), "--repo", str(tmp_path / "repo"),
                                      "--name", "deit"], terminal_width=200)
    assert result.exit_code == 0, result.output
    kinds = ["china", "flower", "crop", "gray", "exif-rotated"]
    processor, settings = PROCESSORS["deit-256-crop-224"]
    pixels = np.stack([hf_pixels(processor, settings, variant(k), tmp_path / f"{k}.img") for k in kinds])
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(pixels)).logits, -1).numpy()
    with running_server(tmp_path / "repo", "--precision", "fp32") as server, \
            grpc.insecure_channel(server.address) as channel:
        reply = tpb_grpc.ClassifierStub(channel).Classify(tpb.ClassifyRequest(
            model="deit", images=[tpb.Image(encoded=variant(k)) for k in kinds], top_k=7), timeout=120)
    served = np.zeros_like(expected)
    for row, result_ in enumerate(reply.results):
        for p in result_.predictions:
            served[row, p.index] = p.score
    np.testing.assert_allclose(served, expected, atol=TOL, rtol=0)


def test_inspect_shows_the_preprocessing_an_entry_serves_with(tmp_path: Path) -> None:
    from transerve.cli import app
    from typer.testing import CliRunner

    write_hf_deit_checkpoint(tmp_path / "ckpt")
    runner = CliRunner()
    exported = runner.invoke(app, ["export", "hf-vit", str(tmp_path / "ckpt"), "--repo", str(tmp_path / "repo"),
                                   "--name", "deit"], terminal_width=200)
    assert exported.exit_code == 0, exported.output
    shown = runner.invoke(app, ["inspect", str(tmp_path / "repo" / "deit")], terminal_width=400)
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())  # rich wraps long lines
    shown_prep = text[text.index("preprocessing (config.yaml"):]
    for words in ("from preprocessor_config.json", "size 224", "resample bicubic", "resize [256, 256]", "crop True",
                  "exif_transpose True"):
        assert words in shown_prep, shown_prep


@pytest.mark.parametrize("kind", ["china", "tall", "crop"])
def test_shortest_edge_resize_and_crop_equal_the_libraries_transforms(kind: str, tmp_path: Path) -> None:
    """``size: {shortest_edge: 256}`` + centre crop 224, against transformers' own image transforms (the steps its
    processors run: ``get_resize_output_image_size``, ``resize``, ``center_crop``, ``rescale``, ``normalize``)."""
    from transformers import image_transforms as t
    from transformers.image_utils import PILImageResampling, load_image

    settings = {"size": {"shortest_edge": 256}, "resample": 3, "do_center_crop": True,
                "crop_size": {"height": 224, "width": 224}, **IMAGENET}
    data = variant(kind)
    (tmp_path / "photo").write_bytes(data)
    pixels = np.asarray(load_image(str(tmp_path / "photo")))
    shape = t.get_resize_output_image_size(pixels, 256, default_to_square=False)
    resized = t.resize(pixels, shape, resample=PILImageResampling.BICUBIC)
    cropped = t.center_crop(resized, (224, 224))
    expected = t.normalize(t.rescale(cropped, 1 / 255), IMAGENET["image_mean"], IMAGENET["image_std"])
    ours = from_hf_processor(settings, 224).apply_one(Image.open(io.BytesIO(data)))
    np.testing.assert_allclose(ours, np.asarray(expected, np.float32).transpose(2, 0, 1), atol=TOL, rtol=0)


def normalized(pixels: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    x = np.asarray(pixels, np.float32) / np.float32(255)
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)


IMAGENET_MS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_torchvision_recipe_is_the_weights_transform_written_out() -> None:
    """IMAGENET1K_V1's ``transforms()`` on the 427 × 640 photo, by its formula: the shortest edge to 256 (the
    other side truncated: 383), bilinear; a 224 centre crop at offsets rounded as torchvision rounds them
    ((383 − 224) / 2 = 79.5 → 80, Hugging Face would floor to 79); ImageNet mean and std."""
    from transerve.image_recipes import TORCHVISION_PRESETS, torchvision_recipe

    china = photo("china.jpg")
    expected = normalized(china.resize((383, 256), Image.Resampling.BILINEAR).crop((80, 16, 304, 240)), *IMAGENET_MS)
    ours = torchvision_recipe(*TORCHVISION_PRESETS["IMAGENET1K_V1"], 224).apply_one(china)
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("mode", "resized", "box"), [
    ("center", (371, 248), (74, 12, 298, 236)),  # floor(224 / 0.9) = 248 on the short side; (371-224)/2 = 73.5 → 74
    ("squash", (248, 248), (12, 12, 236, 236)),
])
def test_timm_eval_transform_is_its_formula(mode: str, resized: tuple[int, int], box: tuple[int, ...]) -> None:
    from transerve.image_recipes import from_timm_cfg

    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": mode,
           "mean": IMAGENET_MS[0], "std": IMAGENET_MS[1]}
    china = photo("china.jpg")
    expected = normalized(china.resize(resized, Image.Resampling.BICUBIC).crop(box), *IMAGENET_MS)
    np.testing.assert_allclose(from_timm_cfg(cfg, 224).apply_one(china), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="crop_mode 'border' not supported"):
        from_timm_cfg({**cfg, "crop_mode": "border"}, 224)


def test_torchvision_export_takes_the_recipe_and_refuses_a_wrong_one(tmp_path: Path) -> None:
    from test_importers_vit import torchvision_vit
    from transerve.cli import app
    from typer.testing import CliRunner

    torchvision_vit(tmp_path / "ckpt")  # a 32 px model
    runner = CliRunner()
    args = ["export", "torchvision-vit", str(tmp_path / "ckpt"), "--repo", str(tmp_path / "repo"), "--name", "tv"]
    wrong = runner.invoke(app, [*args, "--image-recipe", "IMAGENET1K_V1"], terminal_width=200)
    assert wrong.exit_code == 2 and "crop size 224 does not match the model's 32 px" in " ".join(wrong.output.split())
    done = runner.invoke(app, [*args, "--image-recipe", "36:32:bicubic"], terminal_width=200)
    assert done.exit_code == 0, done.output
    config = (tmp_path / "repo" / "tv" / "config.yaml").read_text()
    assert "shortest_edge: 36" in config and "resample: bicubic" in config and "crop: true" in config
    report = json.loads((tmp_path / "repo" / "tv" / "1" / "export_report.json").read_text())
    assert report["preprocessing_from"] == "torchvision recipe 36:32:bicubic"  # the report says which it used


def hostile_images() -> dict[str, tuple[bytes, str]]:
    """Name → (bytes, expected: "ok" or the words the INVALID_ARGUMENT message must hold)."""
    china = photo("china.jpg")

    def jpeg(image: Image.Image, **options: Any) -> bytes:
        return image_bytes(image, "JPEG", **options)

    lying = Image.Exif()
    lying[0x0112] = 9  # no such orientation
    huge = Image.Exif()
    huge[0x010E] = "x" * 60_000  # a 60 kB ImageDescription
    return {
        "smaller than the crop": (jpeg(china.resize((10, 7))), "ok"),
        "1 x 4000 strip": (jpeg(Image.new("RGB", (4000, 1), (200, 10, 10))), "aspect ratio too extreme"),
        "progressive": (jpeg(china, progressive=True, quality=90), "ok"),
        "EXIF orientation that lies": (jpeg(china, exif=lying.tobytes()), "ok"),
        "huge EXIF block": (jpeg(china, exif=huge.tobytes()), "ok"),
        "truncated scan": (jpeg(china)[:20_000], "not a decodable image"),
        "arithmetic-coded": ((IMAGES / "china-arithmetic.jpg").read_bytes(), "ok"),
    }


def test_arithmetic_coded_jpeg_decodes_to_the_huffman_pixels() -> None:
    """Arithmetic and Huffman coding of the same coefficients (made with cjpeg: tests/data/images/README.md) are
    the same picture: the decoder the server uses reads both, to the same pixels."""
    arithmetic, huffman = (Image.open(IMAGES / f"china-{kind}.jpg") for kind in ("arithmetic", "huffman"))
    assert np.array_equal(np.asarray(arithmetic.convert("RGB")), np.asarray(huffman.convert("RGB")))
    assert arithmetic.size == (240, 160)


@pytest.mark.slow
def test_hostile_photos_are_answered_or_refused_by_name(tmp_path: Path) -> None:
    """A shortest-edge + crop model (where a strip would be resized to a million pixels): every image is answered,
    or refused with INVALID_ARGUMENT naming it — never INTERNAL, and the server keeps serving."""
    from transerve.cli import app
    from typer.testing import CliRunner

    write_hf_deit_checkpoint(tmp_path / "ckpt")
    settings = {"size": {"shortest_edge": 256}, "resample": 3, "do_center_crop": True,
                "crop_size": {"height": 224, "width": 224}, **IMAGENET}
    (tmp_path / "ckpt" / "preprocessor_config.json").write_text(json.dumps(settings))
    exported = CliRunner().invoke(app, ["export", "hf-vit", str(tmp_path / "ckpt"), "--repo", str(tmp_path / "repo"),
                                        "--name", "edge"], terminal_width=200)
    assert exported.exit_code == 0, exported.output
    with running_server(tmp_path / "repo", "--precision", "fp32") as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = tpb_grpc.ClassifierStub(channel)
        for name, (data, expected) in hostile_images().items():
            request = tpb.ClassifyRequest(model="edge", images=[tpb.Image(encoded=data)], top_k=1)
            if expected == "ok":
                assert len(stub.Classify(request, timeout=60).results) == 1, name
                continue
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(request, timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, refused.value.details())
            assert "images[0]" in refused.value.details() and expected in refused.value.details(), name
        assert stub.Classify(tpb.ClassifyRequest(model="edge", images=[tpb.Image(encoded=variant("china"))]),
                             timeout=60).results
