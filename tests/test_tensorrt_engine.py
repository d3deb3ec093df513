"""TensorRT engine builder: its pure logic here; the build itself only where TensorRT and a GPU exist."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transerve.export.exporter import ExportOptions, export_translator_entry, export_vit_entry
from transerve.export.passes import count_attention, op_counts
from transerve.export.repository import latest_version
from transerve.export.tensorrt_engine import (
    EngineBuildError,
    EngineRequest,
    build_engines,
    dim_ranges,
    engine_key,
    prepare_graph,
    profile_shapes,
)
from transerve.models.transformer import Seq2SeqTransformer, TransformerConfig
from transerve.models.vit import ViT, ViTConfig

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.fixture(scope="module")
def vit_entry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=4, dim=16, depth=2, num_heads=2)).eval()
    repo = tmp_path_factory.mktemp("repo")
    export_vit_entry(model, ExportOptions(repo, "v", fp16=True), labels=[str(i) for i in range(10)],
                     preprocessing={"size": 8})
    return repo / "v"


def test_profiles_come_from_config(vit_entry: Path) -> None:
    import onnx

    config = yaml.safe_load((vit_entry / "config.yaml").read_text())
    model = onnx.load_model(str(latest_version(vit_entry) / "model.onnx"))
    shapes = profile_shapes(model, dim_ranges(config))
    assert shapes == {"images": ([1, 3, 8, 8], [32, 3, 8, 8], [64, 3, 8, 8])}


def test_translator_profiles_cover_cache_and_source(tmp_path: Path) -> None:
    import onnx
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    model = Seq2SeqTransformer(TransformerConfig(vocab_size=12, d_model=8, num_heads=2, num_encoder_layers=1,
                                                 num_decoder_layers=1, ffn_dim=16, dropout=0.0, max_len=32)).eval()
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(12)}, unk_token="w3"))
    export_translator_entry(model, tok, ExportOptions(tmp_path, "t"), max_new_tokens=8)
    config = yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())
    step = onnx.load_model(str(tmp_path / "t" / "1" / "decoder_step_ragged.onnx"))
    shapes = profile_shapes(step, dim_ranges(config))
    assert shapes["past_k_0"] == ([1, 2, 1, 4], [16, 2, 8, 4], [32, 2, 18, 4])
    assert shapes["past_mask"] == ([1, 1], [16, 8], [32, 18])
    assert shapes["attention_mask"] == ([1, 1], [16, 32], [32, 32])


def test_engine_key_depends_on_every_input() -> None:
    base = engine_key(b"onnx", "10.14.1", "NVIDIA H100", "fp16", {"x": 1})
    assert base == engine_key(b"onnx", "10.14.1", "NVIDIA H100", "fp16", {"x": 1})
    for changed in [(b"onnx2", "10.14.1", "NVIDIA H100", "fp16", {"x": 1}),
                    (b"onnx", "10.13.0", "NVIDIA H100", "fp16", {"x": 1}),
                    (b"onnx", "10.14.1", "NVIDIA A10", "fp16", {"x": 1}),
                    (b"onnx", "10.14.1", "NVIDIA H100", "bf16", {"x": 1}),
                    (b"onnx", "10.14.1", "NVIDIA H100", "fp16", {"x": 2})]:
        assert engine_key(*changed) != base


def test_attention_is_lowered_only_for_old_tensorrt(vit_entry: Path) -> None:
    import onnx

    model = onnx.load_model(str(latest_version(vit_entry) / "model.onnx"))
    assert prepare_graph(model, "10.14.1") is model
    lowered = prepare_graph(model, "10.8.0")
    assert count_attention(lowered) == 0 and op_counts(lowered)["Softmax"] == 2
    assert count_attention(model) == 2  # the entry's own graph is untouched


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clear_error(vit_entry: Path) -> None:
    with pytest.raises(EngineBuildError, match="TensorRT is not installed"):
        build_engines(EngineRequest(vit_entry))


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and a CUDA GPU")
def test_engine_matches_onnxruntime_within_fp16(vit_entry: Path, tmp_path: Path) -> None:
    import tensorrt as trt
    from transerve.server.backends.sessions import make_session

    results = build_engines(EngineRequest(vit_entry, precision="fp16", timing_cache=tmp_path / "timing.cache"))
    assert results["model"]["cached"] is False
    assert build_engines(EngineRequest(vit_entry, precision="fp16", timing_cache=tmp_path / "timing.cache"))[
        "model"]["cached"] is True
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(results["model"]["plan"])
                                                                                 .read_bytes())
    context = engine.create_execution_context()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    out = torch.empty(4, 10, device="cuda")
    context.set_input_shape("images", tuple(x.shape))
    context.set_tensor_address("images", x.data_ptr())
    context.set_tensor_address("logits", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    expected = make_session(latest_version(vit_entry) / "model.onnx").run(None, {"images": x.cpu().numpy()})[0]
    np.testing.assert_allclose(out.cpu().numpy(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and a CUDA GPU")
def test_serving_runner_matches_onnxruntime_without_torch_buffers(vit_entry: Path, tmp_path: Path) -> None:
    """The server's TensorRTRunner (cuda-python buffers) on the built engine, twice (buffers reused and grown)."""
    from transerve.server.backends.sessions import make_session
    from transerve.server.backends.tensorrt_runner import TensorRTRunner

    results = build_engines(EngineRequest(vit_entry, precision="fp16", timing_cache=tmp_path / "timing.cache"))
    runner = TensorRTRunner(Path(results["model"]["plan"]))
    session = make_session(latest_version(vit_entry) / "model.onnx")
    for batch in (2, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(runner.run(None, {"images": x})[0], session.run(None, {"images": x})[0],
                                   atol=2e-2, rtol=2e-2)
