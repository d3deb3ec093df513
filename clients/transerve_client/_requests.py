"""Request builders and response readers shared by the sync and asyncio clients (no I/O here)."""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transerve_client._proto import inference_pb2 as ipb
from transerve_client._proto import transerve_pb2 as tpb

ImageLike = str | os.PathLike[str] | bytes | np.ndarray | Any  # Any: a PIL.Image.Image

_DATATYPES = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "UINT8", np.dtype(np.uint16): "UINT16",
              np.dtype(np.uint32): "UINT32", np.dtype(np.uint64): "UINT64", np.dtype(np.int8): "INT8",
              np.dtype(np.int16): "INT16", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
              np.dtype(np.float16): "FP16", np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}
_NUMPY = {v: k for k, v in _DATATYPES.items()}


@dataclass(frozen=True)
class Prediction:
    """One class of a classification: its label, its index in the model's output, its probability."""

    label: str
    index: int
    score: float


def translate_request(texts: Sequence[str], model: str | None, beam_size: int | None,
                      max_new_tokens: int | None, length_penalty: float | None = None) -> Any:
    if isinstance(texts, str):
        raise TypeError("translate() takes a list of texts; wrap a single text in a list")
    options = tpb.TranslateOptions(beam_size=beam_size or 0, max_new_tokens=max_new_tokens or 0)
    if length_penalty is not None:
        options.length_penalty = length_penalty
    return tpb.TranslateRequest(model=model or "", texts=list(texts), options=options)


def stream_request(text: str, model: str | None) -> Any:
    return tpb.TranslateStreamRequest(model=model or "", text=text)


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("sending PIL images or uint8 pixel arrays needs Pillow: "
                          "pip install 'transerve-client[images]'") from None
    return Image


def image_message(image: ImageLike) -> Any:
    """Paths and bytes are sent encoded as they are; float32 arrays as preprocessed tensors; uint8 arrays and
    PIL images as PNG."""
    if isinstance(image, bytes | bytearray):
        return tpb.Image(encoded=bytes(image))
    if isinstance(image, str | os.PathLike):
        return tpb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, np.ndarray):
        if image.dtype == np.float32:
            return tpb.Image(tensor=tpb.Tensor(shape=list(image.shape), data=image.astype("<f4").tobytes()))
        if image.dtype == np.uint8 and image.ndim in (2, 3):
            return tpb.Image(encoded=_png(_pil().fromarray(image)))
        raise TypeError(f"image arrays must be float32 (preprocessed [C, H, W]) or uint8 pixels ([H, W] or "
                        f"[H, W, C]); got {image.dtype} {list(image.shape)}")
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image, without importing Pillow to check
        return tpb.Image(encoded=_png(image))
    raise TypeError(f"cannot send a {type(image).__name__} as an image (path, bytes, PIL image or numpy array)")


def classify_request(images: Sequence[ImageLike], model: str | None, top_k: int) -> Any:
    if isinstance(images, str | bytes | np.ndarray) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        images = [images]
    if isinstance(images, np.ndarray):  # a [N, C, H, W] batch
        images = list(images)
    return tpb.ClassifyRequest(model=model or "", images=[image_message(i) for i in images], top_k=top_k)


def predictions(response: Any) -> list[list[Prediction]]:
    return [[Prediction(p.label, p.index, p.score) for p in result.predictions] for result in response.results]


def _encode_bytes(values: np.ndarray) -> bytes:
    parts = []
    for value in values.reshape(-1):
        data = value if isinstance(value, bytes) else str(value).encode()
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def infer_request(model: str, inputs: dict[str, np.ndarray], version: str = "") -> Any:
    request = ipb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        array = np.asarray(array)
        if array.dtype.kind in ("U", "S", "O"):
            request.inputs.add(name=name, datatype="BYTES", shape=list(array.shape))
            request.raw_input_contents.append(_encode_bytes(array))
            continue
        if array.dtype not in _DATATYPES:
            raise TypeError(f"input {name!r}: dtype {array.dtype} has no KServe datatype")
        request.inputs.add(name=name, datatype=_DATATYPES[array.dtype], shape=list(array.shape))
        request.raw_input_contents.append(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"))
                                          .tobytes())
    return request


def _decode_bytes(raw: bytes, count: int) -> np.ndarray:
    out, offset = [], 0
    for _ in range(count):
        (length,) = struct.unpack_from("<I", raw, offset)
        out.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    return np.array(out, dtype=np.object_)


def infer_outputs(response: Any) -> dict[str, np.ndarray]:
    outputs: dict[str, np.ndarray] = {}
    raws = list(response.raw_output_contents)
    for i, tensor in enumerate(response.outputs):
        shape = [int(d) for d in tensor.shape]
        count = int(np.prod(shape)) if shape else 1
        if tensor.datatype == "BYTES":
            values = _decode_bytes(raws[i], count) if raws else np.array(list(tensor.contents.bytes_contents),
                                                                          dtype=np.object_)
            outputs[tensor.name] = values.reshape(shape)
        elif raws:
            outputs[tensor.name] = np.frombuffer(raws[i], _NUMPY[tensor.datatype].newbyteorder("<")).reshape(shape)
        else:
            field = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
                     "BOOL": "bool_contents", "UINT64": "uint64_contents"}.get(tensor.datatype)
            values = getattr(tensor.contents, field or ("int_contents" if tensor.datatype.startswith("INT")
                                                         else "uint_contents"))
            outputs[tensor.name] = np.asarray(values, dtype=_NUMPY[tensor.datatype]).reshape(shape)
    return outputs
