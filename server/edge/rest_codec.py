"""KServe v2 REST bodies ↔ the protobuf messages the gRPC service already handles.

The REST front end turns each HTTP inference request into a ``ModelInferRequest`` with raw contents (JSON
``data`` packed, or the bytes of Triton's binary-data extension sliced out of the body) and each
``ModelInferResponse`` back into JSON (and binary tails): so both protocols share one validation, one batcher
and one set of limits. Every malformed field raises :class:`RequestError` naming it (``inputs[1].shape``) —
a 400 with ``{"error": ...}``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transerve.server.exceptions import RequestError
from transerve_client._proto import inference_pb2 as pb
from transerve_client.codec import DTYPES, encode_bytes, tensors_to_numpy

HEADER_LENGTH = "inference-header-content-length"  # Triton's binary-data extension
NESTED_TOO_DEEP = (f"body: JSON nested deeper than the parser's limit (about {sys.getrecursionlimit()} levels; a "
                   "KServe body needs a handful)")
TRANSPORT_PARAMETERS = frozenset({"binary_data_output", "binary_data_size", "binary_data"})


@dataclass
class ParsedInfer:
    request: pb.ModelInferRequest
    binary_outputs: set[str] = field(default_factory=set)  # outputs to answer as binary tails
    all_binary: bool = False  # request parameter binary_data_output: every output binary


def parse_infer(body: bytes, header_length: int | None, model: str, version: str, max_elements: int) -> ParsedInfer:
    """An inference body (JSON, or JSON header + binary tensors) → a raw-contents ``ModelInferRequest``."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise RequestError(f"header {HEADER_LENGTH}: {header_length} is outside 1 to the body's {len(body)} bytes")
    end = len(body) if header_length is None else header_length
    doc = _json_object(body[:end])
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=_text(doc.get("id", ""), "id"))
    parameters = _object(doc.get("parameters", {}), "parameters")
    parsed = ParsedInfer(request, all_binary=bool(parameters.get("binary_data_output", False)))
    _set_parameters(request.parameters, parameters, "parameters")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("inputs: required, a non-empty list of tensors")
    offset = end
    for i, tensor in enumerate(inputs):
        offset = _add_input(request, _object(tensor, f"inputs[{i}]"), f"inputs[{i}]", body, offset, max_elements)
    if offset != len(body):
        raise RequestError(f"body: {len(body) - offset} bytes after the last binary input (binary_data_size "
                           "must cover the body exactly)")
    for i, wanted in enumerate(_list(doc.get("outputs", []), "outputs")):
        wanted = _object(wanted, f"outputs[{i}]")
        name = _text(wanted.get("name"), f"outputs[{i}].name")
        request.outputs.add(name=name)
        if _object(wanted.get("parameters", {}), f"outputs[{i}].parameters").get("binary_data", False):
            parsed.binary_outputs.add(name)
    return parsed


def _add_input(request: pb.ModelInferRequest, tensor: dict[str, Any], where: str, body: bytes, offset: int,
               max_elements: int) -> int:
    name = _text(tensor.get("name"), f"{where}.name")
    datatype = _text(tensor.get("datatype"), f"{where}.datatype")
    if datatype not in DTYPES:
        raise RequestError(f"{where}.datatype: {datatype!r} is not one of {sorted(DTYPES)}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise RequestError(f"{where}.shape: required, a list of non-negative integers")
    count = math.prod(shape)
    if count > max_elements:
        raise RequestError(f"{where}.shape: {count} elements exceed the limit of {max_elements}")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    parameters = _object(tensor.get("parameters", {}), f"{where}.parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise RequestError(f"{where}.parameters.binary_data_size: {size!r} runs past the body's {len(body)} bytes")
        request.raw_input_contents.append(body[offset:offset + size])
        return offset + size
    if "data" not in tensor:
        raise RequestError(f"{where}.data: required (or parameters.binary_data_size with the binary extension)")
    request.raw_input_contents.append(_pack(tensor["data"], datatype, count, f"{where}.data"))
    return offset


def _pack(data: Any, datatype: str, count: int, where: str) -> bytes:
    """JSON ``data`` (row-major, flat or nested) → the raw little-endian bytes of ``count`` elements."""
    if datatype == "BYTES":
        values = list(_flatten(data))
        if not all(isinstance(v, str) for v in values):
            raise RequestError(f"{where}: BYTES elements must be strings")
        found, packed = len(values), encode_bytes([v.encode() for v in values])
    else:
        try:
            array = np.asarray(data, dtype=DTYPES[datatype])
        except (ValueError, TypeError, OverflowError) as e:
            raise RequestError(f"{where}: not {datatype} values in a regular nesting ({e})") from None
        found, packed = array.size, np.ascontiguousarray(array, DTYPES[datatype].newbyteorder("<")).tobytes()
    if found != count:
        raise RequestError(f"{where}: {found} elements, the shape needs {count}")
    return packed


def _flatten(data: Any) -> Any:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def infer_response(response: pb.ModelInferResponse, parsed: ParsedInfer) -> tuple[bytes, int | None]:
    """(body, JSON header length when binary tails follow, else None)."""
    arrays = tensors_to_numpy(response.outputs, response.raw_output_contents, field="raw_output_contents")
    outputs, tails = [], []
    for tensor in response.outputs:
        array = arrays[tensor.name]
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(array.shape)}
        if parsed.all_binary or tensor.name in parsed.binary_outputs:
            raw = encode_bytes(array) if tensor.datatype == "BYTES" else \
                np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        elif tensor.datatype == "BYTES":
            entry["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                             for v in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    doc = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    if response.id:
        doc["id"] = response.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    return (header + b"".join(tails), len(header)) if tails else (header, None)


def parameter_values(parameters: Any) -> dict[str, Any]:
    """A protobuf ``InferParameter`` map as JSON values."""
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in parameters.items()
            if v.WhichOneof("parameter_choice")}


JSON_PARAMETERS = ("glossary",)  # list-valued in REST JSON, a JSON string in the gRPC parameter map


def _set_parameters(target: Any, values: dict[str, Any], where: str) -> None:
    for name, value in values.items():
        if name in TRANSPORT_PARAMETERS:
            continue
        if isinstance(value, bool):
            target[name].bool_param = value
        elif isinstance(value, int):
            target[name].int64_param = value
        elif isinstance(value, float):
            target[name].double_param = value
        elif isinstance(value, str):
            target[name].string_param = value
        elif name in JSON_PARAMETERS and isinstance(value, list):  # KServe's map holds scalars: carried as JSON
            target[name].string_param = json.dumps(value)
        else:
            raise RequestError(f"{where}.{name}: must be a boolean, number or string")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"body: not a JSON object ({e})") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise RequestError(NESTED_TOO_DEEP) from None
    return _object(doc, "body")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(f"{where}: must be a JSON object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise RequestError(f"{where}: must be a list")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where}: required, a string")
    return value
