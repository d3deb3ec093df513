"""KServe v2 request tensors ↔ numpy on the server, validated at the edge.

The codec itself (datatypes, raw and typed contents, BYTES framing) is
:mod:`transerve_client.codec`, shared with the SDK so both ends read and
write tensors the same way; this module applies the server's limits and
builds the response and metadata messages. Every malformed field becomes a
:class:`TensorError` naming the tensor, the field and the limit, which the
servicer turns into ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transerve_client._proto import inference_pb2 as pb
from transerve_client.codec import TensorError, add_tensor, tensors_to_numpy


def request_inputs(request: pb.ModelInferRequest, max_elements: int = 1 << 26) -> dict[str, np.ndarray]:
    """All inputs of a ``ModelInferRequest`` by name."""
    return tensors_to_numpy(request.inputs, request.raw_input_contents, max_elements)


def fill_response(response: pb.ModelInferResponse, outputs: dict[str, np.ndarray], raw: bool = True) -> None:
    """Append outputs to a ``ModelInferResponse`` (raw contents, as Triton answers, unless ``raw`` is False)."""
    for name, array in outputs.items():
        add_tensor(response.outputs, response.raw_output_contents if raw else None, name, array)


def tensor_metadata(name: str, datatype: str, dims: Sequence[int]) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=list(dims))


__all__ = ["TensorError", "fill_response", "request_inputs", "tensor_metadata"]
