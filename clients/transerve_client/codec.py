"""KServe v2 tensors ↔ numpy: the one codec the SDK and the server both use.

A tensor travels either as typed ``contents`` or as raw bytes (``raw_input_contents`` /
``raw_output_contents``: little-endian, row-major; a BYTES element is a 4-byte little-endian
length followed by its data). Decoding validates everything a peer could get wrong — datatype,
shape, element count, raw length, BYTES framing — and raises :class:`TensorError` naming the
tensor, the field and the limit; the server answers it as ``INVALID_ARGUMENT``.
Light on purpose (numpy and the generated messages only): the client package never imports
torch or onnx.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
CONTENTS_FIELD: Final = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
_NAMES: Final = {dtype: name for name, dtype in DTYPES.items() if name != "BYTES"}
UNLIMITED: Final = 1 << 62


class TensorError(ValueError):
    """A tensor that does not match the protocol or the receiver's limits."""


def datatype_of(array: np.ndarray) -> str:
    """The KServe datatype of an array (strings and bytes are BYTES)."""
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return "BYTES"
    try:
        return _NAMES[array.dtype]
    except KeyError:
        raise TensorError(f"numpy dtype {array.dtype} has no KServe datatype") from None


def encode_bytes(values: Sequence[bytes | str] | np.ndarray) -> bytes:
    """BYTES elements → the raw encoding (strings as UTF-8)."""
    parts = []
    for value in (values.reshape(-1) if isinstance(values, np.ndarray) else values):
        data = value if isinstance(value, bytes) else str(value).encode()
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def decode_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    """The raw BYTES encoding → an object array of ``count`` ``bytes``, every length checked."""
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


def _shape(tensor: Any, max_elements: int) -> tuple[int, ...]:
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"input {tensor.name!r}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if count > max_elements:
        raise TensorError(f"input {tensor.name!r}: {count} elements exceed the limit of {max_elements}")
    return shape


def to_numpy(tensor: Any, raw: bytes | None, max_elements: int = UNLIMITED) -> np.ndarray:
    """One input or output tensor message (with its raw bytes, if the message used them) → array."""
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
    values = getattr(tensor.contents, CONTENTS_FIELD[tensor.datatype])
    if len(values) != count:
        raise TensorError(f"input {tensor.name!r}: {len(values)} values in contents, shape {list(shape)} needs {count}")
    if tensor.datatype == "BYTES":
        return np.array(list(values), dtype=np.object_).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def add_tensor(tensors: Any, raws: Any | None, name: str, array: np.ndarray) -> None:
    """Append ``array`` to a message's repeated tensor field: as raw bytes into ``raws`` (what Triton sends and
    answers), or as typed contents when ``raws`` is None."""
    array = np.asarray(array)
    datatype = datatype_of(array)
    tensor = tensors.add(name=name, datatype=datatype, shape=list(array.shape))
    if raws is not None:
        raws.append(encode_bytes(array) if datatype == "BYTES" else
                    np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    elif datatype == "BYTES":
        tensor.contents.bytes_contents.extend(
            v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1))
    elif datatype == "FP16":
        raise TensorError(f"tensor {name!r}: FP16 travels as raw contents only (protocol rule)")
    else:
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())


def tensors_to_numpy(tensors: Sequence[Any], raws: Sequence[bytes], max_elements: int = UNLIMITED,
                     field: str = "raw_input_contents") -> dict[str, np.ndarray]:
    """Every tensor of a request or response by name; raw contents, when used, must cover every tensor."""
    if raws and len(raws) != len(tensors):
        raise TensorError(f"{field} has {len(raws)} entries for {len(tensors)} tensors")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(tensors):
        if raws and tensor.HasField("contents"):  # the protocol allows one or the other, never both
            raise TensorError(f"input {tensor.name!r}: both typed contents and {field} are set; send one")
        if tensor.name in arrays:
            raise TensorError(f"input {tensor.name!r} appears twice")
        arrays[tensor.name] = to_numpy(tensor, raws[i] if raws else None, max_elements)
    return arrays


__all__ = ["DTYPES", "TensorError", "add_tensor", "datatype_of", "decode_bytes", "encode_bytes", "tensors_to_numpy",
           "to_numpy"]
