"""``vit-digits`` / ``vit-digits-bn``: a small ViT trained on scikit-learn's 8×8 digits.

The digits ship inside scikit-learn, so nothing is downloaded. Each image is
turned into an 8-bit grayscale PIL image (what a user would send as a PNG)
and goes through the same :class:`ImagePreprocessing` the server uses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from transerve.models.vit import ViT, ViTConfig
from transerve.models.zoo.training import TrainConfig, seed_everything, train
from transerve.preprocessing import ImagePreprocessing

LABELS = [str(d) for d in range(10)]


@dataclass
class DigitsRecipe:
    """Everything that decides the trained weights (hashed for the zoo cache)."""

    model: ViTConfig = field(default_factory=lambda: ViTConfig(image_size=16, patch_size=4, dim=64, depth=4,
                                                               num_heads=4, mlp_ratio=2.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, batch_size=64, lr=3e-3,
                                                                   weight_decay=0.05))
    max_shift: int = 2  # augmentation: random translation in pixels of the resized image
    test_fraction: float = 0.2
    split_seed: int = 0


def digit_images() -> tuple[list[Image.Image], np.ndarray]:
    """The 1 797 digits as 8×8 8-bit grayscale images, and their labels."""
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 → 0..255
    return [Image.fromarray(p, mode="L") for p in pixels], digits.target.astype(np.int64)


def split_digits(recipe: DigitsRecipe) -> tuple[list[Image.Image], np.ndarray, list[Image.Image], np.ndarray]:
    """Fixed, stratified train/test split."""
    images, labels = digit_images()
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=recipe.test_fraction,
                                           random_state=recipe.split_seed, stratify=labels)
    return ([images[i] for i in idx_train], labels[idx_train], [images[i] for i in idx_test], labels[idx_test])


def random_shift(x: Tensor, max_shift: int, background: float, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=background)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    model.eval()
    preds = torch.cat([model(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])
    return int((preds == y).sum()) / len(y)  # an exact fraction, not a float32 mean


def build_vit_digits(norm: str, recipe: DigitsRecipe | None = None) -> tuple[ViT, dict]:
    """Train one variant; returns the model and its report entry."""
    recipe = recipe or DigitsRecipe()
    cfg = ViTConfig(**{**recipe.model.__dict__, "norm": norm})
    prep = ImagePreprocessing(size=cfg.image_size)
    train_images, train_y, test_images, test_y = split_digits(recipe)
    x_train, x_test = torch.from_numpy(prep.apply(train_images)), torch.from_numpy(prep.apply(test_images))
    y_train, y_test = torch.from_numpy(train_y), torch.from_numpy(test_y)
    background = float((0.0 - prep.mean[0]) / prep.std[0])

    seed_everything(recipe.train.seed)
    model = ViT(cfg)
    gen = torch.Generator().manual_seed(recipe.train.seed)
    bs = recipe.train.batch_size
    steps = (len(x_train) + bs - 1) // bs

    def batches(epoch: int) -> Iterator[tuple[Tensor, ...]]:
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            yield random_shift(x_train[idx], recipe.max_shift, background, gen), y_train[idx]

    def loss_fn(m: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        return F.cross_entropy(m(batch[0]), batch[1], label_smoothing=0.1)

    start = time.perf_counter()
    train(model, batches, steps, loss_fn, recipe.train, f"vit-digits ({norm})")
    seconds = time.perf_counter() - start
    report = {
        "task": "classify",
        "test_accuracy": accuracy(model, x_test, y_test),
        "train_accuracy": accuracy(model, x_train, y_train),
        "test_examples": len(y_test),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "preprocessing": prep.to_config(),
        "labels": LABELS,
    }
    return model, report
