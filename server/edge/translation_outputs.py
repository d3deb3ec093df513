"""What KServe translation outputs hold beside the text: sentence reports and routes, as JSON per text; and
the ``text`` input's BYTES as strings."""

from __future__ import annotations

import json

import numpy as np
from transerve.server.engine.routed_translation import RoutedResult
from transerve.server.engine.translation_types import TranslationResult
from transerve.server.exceptions import RequestError


def sentences_json(result: TranslationResult) -> str:
    """A text's sentence reports as the ``sentences`` output holds them: a JSON list of objects with ``source``
    and ``target`` spans, ``mean_log_prob``, ``min_token_prob`` and ``alignments`` (``[source_start,
    source_end, target_start, target_end]`` lists) — TranslateResponse's SentenceInfo in JSON."""
    return json.dumps([{"source": list(r.source), "target": list(r.target), "mean_log_prob": r.score.mean_log_prob,
                        "min_token_prob": r.score.min_token_prob,
                        "alignments": [[*a.source, *a.target] for a in r.score.alignments]}
                       for r in result.sentences or ()])


def decoded_texts(texts: np.ndarray) -> list[str]:
    """A BYTES tensor's elements as text; invalid UTF-8 is the client's error, never replaced silently."""
    try:
        return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts.reshape(-1)]
    except UnicodeDecodeError as e:
        raise RequestError(f"inputs.text: not valid UTF-8 (byte {e.start})") from None


def route_json(r: RoutedResult) -> str:
    """A text's route, as the ``route`` output holds it (Translation's fields of the same names in JSON)."""
    return json.dumps({
        "source_language": r.source_language, "language_confidence": r.confidence,
        "via": r.route.via if r.route else "", "models": r.route.models if r.route else [],
        "languages": [{"start": run.span[0], "end": run.span[1], "language": run.language,
                       "confidence": run.confidence} for run in r.languages]})
