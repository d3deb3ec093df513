"""``transerve engine build``: TensorRT engines from a repository entry's ONNX graphs (TensorRT 10 API).

For each graph of ``REPO/NAME/<version>/`` this parses the ONNX, adds one
optimisation profile whose min/opt/max shapes come from ``config.yaml``
(batch, source length, cache length), sets the precision flags, reuses a
timing cache, and writes ``<graph>.plan`` beside the ONNX. An engine only
runs on the TensorRT version and GPU that built it, so each plan is keyed by
a hash of (ONNX bytes, TensorRT version, GPU name, flags, profile) and a
rebuild is skipped when the key matches.

Version differences handled here:
* TensorRT < 10.14 cannot parse ONNX ``Attention``: the graph is lowered in
  memory with ``fuse_attention(target="tensorrt-legacy")`` (MatMul→Softmax→
  MatMul with pre-scaled Q/K, the pattern TensorRT's MHA fusion matches).
* TensorRT ≥ 11 drops the FP16/BF16 builder flags (strongly typed networks):
  precision then comes from the ONNX itself, so ``--fp16`` builds from the
  entry's ``*.fp16.onnx`` variant with a strongly typed network.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx
import yaml
from transerve.export.passes import count_attention, fuse_attention
from transerve.export.repository import CONFIG_FILE, latest_version

Precision = Literal["fp32", "fp16", "bf16"]
ATTENTION_MIN_VERSION = (10, 14)


class EngineBuildError(RuntimeError):
    """TensorRT or a GPU is missing, or the build failed; the message says which."""


@dataclass
class EngineRequest:
    entry: Path
    precision: Precision = "fp16"
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    force: bool = False
    on_status: Any = field(default=lambda message: None)


def load_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise EngineBuildError("TensorRT is not installed: on a machine with an NVIDIA GPU run "
                               "`pip install 'transerve[gpu]'` (TensorRT 10.x)") from None


def gpu_name() -> str:
    """The GPU the engine is built for; a missing GPU is a clear error, not a crash inside TensorRT."""
    try:
        torch = importlib.import_module("torch")
        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    raise EngineBuildError("no NVIDIA GPU found: TensorRT engines are built on (and only run on) the GPU they target")


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def dim_ranges(config: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """min/opt/max of each symbolic dimension, from config.yaml limits."""
    max_batch = int(config.get("max_batch_size", 32))
    ranges = {"batch": (1, max(1, max_batch // 2), max_batch)}
    if config.get("task") == "translate":
        src_max = int(config.get("max_input_tokens", 128)) + 1  # + EOS
        new_max = int(config.get("max_new_tokens", 64))
        ranges["src_len"] = (1, min(32, src_max), src_max)
        # decoder_step_ragged: one placeholder slot to start; under continuous batching late joiners' left
        # padding keeps the cache below twice the longest live row plus one (server/engine/kv_cache.py)
        ranges["past_len"] = (1, min(16, new_max), 2 * new_max + 2)
    return ranges


def profile_shapes(model: onnx.ModelProto, ranges: dict[str, tuple[int, int, int]]
                   ) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """(min, opt, max) shapes for every graph input: static dims as they are, symbolic dims from ``ranges``."""
    shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        per_dim = []
        for d in dims:
            if d.HasField("dim_value"):
                per_dim.append((d.dim_value,) * 3)
            elif d.dim_param in ranges:
                per_dim.append(ranges[d.dim_param])
            else:
                raise EngineBuildError(f"input {value.name!r}: dimension {d.dim_param!r} has no range in config.yaml")
        shapes[value.name] = ([p[0] for p in per_dim], [p[1] for p in per_dim], [p[2] for p in per_dim])
    return shapes


def engine_key(onnx_bytes: bytes, trt_version: str, gpu: str, precision: str,
               profile: dict[str, Any]) -> str:
    digest = hashlib.sha256(onnx_bytes)
    digest.update(json.dumps([trt_version, gpu, precision, profile], sort_keys=True).encode())
    return digest.hexdigest()[:20]


def prepare_graph(model: onnx.ModelProto, trt_version: str) -> onnx.ModelProto:
    """Lower ONNX Attention for TensorRT versions that cannot parse it."""
    if version_tuple(trt_version) >= ATTENTION_MIN_VERSION or count_attention(model) == 0:
        return model
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    fuse_attention(lowered, "tensorrt-legacy", expected=count_attention(model))
    return lowered


def build_engines(request: EngineRequest) -> dict[str, Any]:
    """Build (or reuse) one engine per graph of the entry; returns what was done per graph."""
    trt = load_tensorrt()
    gpu = gpu_name()
    config = yaml.safe_load((request.entry / CONFIG_FILE).read_text())
    vdir = latest_version(request.entry)
    results: dict[str, Any] = {}
    for graph, filename in config["files"].items():
        source = vdir / filename
        strongly_typed = not hasattr(trt.BuilderFlag, "FP16")
        if strongly_typed and request.precision != "fp32":
            source = source.with_name(source.name.replace(".onnx", f".{request.precision}.onnx"))
            if not source.is_file():
                raise EngineBuildError(f"{source}: missing; TensorRT {trt.__version__} takes precision from the "
                                       f"ONNX, so export with --{request.precision} first")
        model = prepare_graph(onnx.load_model(str(source)), trt.__version__)
        shapes = profile_shapes(model, dim_ranges(config))
        key = engine_key(model.SerializeToString(), trt.__version__, gpu, request.precision, shapes)
        plan = vdir / f"{graph}.plan"
        meta = plan.with_suffix(".plan.json")
        if not request.force and plan.is_file() and meta.is_file() and json.loads(meta.read_text())["key"] == key:
            request.on_status(f"{graph}: engine cached ({key})")
            results[graph] = {"plan": str(plan), "key": key, "cached": True}
            continue
        request.on_status(f"{graph}: building TensorRT {trt.__version__} engine for {gpu} ({request.precision})")
        plan.write_bytes(_build_one(trt, model, shapes, request, strongly_typed))
        meta.write_text(json.dumps({"key": key, "tensorrt": trt.__version__, "gpu": gpu,
                                    "precision": request.precision, "profile": shapes}, indent=2))
        results[graph] = {"plan": str(plan), "key": key, "cached": False}
    return results


def _build_one(trt: Any, model: onnx.ModelProto, shapes: dict[str, tuple[list[int], list[int], list[int]]],
               request: EngineRequest, strongly_typed: bool) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse the ONNX graph: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(request.workspace_gb * (1 << 30)))
    if not strongly_typed and request.precision != "fp32":
        builder_config.set_flag(trt.BuilderFlag.FP16 if request.precision == "fp16" else trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    builder_config.add_optimization_profile(profile)
    cache_path = request.timing_cache
    cache = builder_config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    builder_config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise EngineBuildError("TensorRT returned no engine (see the TensorRT log above)")
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(cache.serialize()))
    return bytes(serialized)
