"""Checkpoint directories: ``config.json`` (architecture + config) and ``model.safetensors``.

Loading validates at the edge: every way a directory can be wrong — missing,
unreadable, corrupt, not matching its config — becomes one
:class:`CheckpointError` whose message names the file, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.models.vit import ViT, ViTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    "vit": (ViTConfig, ViT),
    "transformer": (TransformerConfig, Seq2SeqTransformer),
}


class CheckpointError(Exception):
    """A checkpoint directory that cannot be used; the message says which file and why."""


def architecture_of(model: nn.Module) -> str:
    for name, (_, cls) in ARCHITECTURES.items():
        if isinstance(model, cls):
            return name
    raise CheckpointError(f"cannot save {type(model).__name__}: not one of {sorted(ARCHITECTURES)}")


def save_checkpoint(model: nn.Module, directory: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and optional ``extra`` metadata) to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(model.config)  # type: ignore[call-overload]
    meta = {"architecture": architecture_of(model), "config": config, "extra": extra or {}}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    save_model(model, str(directory / WEIGHTS_FILE))  # handles tied weights, unlike save_file
    return directory


def read_checkpoint_config(directory: Path) -> tuple[str, Any, dict[str, Any]]:
    """Parse ``config.json`` → (architecture, config dataclass, extra)."""
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (it does not exist)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(path.read_text())
        arch = meta["architecture"]
        config_cls = ARCHITECTURES[arch][0]
        config = config_cls(**meta["config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except KeyError as e:
        raise CheckpointError(f"{path}: missing or unknown key {e} (architectures: {sorted(ARCHITECTURES)})") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: config does not fit its architecture: {e}") from None
    return arch, config, meta.get("extra", {})


def load_checkpoint(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model its config describes and load its weights; returns (model in eval mode, extra)."""
    directory = Path(directory)
    arch, config, extra = read_checkpoint_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        model = ARCHITECTURES[arch][1](config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid {arch} config: {e}") from None
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as e:  # shape or key mismatch with the config
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{weights}: does not match {CONFIG_FILE}: {first}") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights}: corrupt or unreadable ({type(e).__name__}: {e})") from None
    return model.eval(), extra
