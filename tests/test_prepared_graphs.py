"""Prepared graphs: a graph's second load saves ONNX Runtime's optimised, prepacked copy; later loads map it and
answer as the original; a changed file, a copy cut short or a memory filesystem is never used; an unloaded
model's sessions go at once, and a mapped load is counted at its last measured cost."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import entry_copies
from transerve.server.backends.prepared_graphs import READY, PreparedGraphs, filesystem_type, graph_key
from transerve.server.backends.sessions import OrtRunner
from transerve.server.engine.loaded_model import Limits
from transerve.server.engine.manager import ModelManager
from transerve.server.engine.metrics import Metrics
from transerve.server.engine.residency import Residency
from transerve.server.engine.translator import TranslatorModel

TEXTS = ["one hundred", "seven thousand and three", "forty two"]
CPU = ["CPUExecutionProvider"]


@pytest.fixture()
def lazy_repo(small_repo: Path, tmp_path: Path) -> Path:
    return entry_copies(small_repo / "tiny-mt", tmp_path / "repo", {"a": {"load": "lazy"}})


def ready_folders(folder: Path) -> list[str]:
    return sorted(p.parent.name for p in folder.glob(f"*/{READY}"))


def test_the_second_load_prepares_and_later_loads_map_copies_that_answer_the_same(lazy_repo: Path,
                                                                                   tmp_path: Path) -> None:
    prepared = PreparedGraphs.create(tmp_path / "prepared")
    m = ModelManager(lazy_repo, "onnxruntime", Metrics(), Limits(), 1, prepared=prepared)

    async def one_load() -> tuple[list[str], dict[str, bool]]:
        await m.load("a", warm=False)
        model = m.models["a"]
        assert isinstance(model, TranslatorModel)
        texts = [r.text for r in await model.translate(TEXTS, 8, None)]
        sources = {g: bool(getattr(r, "prepared", False)) for g, r in model.runners.items() if isinstance(r, OrtRunner)}
        await m.unload("a", grace=1)
        return texts, sources

    async def run() -> None:
        await m.load_all()
        first, sources = await one_load()
        assert not any(sources.values()) and ready_folders(prepared.folder) == []  # type: ignore[arg-type]
        second, sources = await one_load()  # saves the copies while loading as before
        assert not any(sources.values()) and len(ready_folders(prepared.folder)) == len(sources)  # type: ignore[arg-type]
        third, sources = await one_load()
        assert sources and all(sources.values())  # every graph from its prepared copy
        assert first == second == third
        await m.aclose(1)

    asyncio.run(run())
    assert prepared.folder is not None and prepared.folder.is_dir()  # a folder given by name is kept


def test_a_prepared_encoder_computes_what_the_plain_one_does(small_repo: Path, tmp_path: Path) -> None:
    vdir = small_repo / "tiny-mt" / "1"
    prepared = PreparedGraphs.create(tmp_path)
    for _ in range(2):
        assert prepared.ready(vdir, "encoder.onnx") is None
    target = prepared.wanted(vdir, "encoder.onnx")
    assert target is not None
    plain = OrtRunner(vdir / "encoder.onnx", 1, CPU, save_to=target)
    prepared.commit([target])
    copy = prepared.ready(vdir, "encoder.onnx")
    assert copy is not None and copy.parent.parent == tmp_path
    mapped = OrtRunner(copy, 1, CPU, prepared=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 60, (3, 9))  # tiny-mt: 60 tokens
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    for want, got in zip(plain.run(None, feeds), mapped.run(None, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # the same kernels on the same packed weights


def test_a_changed_file_or_a_copy_cut_short_is_never_used(small_repo: Path, tmp_path: Path) -> None:
    entry = entry_copies(small_repo / "tiny-mt", tmp_path / "repo", {"a": {}}) / "a" / "1"
    prepared = PreparedGraphs.create(tmp_path / "prepared")
    prepared.ready(entry, "encoder.onnx"), prepared.ready(entry, "encoder.onnx")
    target = prepared.wanted(entry, "encoder.onnx")
    assert target is not None
    OrtRunner(entry / "encoder.onnx", 1, CPU, save_to=target)
    assert prepared.ready(entry, "encoder.onnx") is None  # saved, not committed: a load cut short
    prepared.commit([target])
    assert prepared.ready(entry, "encoder.onnx") is not None
    graph = entry / "encoder.onnx"
    os.utime(graph, ns=(graph.stat().st_atime_ns, graph.stat().st_mtime_ns + 10**9))
    assert prepared.ready(entry, "encoder.onnx") is None  # the graph changed since the copy was made
    key = graph_key(entry, "encoder.onnx")
    (entry / "weights.bin").write_bytes(b"\0" * 64)  # a weights file the graph reads (by the exporter's naming)
    assert graph_key(entry, "encoder.onnx") != key


def test_a_memory_filesystem_turns_prepared_graphs_off(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if filesystem_type(shm) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm here")
    folder = Path(subprocess.check_output(["mktemp", "-d", "-p", str(shm)], text=True).strip())
    try:
        assert PreparedGraphs.create(folder).folder is None
    finally:
        folder.rmdir()
    assert PreparedGraphs.from_setting("off") is None
    temporary = PreparedGraphs.from_setting("temp")
    assert temporary is not None and temporary.folder is not None and temporary.folder.is_dir()
    temporary.close()
    assert not temporary.folder.exists()  # a temporary folder goes with the server


def test_an_unloaded_model_drops_its_sessions_at_once(lazy_repo: Path) -> None:
    m = ModelManager(lazy_repo, "onnxruntime", Metrics(), Limits(), 1)

    async def run() -> list[OrtRunner]:
        await m.load_all()
        await m.load("a", warm=False)
        runners = [r for r in m.models["a"].runners.values() if isinstance(r, OrtRunner)]
        assert runners and all(r.session is not None for r in runners)
        await m.unload("a", grace=1)
        return runners

    assert all(r.session is None for r in asyncio.run(run()))


def test_a_mapped_load_counts_at_least_its_last_measured_cost() -> None:
    r = Residency(10**9)
    r.add("a", 400, evictable=True)
    r.remove("a")
    r.add("a", 30, evictable=True)  # mapped weights: their pages join the RSS when requests touch them
    assert r.resident_bytes == 400
    r.add("b", 50, evictable=True)
    assert r.resident_bytes == 450
