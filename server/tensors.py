"""KServe v2 tensors ↔ numpy, validated at the edge.

Inputs arrive either as typed ``contents`` or as ``raw_input_contents``
(little-endian, row-major; BYTES elements as a 4-byte little-endian length
followed by the data). Every malformed field becomes a :class:`TensorError`
naming the tensor, the field and the limit, which the servicer turns into
``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
from transerve_client._proto import inference_pb2 as pb

DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_CONTENTS_FIELD: Final = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


class TensorError(ValueError):
    """A tensor that does not match the protocol or the model's limits."""


_NAMES: Final = {dtype: name for name, dtype in DTYPES.items() if name != "BYTES"}


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return "BYTES"
    try:
        return _NAMES[array.dtype]
    except KeyError:
        raise TensorError(f"numpy dtype {array.dtype} has no KServe datatype") from None


def _shape(tensor: Any, max_elements: int) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"input {tensor.name!r}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if count > max_elements:
        raise TensorError(f"input {tensor.name!r}: {count} elements exceed the limit of {max_elements}")
    return shape


def decode_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    """BYTES raw encoding → object array of ``bytes``."""
    out, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise TensorError(f"input {name!r}: raw BYTES content ends inside an element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorError(f"input {name!r}: raw BYTES element of {length} bytes runs past the content")
        out.append(raw[offset:offset + length])
        offset += length
    if offset != len(raw):
        raise TensorError(f"input {name!r}: {len(raw) - offset} bytes left after {count} BYTES elements")
    return np.array(out, dtype=np.object_)


def encode_bytes(values: Sequence[bytes | str]) -> bytes:
    parts = []
    for value in values:
        data = value.encode() if isinstance(value, str) else bytes(value)
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def input_to_numpy(tensor: Any, raw: bytes | None, max_elements: int = 1 << 26) -> np.ndarray:
    """One ``InferInputTensor`` (with its raw bytes, if the request used them) → array."""
    if tensor.datatype not in DTYPES:
        raise TensorError(f"input {tensor.name!r}: datatype {tensor.datatype!r} is not one of {sorted(DTYPES)}")
    shape = _shape(tensor, max_elements)
    count = math.prod(shape)
    dtype = DTYPES[tensor.datatype]
    if raw is not None:
        if tensor.datatype == "BYTES":
            return decode_bytes(raw, count, tensor.name).reshape(shape)
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise TensorError(f"input {tensor.name!r}: raw content has {len(raw)} bytes, shape {list(shape)} "
                              f"{tensor.datatype} needs {expected}")
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape).astype(dtype, copy=False)
    if tensor.datatype == "FP16":
        raise TensorError(f"input {tensor.name!r}: FP16 must be sent in raw_input_contents (protocol rule)")
    values = getattr(tensor.contents, _CONTENTS_FIELD[tensor.datatype])
    if len(values) != count:
        raise TensorError(f"input {tensor.name!r}: {len(values)} values in contents, shape {list(shape)} needs {count}")
    if tensor.datatype == "BYTES":
        return np.array(list(values), dtype=np.object_).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def request_inputs(request: Any, max_elements: int = 1 << 26) -> dict[str, np.ndarray]:
    """All inputs of a ``ModelInferRequest`` by name."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise TensorError(f"raw_input_contents has {len(raws)} entries for {len(request.inputs)} inputs")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise TensorError(f"input {tensor.name!r} appears twice")
        arrays[tensor.name] = input_to_numpy(tensor, raws[i] if raws else None, max_elements)
    return arrays


def fill_response(response: Any, outputs: dict[str, np.ndarray], raw: bool = True) -> None:
    """Append outputs to a ``ModelInferResponse`` (raw contents, as Triton answers, unless ``raw`` is False)."""
    for name, array in outputs.items():
        datatype = datatype_of(array)
        tensor = response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if datatype == "BYTES":
            flat = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]
            if raw:
                response.raw_output_contents.append(encode_bytes(flat))
            else:
                tensor.contents.bytes_contents.extend(flat)
        elif raw:
            response.raw_output_contents.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
                                                .tobytes())
        else:
            getattr(tensor.contents, _CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())


def tensor_metadata(name: str, datatype: str, dims: Sequence[int]) -> Any:
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=list(dims))
