"""``transerve zoo build``: train the demo models here, cache them, report their metrics.

Each model lands in ``OUT/NAME/`` as a checkpoint directory. Its
``config.json`` carries a cache key — a hash of the model's recipe and of the
``transerve.models`` source code — so a second build with nothing changed only
verifies the key and is instant; ``force`` retrains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import torch
import transerve.models as models_pkg
from torch import nn
from transerve.models.checkpoint import CheckpointError, read_checkpoint_config, save_checkpoint
from transerve.models.translator import TOKENIZER_FILE
from transerve.models.zoo.digits import DigitsRecipe, build_vit_digits
from transerve.models.zoo.numbers import NumbersRecipe, build_mt_numbers

log = logging.getLogger(__name__)

REPORT_FILE: Final = "zoo_report.json"


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    recipe: Any
    build: Callable[[], tuple[Any, dict[str, Any]]]


def zoo_entries() -> dict[str, ZooEntry]:
    """The demo models, in build order."""
    digits, numbers = DigitsRecipe(), NumbersRecipe()
    return {
        "vit-digits": ZooEntry(("layer", digits), lambda: build_vit_digits("layer", digits)),
        "vit-digits-bn": ZooEntry(("batch", digits), lambda: build_vit_digits("batch", digits)),
        "mt-en-de-numbers": ZooEntry(numbers, lambda: build_mt_numbers(numbers)),
    }


def code_version() -> str:
    """Hash of every source file of ``transerve.models``: editing a model invalidates the cache."""
    root = Path(models_pkg.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(recipe: Any) -> str:
    def plain(obj: Any) -> Any:
        return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else repr(obj)

    text = json.dumps(recipe, default=plain, sort_keys=True)
    return hashlib.sha256(f"{text}|{code_version()}|torch {torch.__version__}".encode()).hexdigest()[:16]


def cached_report(directory: Path, key: str) -> dict[str, Any] | None:
    """The stored report when ``directory`` holds a complete build with this key."""
    try:
        _, _, extra = read_checkpoint_config(directory)
    except CheckpointError:
        return None
    weights_ok = (directory / "model.safetensors").is_file()
    if extra.get("cache_key") != key or not weights_ok:
        return None
    return dict(extra.get("report", {}))


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def save_entry(result: Any, directory: Path, key: str, report: dict[str, Any]) -> None:
    model: nn.Module = getattr(result, "model", result)
    save_checkpoint(model, directory, extra={"cache_key": key, "report": report})
    tokenizer = getattr(result, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(str(directory / TOKENIZER_FILE))


def build_zoo(out: Path, force: bool = False, only: Sequence[str] | None = None,
              on_status: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (or reuse) each model and write ``OUT/zoo_report.json``; returns the report."""
    entries = zoo_entries()
    unknown = sorted(set(only or ()) - set(entries))
    if unknown:
        raise ValueError(f"unknown zoo model(s) {unknown}; choose from {list(entries)}")
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / REPORT_FILE
    previous = json.loads(report_path.read_text()).get("models", {}) if report_path.is_file() else {}
    reports: dict[str, Any] = dict(previous)
    start = time.perf_counter()
    for name, entry in entries.items():
        if only and name not in only:
            continue
        key = cache_key(entry.recipe)
        cached = None if force else cached_report(out / name, key)
        if cached is not None:
            on_status(f"{name}: cached ({key})")
            reports[name] = {**cached, "checkpoint_bytes": directory_bytes(out / name), "cached": True}
            continue
        result, report = entry.build()
        save_entry(result, out / name, key, report)
        reports[name] = {**report, "checkpoint_bytes": directory_bytes(out / name), "cached": False}
        on_status(f"{name}: trained in {report['train_seconds']} s")
    summary = {"models": reports, "build_seconds": round(time.perf_counter() - start, 1),
               "code_version": code_version()}
    report_path.write_text(json.dumps(summary, indent=2))
    return summary
