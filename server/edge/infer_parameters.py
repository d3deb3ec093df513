"""``ModelInferRequest.parameters``: the request-level settings KServe clients send, checked at the edge.

A parameter this server does not know is refused rather than ignored: a client that sends ``beam_sise: 4``
or ``top_k`` to a model that has no such setting believes it changed something, and silent acceptance hides
the mistake (the message lists what the model takes). Types are checked against the oneof the client set —
``beam_size: "four"`` is refused, an integer-valued ``length_penalty`` is accepted as the number it is.

Accepted:
- every model: ``timeout`` (microseconds, Triton's meaning; the tighter of it and the gRPC deadline wins);
- translators: ``beam_size``, ``max_new_tokens``, ``length_penalty``, ``segmentation`` (``"sentences"``, the
  default, or ``"whole"``), ``cache`` (a bool; false: bypass the sentence cache), ``scores`` and
  ``alignments`` (bools: an extra BYTES output ``sentences``, one JSON list per text), ``glossary`` (a string:
  a JSON list of ``{"source", "target"}`` objects), ``format`` (``"text"`` or ``"html"``) — as
  ``TranslateOptions`` — and ``stream`` (Triton's decoupled convention, ``ModelStreamInfer`` only);
  ``source_language`` (a code or ``"auto"``), ``target_language`` and ``detection`` (``"document"`` or
  ``"sentence"``) route a request to the model name ``translate`` by language (a real entry of that name wins).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from transerve.server.engine.glossary import GlossaryEntry
from transerve.server.engine.routed_translation import CallOptions
from transerve.server.engine.translation_types import ReportOptions
from transerve.server.exceptions import RequestError

MAX_TIMEOUT_US = 24 * 3600 * 1_000_000  # a day: anything longer is a unit mistake, not a deadline
_INTEGER_KINDS = ("int64_param", "uint64_param")
_NUMBER_KINDS = (*_INTEGER_KINDS, "double_param")
# name → (accepted oneof kinds, what the message says it must be)
_COMMON = {"timeout": (_INTEGER_KINDS, "an integer of microseconds")}
_TRANSLATE = {"beam_size": (_INTEGER_KINDS, "an integer"), "max_new_tokens": (_INTEGER_KINDS, "an integer"),
              "length_penalty": (_NUMBER_KINDS, "a number"), "stream": (("bool_param",), "a bool"),
              "segmentation": (("string_param",), '"sentences" or "whole"'), "cache": (("bool_param",), "a bool"),
              "scores": (("bool_param",), "a bool"), "alignments": (("bool_param",), "a bool"),
              "glossary": (("string_param",), 'a JSON list of {"source": …, "target": …}'),
              "format": (("string_param",), '"text" or "html"'),
              "source_language": (("string_param",), 'a language code or "auto"'),
              "target_language": (("string_param",), "a language code"),
              "detection": (("string_param",), '"document" or "sentence"')}
MAX_GLOSSARY_JSON = 256 * 1024


@dataclass(frozen=True)
class InferParameters:
    """What a request's parameters ask for; ``None`` keeps the model's default."""

    timeout_s: float | None = None
    beam_size: int | None = None
    max_new_tokens: int | None = None
    length_penalty: float | None = None
    stream: bool = False
    segmentation: Literal["sentences", "whole"] = "sentences"
    cache: bool = True
    scores: bool = False
    alignments: bool = False
    glossary: tuple[GlossaryEntry, ...] = ()
    format: Literal["text", "html"] = "text"
    source_language: str = ""  # routing by language (the model "translate"); a named model ignores them
    target_language: str = ""
    detection: Literal["document", "sentence"] = "document"

    def call_options(self) -> CallOptions:
        """The translation options as every path (named model, routed, streamed) takes them."""
        return CallOptions(self.max_new_tokens, self.beam_size, self.length_penalty, self.segmentation, self.cache,
                           ReportOptions(self.scores, self.alignments), self.glossary, self.format)

    def deadline(self, grpc_deadline: float | None) -> float | None:
        """The tighter of the gRPC deadline (a monotonic instant) and ``timeout``."""
        if self.timeout_s is None:
            return grpc_deadline
        mine = time.monotonic() + self.timeout_s
        return mine if grpc_deadline is None else min(mine, grpc_deadline)


def parse_parameters(parameters: Any, task: str) -> InferParameters:
    """``parameters`` (a protobuf map of ``InferParameter``) for a model of ``task``."""
    known = {**_COMMON, **(_TRANSLATE if task == "translate" else {})}
    values: dict[str, Any] = {}
    for name in sorted(parameters):
        if name not in known:
            raise RequestError(f"parameters.{name}: unknown parameter for a {task} model (it takes "
                               f"{', '.join(sorted(known))})")
        kinds, meaning = known[name]
        kind = parameters[name].WhichOneof("parameter_choice")
        if kind not in kinds:
            raise RequestError(f"parameters.{name}: must be {meaning}, got {_shown(parameters[name], kind)}")
        values[name] = getattr(parameters[name], kind)
    return InferParameters(
        timeout_s=_bounded(values, "timeout", 1, MAX_TIMEOUT_US) / 1e6 if "timeout" in values else None,
        beam_size=_bounded(values, "beam_size", 1, 1 << 31), max_new_tokens=_bounded(values, "max_new_tokens", 1,
                                                                                      1 << 31),
        length_penalty=_finite(values, "length_penalty"), stream=bool(values.get("stream", False)),
        segmentation=_segmentation(values), cache=bool(values.get("cache", True)),
        scores=bool(values.get("scores", False)), alignments=bool(values.get("alignments", False)),
        glossary=_glossary(values.get("glossary")), format=_format(values),
        source_language=values.get("source_language", ""), target_language=values.get("target_language", ""),
        detection=_detection(values))


def _detection(values: dict[str, Any]) -> Literal["document", "sentence"]:
    value = values.get("detection", "document")
    if value not in ("document", "sentence"):
        raise RequestError(f"parameters.detection: must be \"document\" or \"sentence\", got {value[:40]!r}")
    return "sentence" if value == "sentence" else "document"


def _glossary(value: str | None) -> tuple[GlossaryEntry, ...]:
    """``glossary``: a JSON list of ``{"source": str, "target": str}`` objects (what TranslateOptions.glossary
    holds); each entry's terms are checked by the model."""
    if value is None:
        return ()
    if len(value) > MAX_GLOSSARY_JSON:
        raise RequestError(f"parameters.glossary: {len(value)} characters exceed the limit of {MAX_GLOSSARY_JSON}")
    try:
        entries = json.loads(value)
    except json.JSONDecodeError as e:
        raise RequestError(f"parameters.glossary: not JSON ({e.msg} at {e.pos})") from None
    if not isinstance(entries, list):
        raise RequestError("parameters.glossary: must be a JSON list of {\"source\": …, \"target\": …}")
    out = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and set(entry) == {"source", "target"} and isinstance(entry["source"], str)
                and isinstance(entry["target"], str)):
            raise RequestError(f"parameters.glossary[{i}]: must be {{\"source\": string, \"target\": string}}")
        out.append(GlossaryEntry(entry["source"], entry["target"]))
    return tuple(out)


def _format(values: dict[str, Any]) -> Literal["text", "html"]:
    value = values.get("format", "text")
    if value not in ("text", "html"):
        raise RequestError(f"parameters.format: must be \"text\" or \"html\", got {value[:40]!r}")
    return "html" if value == "html" else "text"


def _segmentation(values: dict[str, Any]) -> Literal["sentences", "whole"]:
    value = values.get("segmentation", "sentences")
    if value == "whole":
        return "whole"
    if value != "sentences":
        raise RequestError(f"parameters.segmentation: must be \"sentences\" or \"whole\", got {value[:40]!r}")
    return "sentences"


def _bounded(values: dict[str, Any], name: str, low: int, high: int) -> Any:
    """The integer, or None when absent; the model checks its own tighter limits (beam size, budget) later."""
    value = values.get(name)
    if value is not None and not low <= value <= high:
        raise RequestError(f"parameters.{name}: {value} is outside {low} to {high}")
    return value


def _finite(values: dict[str, Any], name: str) -> float | None:
    value = values.get(name)
    if value is not None and not math.isfinite(value):
        raise RequestError(f"parameters.{name}: {value} is not a finite number")
    return None if value is None else float(value)


def _shown(parameter: Any, kind: str | None) -> str:
    if kind is None:
        return "no value"
    return f"{kind.removesuffix('_param')} {getattr(parameter, kind)!r}"
