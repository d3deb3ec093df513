"""The one-thread session for small batches: the crossover rule, the made-up inputs, and that a runner with
both sessions answers as the pool alone does (reference: the pool session's outputs, atol 1e-6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from transerve.server.backends import small_batches
from transerve.server.backends.sessions import OrtRunner
from transerve.server.backends.small_batches import crossover, example_feeds

CPU = ["CPUExecutionProvider"]


def tiny_graph(path: Path, batch_dim: int | str = "N") -> Path:
    weight = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Relu", ["y0"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 3])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every supported ONNX Runtime reads
    onnx.save_model(model, str(path))
    return path


def test_crossover_takes_sizes_until_one_thread_stops_winning() -> None:
    timings = {1: (100e-6, 50e-6), 2: (150e-6, 100e-6), 4: (200e-6, 190e-6), 8: (300e-6, 100e-6)}
    up_to, measured = crossover(lambda n: timings[n], [1, 2, 4, 8])
    assert up_to == 2  # 4 misses the 10 % margin; 8 is never reached, though one thread would win there
    assert measured == ["1: 50 vs 100 µs", "2: 100 vs 150 µs", "4: 190 vs 200 µs"]
    assert crossover(lambda n: (1.0, 0.95), [1, 2])[0] == 0


def test_example_feeds_follow_the_graphs_inputs(tmp_path: Path) -> None:
    import onnxruntime as ort

    free = ort.InferenceSession(str(tiny_graph(tmp_path / "free.onnx")), providers=CPU)
    feeds = example_feeds(free, 8)
    assert feeds is not None and feeds["x"].shape == (8, 4) and feeds["x"].dtype == np.float32
    fixed = ort.InferenceSession(str(tiny_graph(tmp_path / "fixed.onnx", batch_dim=2)), providers=CPU)
    assert example_feeds(fixed, 8) is None  # no batch axis to vary


def test_small_batches_run_on_one_thread_and_answer_as_the_pool(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(small_batches, "MARGIN", 1e9)  # one thread "wins" at every size measured
    runner = OrtRunner(tiny_graph(tmp_path / "model.onnx"), 2, CPU, small_batches=4)
    assert runner.single is not None and runner.single_up_to == 4  # sizes above the model's limit not tried
    for batch in (1, 4, 16):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        expected = runner.session.run(None, {"x": x})[0]
        np.testing.assert_allclose(runner.run(None, {"x": x})[0], expected, atol=1e-6)
        np.testing.assert_allclose(expected, np.maximum(x @ runner_weight(tmp_path / "model.onnx"), 0), atol=1e-5)
    calls: list[int] = []
    real_single_run = runner.single.run
    runner.single = type("Spy", (), {"run": lambda self, names, feeds: calls.append(len(feeds["x"]))
                                     or real_single_run(names, feeds)})()
    runner.run(None, {"x": np.zeros((4, 4), np.float32)})
    runner.run(None, {"x": np.zeros((5, 4), np.float32)})
    assert calls == [4]  # 5 > single_up_to: the pool


def runner_weight(path: Path) -> np.ndarray:
    return numpy_helper.to_array(onnx.load_model(str(path)).graph.initializer[0])


@pytest.mark.parametrize("case", ["graph too big", "one thread asked for", "no limit given", "one thread slower"])
def test_no_single_thread_session_when_it_cannot_pay(case: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(small_batches, "MARGIN", 0.0 if case == "one thread slower" else 1e9)
    if case == "graph too big":
        monkeypatch.setattr(small_batches, "MAX_GRAPH_BYTES", 10)
    threads = 1 if case == "one thread asked for" else 2
    runner = OrtRunner(tiny_graph(tmp_path / "model.onnx"), threads, CPU,
                       small_batches=0 if case == "no limit given" else 8)
    assert runner.single is None and runner.single_up_to == 0
