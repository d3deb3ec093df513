"""PyTriton 0.7 serving an ONNX classifier with ONNX Runtime: the peer that ``bench/peers_bench.py`` starts.

Runs inside its own venv (``nvidia-pytriton``, ``onnxruntime``), never imports transerve. Triton's server binary
ships in the wheel; its Python stub needs the interpreter's ``libpython3.11.so`` on ``LD_LIBRARY_PATH`` (the
bench sets it). Dynamic batching is on (Triton's batcher, max batch ``--max-batch``), which is what a PyTriton
user would configure for many small requests.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--name", default="vit-digits")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--queue-delay-us", type=int, default=0)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    graph_input, graph_output = session.get_inputs()[0], session.get_outputs()[0]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {graph_output.name: session.run(None, {graph_input.name: inputs[graph_input.name]})[0]}

    config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port)
    with Triton(config=config) as triton:
        triton.bind(model_name=args.name, infer_func=infer,
                    inputs=[Tensor(name=graph_input.name, dtype=np.float32, shape=tuple(graph_input.shape[1:]))],
                    outputs=[Tensor(name=graph_output.name, dtype=np.float32, shape=(-1,))],
                    config=ModelConfig(max_batch_size=args.max_batch,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us)))
        print("pytriton serving", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
