"""Lazy entries under a memory budget: loaded on first use, the least recently used idle one unloaded to make
room, one in use never; one load however many requests wait for it; a broken entry fails alone; the
accounting follows the memory loads really add."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from helpers import ServerProcess, entry_copies, running_server, scrape, total
from transerve.server.engine import manager as manager_module
from transerve.server.engine import residency as residency_module
from transerve.server.engine.loaded_model import Limits
from transerve.server.engine.manager import ModelManager
from transerve.server.engine.metrics import Metrics
from transerve.server.engine.residency import NoRoom, Residency, estimate_bytes, parse_bytes, process_rss
from transerve.server.engine.translator import TranslatorModel
from transerve.server.exceptions import DeadlineExceeded, ModelNotFound, QueueFull
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

MB = 2**20
LAZY = {"load": "lazy", "batching": {"max_queue_size": 1024}}


def test_sizes_parse_in_decimal_and_binary_units() -> None:
    assert [parse_bytes(t) for t in ("4GB", "1.5GiB", "800MB", "512mib", "123")] == [
        4 * 10**9, int(1.5 * 2**30), 800 * 10**6, 512 * MB, 123]
    for bad in ("", "-1GB", "0", "lots", "4 XB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_bytes(bad)


def test_victims_are_idle_lazy_entries_least_recently_used_first() -> None:
    r = Residency(250 * MB)
    for name in ("eager", "a", "b", "c"):
        r.add(name, 60 * MB, evictable=name != "eager")
    r.pin("b")
    r.unpin("b")  # b used after c: c is now older
    assert r.victims(60 * MB) == ["a"]
    assert r.victims(120 * MB) == ["a", "c"]
    r.pin("a")  # in use: never a victim
    assert r.victims(120 * MB) == ["c", "b"]
    with pytest.raises(NoRoom, match=r"in use or eager \(a, eager\)"):
        r.victims(250 * MB)
    assert Residency(None).victims(10**12) == []


def test_a_loaded_entry_whose_requests_have_not_pinned_it_yet_is_no_victim() -> None:
    r = Residency(130 * MB)
    r.wait("new")  # a request waits for its load
    for name in ("old", "new"):
        r.add(name, 60 * MB, evictable=True)
    r.pin("old")  # the other entry is busy: the new one would be the only idle one
    with pytest.raises(NoRoom, match=r"\(new, old\)"):
        r.victims(60 * MB)
    r.done_waiting("new")  # its request pinned it and left, or gave up
    assert r.victims(60 * MB) == ["new"]


def test_first_load_estimate_counts_the_largest_weights_and_the_graphs(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 1000)
    (tmp_path / "weights.int8.bin").write_bytes(b"\0" * 300)
    (tmp_path / "encoder.onnx").write_bytes(b"\0" * 50)
    assert estimate_bytes(tmp_path) == 1250 + 50


@pytest.fixture(scope="module")
def lazy_repo(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return entry_copies(small_repo / "tiny-mt", tmp_path_factory.mktemp("lazy"), {n: LAZY for n in "abc"})


class CountedRss:
    """A process of no baseline in which every loaded model holds exactly ``cost`` bytes."""

    def __init__(self, cost: int) -> None:
        self.cost = cost
        self.manager: ModelManager | None = None

    def __call__(self) -> int:
        return 0 if self.manager is None else self.cost * len(self.manager.models)


def manager(repo: Path, budget: int | None, rss: CountedRss | None = None) -> ModelManager:
    m = ModelManager(repo, "onnxruntime", Metrics(), Limits(), 1, memory_budget=budget,
                     **({"rss": rss} if rss is not None else {}))
    if rss is not None:
        rss.manager = m
    return m


async def translated(m: ModelManager, name: str, deadline: float | None = None) -> str:
    async with m.use(name, task="translate", deadline=deadline) as model:
        assert isinstance(model, TranslatorModel)
        return (await model.translate(["one hundred"], 4, None))[0].text


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def loads(m: ModelManager, name: str, result: str = "ok") -> float:
    return m.metrics.registry.get_sample_value("transerve_model_loads_total", {"model": name, "result": result}) or 0


def test_lazy_entries_load_on_first_use_and_the_least_recently_used_goes(lazy_repo: Path) -> None:
    async def run() -> None:
        m = manager(lazy_repo, 250 * MB, CountedRss(100 * MB))
        await m.load_all()
        assert {n: s.state for n, s in m.states.items()} == dict.fromkeys("abc", "AVAILABLE") and not m.models
        assert m.servable() == ["a", "b", "c"]
        await translated(m, "a")
        await translated(m, "b")
        assert sorted(m.models) == ["a", "b"] and m.residency.resident_bytes == 200 * MB
        await translated(m, "c")  # a is the least recently used
        assert sorted(m.models) == ["b", "c"] and m.states["a"].state == "AVAILABLE"
        assert "make room" in m.states["a"].reason
        await translated(m, "b")  # now c is the older
        await translated(m, "a")
        assert sorted(m.models) == ["a", "b"]
        evicted = {n: m.metrics.registry.get_sample_value("transerve_model_evictions_total", {"model": n})
                   for n in "abc"}
        assert evicted == {"a": 1.0, "b": 0.0, "c": 1.0}  # exported at 0 from the first load
        assert m.metrics.registry.get_sample_value("transerve_resident_bytes") == 200 * MB
        await m.aclose(1)

    asyncio.run(run())


def test_an_entry_in_use_is_never_unloaded(lazy_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        m = manager(lazy_repo, 250 * MB, CountedRss(100 * MB))
        await m.load_all()
        async with m.use("a", task="translate"):  # a is the least recently used, but busy
            await translated(m, "b")
            await translated(m, "c")
            assert sorted(m.models) == ["a", "c"]
        m.residency.budget = 150 * MB  # one fits
        async with m.use("a", task="translate"):
            loop = asyncio.get_running_loop()
            with pytest.raises(DeadlineExceeded, match="deadline passed while model 'b' loaded"):
                await translated(m, "b", deadline=loop.time() + 0.3)
            waiting = asyncio.create_task(translated(m, "b", deadline=loop.time() + 30))
            await asyncio.sleep(0.2)
            assert not waiting.done()  # waits for a to be free, does not fail
        await waiting  # served once a was released
        assert sorted(m.models) == ["b"]
        async with m.use("b", task="translate"):  # with no deadline, a load waits a bounded time for room
            monkeypatch.setattr(manager_module, "ROOM_WAIT_S", 0.2)
            with pytest.raises(QueueFull, match=r"model 'c' cannot load now.*in use or eager \(b\)"):
                await translated(m, "c")
        await m.aclose(1)

    asyncio.run(run())


def test_eviction_racing_a_new_request_spares_the_entry_it_picked(lazy_repo: Path, tmp_path: Path) -> None:
    """A load needing two entries gone chooses both; while the first unloads, a request picks up the second:
    the second must stay until that request ends (then go), and both requests succeed."""
    repo = entry_copies(lazy_repo / "a", tmp_path, {n: LAZY for n in "abc"})

    async def run() -> None:
        m = manager(repo, 250 * MB, CountedRss(100 * MB))
        await m.load_all()
        await translated(m, "a")
        await translated(m, "b")
        m.residency.budget = 150 * MB  # c needs both a and b gone
        close = m.models["a"].aclose

        async def slow_close(grace: float) -> None:
            await asyncio.sleep(0.2)
            await close(grace)

        m.models["a"].aclose = slow_close  # type: ignore[method-assign]

        ended: dict[str, float] = {}  # when each request left its model: the later one is the more recent use

        async def holds_b() -> str:
            async with m.use("b", task="translate") as model:
                await asyncio.sleep(0.5)
                assert isinstance(model, TranslatorModel)
                text = (await model.translate(["seven"], 4, None))[0].text
            ended["b"] = time.monotonic()
            return text

        async def loads_c() -> str:
            text = await translated(m, "c", deadline=asyncio.get_running_loop().time() + 30)
            ended["c"] = time.monotonic()
            return text

        loading = asyncio.create_task(loads_c())
        await asyncio.sleep(0.05)  # a is being unloaded now; b was chosen too
        await asyncio.gather(loading, holds_b())
        # c cost more than its first-load estimate while b was busy; once both are idle the least recently used
        # of the two goes, in the background (which one depends on whose request ended first)
        kept = max(ended, key=ended.__getitem__)
        await asyncio.wait_for(wait_until(lambda: sorted(m.models) == [kept]), 10)
        assert m.residency.resident_bytes <= 150 * MB
        await m.aclose(1)

    asyncio.run(run())


def test_concurrent_first_requests_share_one_load(lazy_repo: Path) -> None:
    async def run() -> None:
        m = manager(lazy_repo, None)
        await m.load_all()
        answers = await asyncio.gather(*(translated(m, "a") for _ in range(500)))
        assert len(set(answers)) == 1 and loads(m, "a") == 1
        await m.aclose(1)

    asyncio.run(run())


def test_a_broken_entry_fails_alone_and_the_accounting_stays_right(lazy_repo: Path, tmp_path: Path) -> None:
    repo = entry_copies(lazy_repo / "a", tmp_path, {"good": LAZY, "broken": LAZY})

    async def run() -> None:
        m = manager(repo, 250 * MB, CountedRss(100 * MB))
        await m.load_all()
        (repo / "broken" / "1" / "encoder.onnx").write_bytes(b"not a graph")  # broken while unloaded
        good = await translated(m, "good")
        for _ in range(2):  # and again: each request retries the load, each fails with the reason
            with pytest.raises(ModelNotFound, match=r"broken.*not available"):
                await translated(m, "broken")
        assert loads(m, "broken", "failed") == 2 and m.states["broken"].failed
        assert m.residency.resident_bytes == 100 * MB and list(m.residency.resident) == ["good"]
        assert await translated(m, "good") == good
        await m.aclose(1)

    asyncio.run(run())


def test_an_entry_larger_than_the_budget_is_refused_at_start(lazy_repo: Path) -> None:
    async def run() -> None:
        m = manager(lazy_repo, 1024)
        await m.load_all()
        assert all(s.state == "UNAVAILABLE" and "more than the whole memory budget" in s.reason
                   for s in m.states.values())
        with pytest.raises(ModelNotFound, match="memory budget"):
            await translated(m, "a")
        await m.aclose(1)

    asyncio.run(run())


def test_costs_are_the_memory_loads_really_add(lazy_repo: Path) -> None:
    async def run() -> None:
        m = manager(lazy_repo, None)
        await m.load_all()
        await translated(m, "a")  # the first load also starts the runtime's own pools: not counted below
        before = process_rss()
        await translated(m, "b")
        await translated(m, "c")
        grown = process_rss() - before
        costs = [m.residency.measured[n] for n in "bc"]
        assert all(c > 0 for c in costs)
        assert abs(grown - sum(costs)) < 8 * MB, (grown / MB, [c / MB for c in costs])
        await m.unload("b")
        assert m.residency.resident_bytes == m.residency.measured["a"] + costs[1]
        await m.aclose(1)

    asyncio.run(run())


@pytest.fixture(scope="module")
def lazy_server(lazy_repo: Path) -> Iterator[ServerProcess]:
    with running_server(lazy_repo, "--memory-budget", "4GB") as server:
        yield server


def test_a_server_of_lazy_entries_is_serving_before_any_load(lazy_server: ServerProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(lazy_server.address) as channel:
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING
        index = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest())
    assert {m.name: m.state for m in index.models} == dict.fromkeys("abc", "AVAILABLE")
    assert total(scrape(lazy_server), "transerve_memory_budget_bytes") == 4e9


def test_hundreds_of_first_requests_to_one_lazy_entry_load_it_once(lazy_server: ServerProcess) -> None:
    async def burst() -> list[str]:
        async with grpc.aio.insecure_channel(lazy_server.address) as channel:
            stub = tpb_grpc.TranslatorStub(channel)
            replies = await asyncio.gather(*(stub.Translate(tpb.TranslateRequest(model="c", texts=["seven"]))
                                             for _ in range(300)))
            return [r.translations[0].text for r in replies]

    assert len(set(asyncio.run(burst()))) == 1
    samples = scrape(lazy_server)
    assert total(samples, "transerve_model_loads_total", model="c", result="ok") == 1
    assert total(samples, "transerve_resident_models") >= 1
    with contextlib.suppress(Exception):
        pass


def test_the_budget_counts_the_process_baseline() -> None:
    r = Residency(300 * MB)
    r.baseline = 100 * MB  # what the process held before any model: the models have 200 MB
    assert r.too_large(250 * MB) and not r.too_large(200 * MB)
    r.add("a", 150 * MB, evictable=True)
    assert r.victims(40 * MB) == [] and r.victims(60 * MB) == ["a"]
    assert not r.over_budget
    r.add("b", 60 * MB, evictable=True)
    assert r.over_budget


def test_frequency_policy_keeps_the_entry_asked_for_most(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under skewed traffic the popular entry is idle between its requests as often as a rare one: plain LRU
    takes whichever was idle longest; the frequency policy takes the one asked for least (30 s half-life)."""
    clock = [1000.0]
    monkeypatch.setattr(residency_module.time, "monotonic", lambda: clock[0])
    policies = {p: Residency(130 * MB, policy=p) for p in ("frequency", "lru")}  # type: ignore[arg-type]
    for r in policies.values():
        for _ in range(5):  # "hot" asked five times, long ago (one half-life), "cold" once, just now
            r.asked("hot")
        r.add("hot", 60 * MB, evictable=True)
        clock[0] += residency_module.HEAT_HALF_LIFE_S
        r.asked("cold")
        r.add("cold", 60 * MB, evictable=True)
        clock[0] -= residency_module.HEAT_HALF_LIFE_S
    clock[0] += residency_module.HEAT_HALF_LIFE_S
    assert policies["lru"].victims(60 * MB) == ["hot"]  # idle longer
    assert policies["frequency"].victims(60 * MB) == ["cold"]  # 5 × 0.5 = 2.5 requests against 1
    assert policies["frequency"].warmth("hot", clock[0]) == pytest.approx(2.5)  # the formula, exactly
    clock[0] += 3 * residency_module.HEAT_HALF_LIFE_S  # traffic moved on: hot 0.3125, cold 0.125
    assert policies["frequency"].warmth("hot", clock[0]) == pytest.approx(5 * 0.5**4)


def test_frequency_ties_go_least_recently_used_first() -> None:
    r = Residency(130 * MB, policy="frequency")
    for name in ("a", "b"):
        r.add(name, 60 * MB, evictable=True)  # loaded, never asked for: the same heat, 0
    r.pin("a")
    r.unpin("a")  # a used after b
    assert r.victims(60 * MB) == ["b"]


def test_the_budget_is_checked_against_the_rss_when_it_says_more() -> None:
    """Memory the measured costs miss (a model's runs grew its buffers; an unloaded model's not yet returned)
    still counts: the victims cover what the RSS says."""
    rss = [400 * MB]
    r = Residency(500 * MB, rss=lambda: rss[0])
    r.baseline = 100 * MB
    for name in ("a", "b"):
        r.add(name, 100 * MB, evictable=True)  # measured 200 MB together; the RSS says 300 MB beyond the baseline
    assert r.held == 300 * MB and not r.over_budget
    assert r.victims(100 * MB) == [] and r.victims(150 * MB) == ["a"]
    rss[0] = 250 * MB  # below the measured costs: those count
    assert r.held == 200 * MB
    rss[0] = 650 * MB
    assert r.over_budget and r.victims(0) == ["a", "b"]



def test_an_unload_teaches_the_entry_s_real_cost() -> None:
    r = Residency(500 * MB)
    r.add("a", 40 * MB, evictable=True)  # a load that mapped its weights: little growth at first
    r.remove("a")
    r.freed("a", 300 * MB)  # what its unload gave back: the pages its requests touched too
    assert r.expected_cost("a", Path("/nonexistent")) == 300 * MB
    r.freed("a", 100 * MB)  # a smaller figure (other threads allocating meanwhile) does not lower it
    assert r.measured["a"] == 300 * MB


def test_names_clients_make_up_leave_no_trace_in_the_request_counts(lazy_repo: Path) -> None:
    async def run() -> None:
        m = manager(lazy_repo, 250 * MB, CountedRss(100 * MB))
        await m.load_all()
        for i in range(50):
            with pytest.raises(ModelNotFound):
                async with m.use(f"made-up-{i}", task="translate"):
                    pass
        await translated(m, "a")
        assert list(m.residency.heat) == ["a"]
        await m.aclose(1)

    asyncio.run(run())
