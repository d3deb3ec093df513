"""Model-repository entries: ``REPO/NAME/config.yaml`` plus numbered version folders.

```
repo/NAME/config.yaml     task, backend, batching, inputs/outputs, preprocessing or tokenizer limits
repo/NAME/labels.txt      (classifiers) one label per line
repo/NAME/tokenizer.json  (translators)
repo/NAME/1/*.onnx  1/export_report.json
```
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Final

import yaml
from transerve.generation import DecodingDefaults
from transerve.server.engine.model_config import latest_version

REPORT_FILE: Final = "export_report.json"
CONFIG_FILE: Final = "config.yaml"


def version_dir(repo: Path, name: str, version: int) -> Path:
    return repo / name / str(version)


def batching_defaults(max_batch_size: int) -> dict[str, Any]:
    """A Triton-like starting point: flush at max batch or after 2 ms, bounded queue."""
    preferred = [b for b in (4, 8, 16, 32, 64) if b <= max_batch_size]
    return {"max_queue_delay_ms": 2, "preferred_batch_sizes": preferred, "max_queue_size": 8 * max_batch_size,
            "instances": 1}


def vit_config(name: str, *, image_size: int, in_chans: int, num_classes: int, preprocessing: dict[str, Any],
               max_batch_size: int = 64, default: bool = False) -> dict[str, Any]:
    return {
        "name": name, "task": "classify", "backend": "onnxruntime", "default": default,
        "max_batch_size": max_batch_size, "batching": batching_defaults(max_batch_size),
        "inputs": [{"name": "images", "datatype": "FP32", "dims": [-1, in_chans, image_size, image_size]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "dims": [-1, num_classes]}],
        "preprocessing": preprocessing, "labels": "labels.txt",
        "files": {"model": "model.onnx"},
        "tensorrt": {"profiles": {"images": {"min": [1, in_chans, image_size, image_size],
                                             "opt": [max_batch_size // 2 or 1, in_chans, image_size, image_size],
                                             "max": [max_batch_size, in_chans, image_size, image_size]}}},
    }


def translator_config(name: str, *, num_layers: int, num_heads: int, head_dim: int, vocab_size: int,
                      bos_id: int, eos_id: int, pad_id: int, max_len: int, decoding: DecodingDefaults,
                      max_batch_size: int = 32, default: bool = False) -> dict[str, Any]:
    return {
        "name": name, "task": "translate", "backend": "onnxruntime", "default": default,
        "max_batch_size": max_batch_size, "batching": batching_defaults(max_batch_size),
        "max_input_tokens": max_len - 1, "max_new_tokens": decoding.max_new_tokens,
        "max_new_tokens_limit": max(max_len - 1, decoding.max_new_tokens), "beam_size": decoding.beam_size,
        "generation": decoding.generation_section(),
        "scheduler": {"mode": "continuous", "max_active_sequences": 64, "max_cached_tokens": 64 * max_len},
        "decoder": {"num_layers": num_layers, "num_heads": num_heads, "head_dim": head_dim,
                    "vocab_size": vocab_size, "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id},
        "inputs": [{"name": "text", "datatype": "BYTES", "dims": [-1]}],
        "outputs": [{"name": "translation", "datatype": "BYTES", "dims": [-1]}],
        "tokenizer": "tokenizer.json",
        "files": {"encoder": "encoder.onnx", "decoder_step_ragged": "decoder_step_ragged.onnx"},
        "scoring": {"file": "decoder_score.onnx", "align_file": "decoder_align.onnx",
                    "alignment_layer": max(num_layers - 2, 0)},
        "tensorrt": {"profiles": {"input_ids": {"min": [1, 1], "opt": [max_batch_size // 2 or 1, 32],
                                                "max": [max_batch_size, max_len]}}},
    }


def write_entry(repo: Path, name: str, version: int, config: dict[str, Any],
                extra_files: dict[str, bytes | str | Path]) -> Path:
    """Create ``REPO/NAME/`` afresh for this version; returns the version folder."""
    entry = repo / name
    vdir = version_dir(repo, name, version)
    if vdir.exists():
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    (entry / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    for filename, content in extra_files.items():
        target = entry / filename
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        elif isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    return vdir


def write_report(vdir: Path, report: dict[str, Any]) -> Path:
    path = vdir / REPORT_FILE
    path.write_text(json.dumps(report, indent=2))
    return path


def read_report(entry: Path) -> dict[str, Any]:
    """The export report of an entry's served version; clear errors for what is missing."""
    if not (entry / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{entry}: not a model-repository entry (no {CONFIG_FILE})")
    path = latest_version(entry) / REPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
