"""``config.yaml`` of a repository entry, validated once when the model is loaded.

The fields are the ones ``transerve export`` writes (see
``transerve.export.repository``); a hand-edited file that breaks them fails
with a message naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from transerve.generation import GenerationRules
from transerve.languages import LanguageCodeError, normalize
from transerve.server.exceptions import ConfigError

# libyaml's safe loader where PyYAML has it: the pure-Python one took 40 ms of each lazy load of an opus-mt entry
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Batching(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_queue_delay_ms: float = Field(2.0, ge=0, le=10_000)
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    max_queue_size: int = Field(256, ge=1)
    instances: int = Field(1, ge=1, le=64)
    flush_when_idle: bool = True  # no waiting while the backend is idle (see server/engine/batching.py)
    # a request to an idle model estimated to compute in under this runs on the event loop: no thread hops
    # (see server/engine/batching.py); 0 turns it off. Only models whose batch is plain compute use it (classifiers,
    # tensor models).
    inline_below_ms: float = Field(0.5, ge=0, le=10)
    # refuse at admission (RESOURCE_EXHAUSTED) a request expected to wait longer than this; None: no bound
    max_queue_time_ms: float | None = Field(None, gt=0, le=3_600_000)


class TensorSpec(BaseModel):
    name: str
    datatype: str
    dims: list[int]


class Scheduler(BaseModel):
    """Translation scheduling. ``continuous`` (iteration-level, needs ``files.decoder_step_ragged``) or
    ``static`` (request-level batching through the dynamic batcher: the baseline the benchmark compares)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["continuous", "static"] = "continuous"
    max_active_sequences: int = Field(64, ge=1, le=4096)
    max_cached_tokens: int = Field(16_384, ge=1)
    max_encode_batch: int = Field(32, ge=1)


class Documents(BaseModel):
    """Document translation (``segmentation: sentences``, the default): each text is split into sentences that
    decode together (``server/engine/documents.py``). A document's sentences each wait in the scheduler's queue,
    so one larger than ``batching.max_queue_size`` leaves no room for anything else."""

    model_config = ConfigDict(extra="forbid")

    max_document_chars: int = Field(100_000, ge=1, le=10_000_000)
    max_document_sentences: int = Field(256, ge=1, le=100_000)
    language: str = Field("en", min_length=2, max_length=12)  # the source language's sentence rules (ISO 639)


class Scoring(BaseModel):
    """The teacher-forcing graph behind per-sentence scores and word alignments (``decoder_score.onnx``, always
    run in fp32 on ONNX Runtime, whatever serves the decoder). ``alignment_layer``: whose cross-attention
    (averaged over heads) aligns words — the penultimate layer by default, after Garg et al. (2019)."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(min_length=1)
    align_file: str | None = None  # the alignment layer alone (no output projection): alignments without scores
    alignment_layer: int = Field(0, ge=0)


class Languages(BaseModel):
    """The pair a translator serves, routing requests that name languages instead of a model. ``target`` is
    one code, or several for a multilingual-target model, which is told the language by a token
    (``target_token`` with the code in place of ``{}``, Marian's ``>>de<<``) put before every source
    sentence. Codes are normalised as :func:`transerve.languages.normalize` does (``deu`` → ``de``)."""

    model_config = ConfigDict(extra="forbid")

    source: str
    target: list[str] = Field(min_length=1)
    target_token: str = ">>{}<<"
    target_tokens: dict[str, str] = Field(default_factory=dict)  # a target's own token, where it is not the format's

    def token_for(self, target: str) -> str | None:
        """The token naming ``target`` (multilingual entries only)."""
        return self.target_tokens.get(target) or self.target_token.format(target) if self.multilingual else None

    @field_validator("target", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return _code(value)

    @field_validator("target")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        codes = [_code(v) for v in value]
        return sorted(set(codes), key=codes.index)

    @field_validator("target_tokens")
    @classmethod
    def _token_keys(cls, value: dict[str, str]) -> dict[str, str]:
        return {_code(k): v for k, v in value.items()}

    @property
    def multilingual(self) -> bool:
        return len(self.target) > 1


def _code(value: str) -> str:
    try:
        return normalize(value)
    except LanguageCodeError as e:
        raise ValueError(str(e)) from None


class DecoderSpec(BaseModel):
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    bos_id: int
    eos_id: int
    pad_id: int


class Generation(BaseModel):
    """A translator's decoding rules beyond beam size and budget (``beam_size`` and ``max_new_tokens`` are the
    defaults a request overrides). ``transerve export hf-marian`` writes them from the checkpoint's
    ``generation_config.json``; the defaults are transerve's own models' (see :mod:`transerve.generation`)."""

    model_config = ConfigDict(extra="forbid")

    length_penalty: float = Field(1.0, ge=0, le=10)  # the default when a request sends none
    early_stopping: bool | Literal["never"] = True
    bad_words_ids: list[list[int]] = Field(default_factory=list)
    forced_eos: bool = False  # the budget's last token is EOS (Hugging Face's forced_eos_token_id)
    renormalize_logits: bool = False

    def rules(self, eos_id: int) -> GenerationRules:
        return GenerationRules.from_settings(self.bad_words_ids, self.forced_eos, self.renormalize_logits,
                                             self.early_stopping, eos_id)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    task: Literal["classify", "translate", "tensor"]  # tensor: any ONNX graph (server/engine/tensor_model.py)
    backend: str = "onnxruntime"
    precision: Literal["auto", "fp32", "int8", "bf16"] = "auto"  # see transerve.server.backends.precision
    default: bool = False
    version: int | None = None  # pin a version; None = the highest
    max_batch_size: int = Field(32, ge=1, le=4096)
    batching: Batching = Batching()  # pydantic copies defaults per instance
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: dict[str, str]
    # classify
    preprocessing: dict[str, Any] | None = None
    labels: str | None = None
    # translate
    max_input_tokens: int = Field(128, ge=1)
    # the default budget (the checkpoint's generation config); a document's sentence may make more, up to
    # 2 x its source tokens + 10 (server/engine/document_plan.py)
    max_new_tokens: int = Field(64, ge=1)
    # the hard limit a request may ask for: the decoder's positions (older entries: max_new_tokens)
    max_new_tokens_limit: int | None = Field(None, ge=1)
    documents: Documents = Documents()
    translation_cache_mb: float = Field(64.0, ge=0, le=65_536)  # translated sentences remembered; 0: off
    beam_size: int = Field(1, ge=1, le=16)
    scheduler: Scheduler = Scheduler()
    generation: Generation = Generation()
    decoder: DecoderSpec | None = None
    tokenizer: str | None = None
    scoring: Scoring | None = None  # entries exported before scores existed have none
    glossary: str | None = None  # a TSV file in the entry (source<TAB>target): terms every request must use
    languages: Languages | None = None  # the pair it serves, for requests that name languages (routing)
    # eager: loaded at start; lazy: on its first request, and unloaded first (least recently used) when a load
    # would exceed `serve --memory-budget` (server/engine/residency.py)
    load: Literal["eager", "lazy"] = "eager"

    @model_validator(mode="after")
    def _task_fields(self) -> ModelConfig:
        if self.task == "classify" and self.preprocessing is None:
            raise ValueError("a classify model needs 'preprocessing'")
        if self.task == "translate" and (self.decoder is None or self.tokenizer is None):
            raise ValueError("a translate model needs 'decoder' and 'tokenizer'")
        if self.max_new_tokens_limit is not None and self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} exceeds max_new_tokens_limit "
                             f"{self.max_new_tokens_limit}")
        if self.scoring is not None and self.decoder is not None and \
                self.scoring.alignment_layer >= self.decoder.num_layers:
            raise ValueError(f"scoring.alignment_layer: {self.scoring.alignment_layer} is not a decoder layer "
                             f"(0 to {self.decoder.num_layers - 1})")
        if self.languages is not None and "language" not in self.documents.model_fields_set:
            self.documents.language = self.languages.source  # sentence rules of the language it reads
        vocab = self.decoder.vocab_size if self.decoder is not None else None
        for word in self.generation.bad_words_ids:
            if not word or (vocab is not None and not all(0 <= t < vocab for t in word)):
                raise ValueError(f"generation.bad_words_ids: {word} is not a token sequence within the vocabulary "
                                 f"(0 to {vocab})")
        return self


def token_limit(config: ModelConfig) -> int:
    """The most new tokens a request may ask for."""
    return config.max_new_tokens_limit or config.max_new_tokens


def load_model_config(entry: Path) -> ModelConfig:
    path = entry / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: missing")
    try:
        raw = yaml.load(path.read_text(), Loader=SAFE_LOADER)
        return ModelConfig.model_validate(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None


def latest_version(entry: Path) -> Path:
    """The highest numbered version folder of an entry (what the server serves unless config pins one)."""
    versions = sorted((int(p.name), p) for p in entry.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise FileNotFoundError(f"{entry}: no numbered version folder (expected {entry}/1/)")
    return versions[-1][1]
