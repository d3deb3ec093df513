"""Export the demo zoo's checkpoints into a model repository, verified on the zoo's own test splits."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from transerve.export.exporter import ExportOptions, export_translator_entry, export_vit_entry
from transerve.export.repository import REPORT_FILE
from transerve.models.checkpoint import load_checkpoint
from transerve.models.transformer import Seq2SeqTransformer
from transerve.models.translator import TextTranslator
from transerve.models.vit import ViT
from transerve.models.zoo.build import zoo_entries
from transerve.models.zoo.digits import DigitsRecipe, split_digits
from transerve.models.zoo.numbers import NumbersRecipe
from transerve.models.zoo.numbers_data import make_split
from transerve.preprocessing import ImagePreprocessing

DEFAULTS = {"vit-digits": True, "vit-digits-bn": False, "mt-en-de-numbers": True}


def export_code_version() -> str:
    """Hash of the export package's sources: changing a pass re-exports the zoo."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _is_current(repo: Path, name: str, cache_key: str) -> bool:
    path = repo / name / "1" / REPORT_FILE
    try:
        return bool(json.loads(path.read_text()).get("source_key") == cache_key)
    except (OSError, json.JSONDecodeError):
        return False


def export_zoo(zoo_dir: Path, repo: Path, force: bool = False, int8: bool = True,
               on_status: Callable[[str], None] = print) -> dict[str, Any]:
    """One repository entry per zoo model; entries already exported from the same build are kept."""
    summary: dict[str, Any] = {}
    for name in zoo_entries():
        model, extra = load_checkpoint(zoo_dir / name)
        key = f"{extra.get('cache_key', '')}:{export_code_version()}"
        if not force and _is_current(repo, name, key):
            on_status(f"{name}: repository entry is current")
            summary[name] = json.loads((repo / name / "1" / REPORT_FILE).read_text())
            continue
        opts = ExportOptions(repo=repo, name=name, int8=int8, default=DEFAULTS[name], source=f"zoo:{name}",
                             on_status=on_status)
        if isinstance(model, ViT):
            report = _export_digits(model, extra, opts)
        else:
            assert isinstance(model, Seq2SeqTransformer)
            report = _export_numbers(zoo_dir / name, opts)
        report["source_key"] = key
        (repo / name / "1" / REPORT_FILE).write_text(json.dumps(report, indent=2))
        summary[name] = report
    return summary


def _export_digits(model: ViT, extra: dict[str, Any], opts: ExportOptions) -> dict[str, Any]:
    meta = extra["report"]
    _, _, test_images, test_labels = split_digits(DigitsRecipe())
    images = ImagePreprocessing.from_config(meta["preprocessing"]).apply(test_images)
    return export_vit_entry(model, opts, labels=meta["labels"], preprocessing=meta["preprocessing"],
                            eval_images=images, eval_labels=test_labels)


def _export_numbers(directory: Path, opts: ExportOptions) -> dict[str, Any]:
    translator = TextTranslator.load(directory)
    recipe = NumbersRecipe()
    _, test_pairs = make_split(recipe.data)
    opts = replace(opts, languages={"source": "en", "target": "de"})  # num2words English → German
    return export_translator_entry(translator.model, translator.tokenizer, opts, eval_pairs=test_pairs,
                                   max_new_tokens=recipe.max_new_tokens)
