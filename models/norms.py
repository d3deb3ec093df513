"""Normalisation layers for token sequences ``[B, N, C]``, chosen by name.

* **LayerNorm** normalises each token over its own ``C`` features.
* **BatchNorm** normalises each feature over the batch (and every token); at
  inference it uses fixed running statistics, so it is a per-feature affine map
  ``y = s·x + t`` — exactly why it can be folded into the neighbouring linear
  or conv weights at export time.
* **GroupNorm** sits between: each token's features are cut into groups and
  each group is normalised on its own (1 group = LayerNorm without per-feature
  statistics sharing; C groups = InstanceNorm over features).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

NormName = Literal["layer", "batch", "group"]


class FeatureBatchNorm(nn.Module):
    """BatchNorm over the last (feature) axis of ``[..., C]`` inputs.

    Flattening to ``[M, C]`` keeps the channel axis where ONNX's
    ``BatchNormalization`` expects it, with only reshapes around it, so export
    passes can fold it into the preceding MatMul/Gemm.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class FeatureGroupNorm(nn.Module):
    """GroupNorm applied to every token of ``[..., C]`` independently."""

    def __init__(self, dim: int, num_groups: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        if dim % num_groups:
            raise ValueError(f"dim {dim} is not divisible by num_groups {num_groups}")
        self.gn = nn.GroupNorm(num_groups, dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.gn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


_NORMS: dict[str, Callable[..., nn.Module]] = {
    "layer": nn.LayerNorm,
    "batch": FeatureBatchNorm,
    "group": FeatureGroupNorm,
}


def make_norm(name: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """Build the norm layer called ``name`` for ``dim`` features (``eps``: imported models bring their own)."""
    try:
        return _NORMS[name](dim, eps=eps)
    except KeyError:
        raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {name!r}") from None
