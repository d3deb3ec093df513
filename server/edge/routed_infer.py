"""KServe v2 requests routed by language: the model name ``translate`` with ``source_language`` and
``target_language`` parameters (a repository entry named ``translate`` wins, as any named model does).

Outputs as a translator's — ``translation`` (and ``sentences`` with scores or alignments) — plus ``route``:
BYTES ``[N]``, each a JSON object ``{"source_language", "language_confidence", "via", "models",
"languages"}`` (TranslateResponse's Translation fields of the same names).
"""

from __future__ import annotations

import numpy as np
from transerve.server.edge.infer_parameters import InferParameters
from transerve.server.edge.translation_outputs import decoded_texts, route_json, sentences_json
from transerve.server.engine.routed_translation import RoutedResult, RoutedTranslator, language_pair
from transerve.server.exceptions import RequestError

ROUTED_MODEL = "translate"


def is_routed(name: str, entries: object) -> bool:
    """Whether ``name`` asks for routing by language: the reserved name, unless an entry bears it."""
    return name == ROUTED_MODEL and name not in entries  # type: ignore[operator]


async def routed_outputs(routed: RoutedTranslator, inputs: dict[str, np.ndarray], p: InferParameters,
                         deadline: float | None) -> tuple[dict[str, np.ndarray], list[RoutedResult]]:
    if sorted(inputs) != ["text"]:
        raise RequestError(f"inputs: {ROUTED_MODEL} takes ['text'], got {sorted(inputs)}")
    texts = inputs["text"]
    if texts.dtype != np.object_:
        raise RequestError("inputs.text: datatype must be BYTES")
    if not p.target_language:
        raise RequestError(f"parameters.target_language: required by the model {ROUTED_MODEL!r} (it routes by "
                           "language; e.g. \"de\")")
    pair = language_pair(p.source_language, p.target_language, p.detection)
    options = p.call_options()
    results = await routed.translate(decoded_texts(texts), pair, deadline, options, "inputs.text")

    def column(values: list[str]) -> np.ndarray:
        return np.array([v.encode() for v in values], dtype=np.object_).reshape(texts.shape)

    outputs = {"translation": column([r.result.text for r in results]),
               "route": column([route_json(r) for r in results])}
    if options.report.wanted:
        outputs["sentences"] = column([sentences_json(r.result) for r in results])
    return outputs, results
