"""The graphs of one repository entry and precision, with their weights in one shared, page-aligned file.

Why (measured on the opus-mt-en-de-shaped translator, bench/RESULTS.md "Memory"): with weights inline in
each ``.onnx``, ONNX Runtime parses them into the heap — the 58 101 × 512 embedding, which the encoder's
Gather and the decoder's Gather and output projection all read, was held once per session, and the load's
peak stayed in the process. With external data at page-aligned offsets ONNX Runtime maps the file instead:
a page is resident only once it is read (the encoder's Gather touches only the rows of the tokens it sees),
and the kernel can drop clean pages under pressure. Writing one file per precision and storing a tensor that
two graphs share once keeps the entry on disk at its weight bytes: ``encoder.onnx`` and
``decoder_step_ragged.onnx`` point into the same ``weights.bin`` for the embedding.

Measured while choosing (the opus-shaped encoder + decoder sessions alone, RSS growth on creating both, one
run on an AMD EPYC): weights inline 574 MB; external data per graph 294 MB; the embedding shared between the
two sessions through ``SessionOptions.add_initializer`` 408 MB (ONNX Runtime still made its own copy for the
decoder's transposed output projection, and the shared array stays resident beside it). Served, with one
shared ``weights.bin``: 422 MB after warm-up, against 687 MB with both graphs inline (bench/RESULTS.md).

Small tensors (under :data:`MIN_EXTERNAL_BYTES`) stay inline: padding each to a page would cost more than
they weigh.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Final

import onnx

ALIGNMENT: Final = 1 << 12  # the page size: ONNX Runtime maps a tensor whose offset is page-aligned (else reads it)
MIN_EXTERNAL_BYTES: Final = 1 << 16


def weights_filename(suffix: str = "") -> str:
    """``weights.bin`` for fp32, ``weights.int8.bin`` for a variant's ``.int8`` suffix."""
    return f"weights{suffix}.bin"


def save_graphs(vdir: Path, graphs: dict[str, onnx.ModelProto], suffix: str = "") -> dict[str, int]:
    """Write ``vdir/<graph><suffix>.onnx`` for every graph, their large tensors in one ``weights<suffix>.bin``
    (identical tensors once). The protos passed in are left as they were. Returns bytes written per file."""
    vdir.mkdir(parents=True, exist_ok=True)
    location = weights_filename(suffix)
    offsets: dict[bytes, tuple[int, int]] = {}  # content digest → (offset, length)
    sizes: dict[str, int] = {}
    with (vdir / location).open("wb") as weights:
        for graph, proto in graphs.items():
            external = copy.deepcopy(proto)
            for tensor in external.graph.initializer:
                data = tensor.raw_data if tensor.HasField("raw_data") else None
                if data is None or len(data) < MIN_EXTERNAL_BYTES:
                    continue  # small, or in typed fields (onnx writes large tensors as raw_data)
                digest = hashlib.sha256(data + str(tensor.data_type).encode()).digest()
                if digest not in offsets:
                    start = -weights.tell() % ALIGNMENT + weights.tell()
                    weights.write(b"\0" * (start - weights.tell()))
                    weights.write(data)
                    offsets[digest] = (start, len(data))
                offset, length = offsets[digest]
                _point_to(tensor, location, offset, length)
            path = vdir / f"{graph}{suffix}.onnx"
            path.write_bytes(external.SerializeToString())
            sizes[path.name] = path.stat().st_size
        sizes[location] = weights.tell()
    if not offsets:  # nothing large: no weights file
        (vdir / location).unlink()
        sizes.pop(location)
    return sizes


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


__all__ = ["ALIGNMENT", "MIN_EXTERNAL_BYTES", "save_graphs", "weights_filename"]
