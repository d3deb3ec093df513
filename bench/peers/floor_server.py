"""The floor of a Python gRPC front end: grpc.aio on uvloop answering every ``ModelInfer`` with one prepared
response — no parsing, no model. ``peers_bench.py`` drives it with the same client as the real servers, so
that the table shows how much of a round trip is gRPC in Python and how much is the server's own work."""

from __future__ import annotations

import argparse

import grpc
import numpy as np
import uvloop
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc


class CannedInference(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: str, classes: int) -> None:
        self.response = pb.ModelInferResponse(model_name=model, model_version="1")
        self.response.outputs.add(name="logits", datatype="FP32", shape=[1, classes])
        self.response.raw_output_contents.append(np.zeros(classes, np.float32).tobytes())

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
        return self.response

    async def ModelReady(self, request: pb.ModelReadyRequest, context: object) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=True)


async def serve(port: int, model: str, classes: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(CannedInference(model, classes), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="vit-digits")
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.model, args.classes))


if __name__ == "__main__":
    main()
