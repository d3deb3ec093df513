"""An unexpected exception inside each streaming RPC: INTERNAL with the request id, counted, server still serving.

The server runs in this process (``TranserveServer`` on ``127.0.0.1:0``) so a model method can be replaced
by one that raises once: ``TranslatorModel.stream`` for ``TranslateStream`` and ``ModelStreamInfer`` with
``stream: true``, ``ClassifierModel.logits`` for a plain ``ModelStreamInfer`` message. Reference for "still
serving": the same request right after, answered as usual.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from transerve.server.app import ServeOptions, TranserveServer
from transerve.server.engine.classifier import ClassifierModel
from transerve.server.engine.translator import TranslatorModel
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client.codec import encode_bytes

ID = re.compile(r"internal error \(request id ([A-Za-z0-9._:/-]+)\)")


def fail_once(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, streaming: bool, call: int = 1) -> list[int]:
    """Replace ``owner.name`` by a version whose ``call``-th call raises RuntimeError; returns the call count."""
    original, calls = getattr(owner, name), [0]

    def first_raises(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError("injected fault")
        return original(self, *args, **kwargs)

    async def first_raises_stream(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError("injected fault")
        async for item in original(self, *args, **kwargs):
            yield item

    monkeypatch.setattr(owner, name, first_raises_stream if streaming else first_raises)
    return calls


def errors_counted(server: TranserveServer, rpc: str, model: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "transerve_requests_total", {"model": model, "rpc": rpc, "code": "INTERNAL"})
    return value or 0.0


def with_server(repo: Path, body: Callable[[TranserveServer, grpc.aio.Channel], Any]) -> None:
    async def main() -> None:
        server = TranserveServer(ServeOptions(repo=repo, port=0, metrics_port=None))
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                await body(server, channel)
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 120))


def stream_request(text: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny-mt", id="s-1")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes([text]))
    request.parameters["stream"].bool_param = True
    return request


def test_translate_stream_fault_is_internal_with_the_request_id(small_repo: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fail_once(monkeypatch, TranslatorModel, "stream", streaming=True)

    async def body(server: TranserveServer, channel: grpc.aio.Channel) -> None:
        stub = tpb_grpc.TranslatorStub(channel)
        call = stub.TranslateStream(tpb.TranslateStreamRequest(text="seven", model="tiny-mt"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.INTERNAL
        match = ID.search(info.value.details() or "")
        assert match is not None, info.value.details()
        trailing = dict(info.value.trailing_metadata() or ())
        assert trailing.get("x-request-id") == match.group(1)
        assert errors_counted(server, "TranslateStream", "tiny-mt") == 1
        messages = [m async for m in stub.TranslateStream(tpb.TranslateStreamRequest(text="seven", model="tiny-mt"))]
        assert messages[-1].done  # still serving

    with_server(small_repo, body)


@pytest.mark.parametrize("kind", ["stream-translation", "infer-message"])
def test_model_stream_infer_fault_is_answered_in_the_stream(small_repo: Path, monkeypatch: pytest.MonkeyPatch,
                                                            kind: str) -> None:
    if kind == "stream-translation":
        fail_once(monkeypatch, TranslatorModel, "stream", streaming=True)
        request, model = stream_request("seven"), "tiny-mt"
    else:
        fail_once(monkeypatch, ClassifierModel, "logits", streaming=False, call=2)  # call 1: the warm-up
        request, model = pb.ModelInferRequest(model_name="tiny-vit", id="i-1"), "tiny-vit"
        request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 8, 8])
        request.raw_input_contents.append(np.zeros((1, 3, 8, 8), "<f4").tobytes())

    async def body(server: TranserveServer, channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        responses = [r async for r in stub.ModelStreamInfer(iter([request, request]))]
        assert responses[0].error_message.startswith("INTERNAL: internal error (request id ")
        assert ID.search(responses[0].error_message) is not None
        assert not any(r.error_message for r in responses[1:])  # the same stream answered the next message
        assert responses[-1].infer_response.outputs or responses[-1].infer_response.parameters[
            "triton_final_response"].bool_param
        assert errors_counted(server, "ModelStreamInfer", model) == 1

    with_server(small_repo, body)
