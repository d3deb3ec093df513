"""Seldon MLServer 1.7 custom runtime serving an ONNX classifier with ONNX Runtime (the peer of
``bench/peers_bench.py``).

MLServer has no ONNX runtime of its own, so this is what its documentation asks a user to write: an ``MLModel``
whose ``load`` opens the session and whose ``predict`` decodes the KServe v2 input with ``NumpyCodec``. Adaptive
batching (``max_batch_size`` / ``max_batch_time`` in model-settings.json) is set by the bench. Runs inside
MLServer's own venv; never imports transerve.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxClassifier(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        extra = (self.settings.parameters.extra or {}) if self.settings.parameters else {}
        options.intra_op_num_threads = int(extra.get("threads", 2))
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(self.settings.parameters.uri, options,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = NumpyCodec.decode_input(payload.inputs[0])
        logits = self._session.run(None, {self._input: images})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output(self._output, logits)])
