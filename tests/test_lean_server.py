"""The serving runtime without the training stack: torch, onnx and transerve's offline side made unimportable.

A ``transerve serve`` process whose interpreter has ``torch``, ``onnx`` (and the rest of the ``export`` extra)
and ``transerve.models`` / ``transerve.export`` blocked in ``sys.modules`` — any import of them raises — must
answer Classify, Translate (greedy and beam), TranslateStream and KServe ModelInfer for both tasks exactly as
the full install's server does. Reference: the ``server`` fixture (same repository, nothing blocked);
tolerance: none (same graphs, same inputs, same bits).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import ServerProcess, png_bytes, running_server
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client.codec import decode_bytes, encode_bytes

BLOCKED = ("torch", "onnx", "onnxscript", "safetensors", "sklearn", "num2words", "sacrebleu", "transerve.models",
           "transerve.export")
LAUNCH = ("import sys\n"
          f"for name in {BLOCKED!r}:\n"
          "    sys.modules[name] = None  # `import name` now raises ImportError\n"
          "sys.argv[0] = 'transerve'\n"
          "from transerve.cli import app\n"
          "app()\n")
LEAN = [sys.executable, "-c", LAUNCH]
TEXTS = ["three hundred and forty-two", "seven", "one thousand and one"]


@pytest.fixture(scope="module")
def lean_server(small_repo: Path) -> Iterator[ServerProcess]:
    with running_server(small_repo, launcher=LEAN) as proc:
        yield proc


def png(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (11, 13, 3), dtype=np.uint8))


def answers(address: str) -> dict[str, Any]:
    """Every task RPC, for both models, as plain values."""
    with grpc.insecure_channel(address) as channel:
        classifier, translator = tpb_grpc.ClassifierStub(channel), tpb_grpc.TranslatorStub(channel)
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        tensor = np.random.default_rng(3).standard_normal((3, 8, 8)).astype(np.float32)
        images = [tpb.Image(encoded=png(1)), tpb.Image(encoded=png(2)),
                  tpb.Image(tensor=tpb.Tensor(shape=[3, 8, 8], data=tensor.astype("<f4").tobytes()))]
        classify = classifier.Classify(tpb.ClassifyRequest(images=images, top_k=3), timeout=30)
        out: dict[str, Any] = {"classify": [[(p.label, p.index, p.score) for p in r.predictions]
                                            for r in classify.results]}
        for beam in (1, 3):
            reply = translator.Translate(tpb.TranslateRequest(texts=TEXTS, options=tpb.TranslateOptions(
                beam_size=beam)), timeout=30)
            out[f"translate-beam{beam}"] = [t.text for t in reply.translations]
        stream = translator.TranslateStream(tpb.TranslateStreamRequest(text=TEXTS[0]), timeout=30)
        out["stream"] = [(m.piece, m.tokens, m.done) for m in stream]
        request = pb.ModelInferRequest(model_name="tiny-vit")
        request.inputs.add(name="images", datatype="FP32", shape=[2, 3, 8, 8])
        request.raw_input_contents.append(np.stack([tensor, -tensor]).astype("<f4").tobytes())
        out["infer-vit"] = np.frombuffer(kserve.ModelInfer(request, timeout=30).raw_output_contents[0], "<f4")
        request = pb.ModelInferRequest(model_name="tiny-mt")
        request.inputs.add(name="text", datatype="BYTES", shape=[len(TEXTS)])
        request.raw_input_contents.append(encode_bytes(TEXTS))
        raw = kserve.ModelInfer(request, timeout=30).raw_output_contents[0]
        out["infer-mt"] = decode_bytes(raw, len(TEXTS), "translation").tolist()
    return out


def test_torch_free_server_answers_like_the_full_install(lean_server: ServerProcess, server: ServerProcess) -> None:
    lean, full = answers(lean_server.address), answers(server.address)
    np.testing.assert_array_equal(lean.pop("infer-vit"), full.pop("infer-vit"))
    assert lean == full
    assert full["stream"][-1][2] and full["stream"][-1][1] > 0  # done, with its token count
    maps = Path(f"/proc/{lean_server.process.pid}/maps")
    if maps.is_file():  # Linux: no PyTorch library is mapped into the process either
        assert "libtorch" not in maps.read_text()


def run_lean(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LEAN, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [("serve", "--backend", "torch", "--repo", "."), ("export", "vit", "."),
                                  ("zoo", "build"), ("checkpoint", "show", ".")])
def test_commands_that_need_the_export_stack_name_the_extra(args: tuple[str, ...]) -> None:
    out = run_lean(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'transerve[export]'" in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_base_install_alone_serves_a_repository_built_by_the_full_install(small_repo: Path, server: ServerProcess,
                                                                          tmp_path: Path) -> None:
    """``pip install ./clients .`` (no extras) into a fresh venv: no training stack, same answers."""
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "base-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    # pip from this interpreter installs into the new venv (--python), from the same package index
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
                              str(root / "clients"), str(root)], capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    present = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in "
                              f"{BLOCKED[:7]!r} if u.find_spec(m)])"], capture_output=True, text=True, timeout=60)
    assert present.stdout.strip() == "[]", present.stdout + present.stderr  # none of the export extra
    with running_server(small_repo, launcher=[str(venv / "bin" / "transerve")]) as base:
        lean, full = answers(base.address), answers(server.address)
        np.testing.assert_array_equal(lean.pop("infer-vit"), full.pop("infer-vit"))
        assert lean == full


def test_tensorrt_runner_module_needs_no_torch() -> None:
    """The TensorRT backend's runner imports with torch blocked; without cuda-python or a GPU it reports 0 GPUs."""
    code = ("import sys\n"
            f"for name in {BLOCKED!r}:\n"
            "    sys.modules[name] = None\n"
            "from transerve.server.backends.tensorrt_runner import gpu_count\n"
            "from transerve.server.backends.runtime import tensorrt_ready\n"
            "print(gpu_count() >= 0, 'torch' not in str(tensorrt_ready(__import__('pathlib').Path('.'), [])))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
