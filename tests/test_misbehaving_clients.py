"""Clients that crash, hang or cancel must cost the server nothing that outlives them (triton#7368: client
cancellations crashed Triton's gRPC frontend).

One server, three kinds of misbehaviour, and after each the same check: the server is live and answers like
before; its in-flight gauge, queue lengths, active sequences and cached tokens are back to 0; its thread and
file-descriptor counts are back to the baseline measured after a warm-up that used every path.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ServerProcess, running_server, scrape, total, wait_for, without_sentence_cache
from reliability import counts, record_figures, settled
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

pytestmark = pytest.mark.slow
MODELS = ["tiny-vit", "long-mt"]
STREAM = tpb.TranslateStreamRequest(model="long-mt", text="one hundred and seven")
TRANSLATE = tpb.TranslateRequest(model="long-mt", texts=["one hundred and seven"] * 4)
CLASSIFY = tpb.ClassifyRequest(model="tiny-vit", top_k=3, images=[tpb.Image(tensor=tpb.Tensor(
    shape=[3, 8, 8], data=np.linspace(-1, 1, 192, dtype="<f4").tobytes()))] * 4)

# A client process that starts one call, says so on stdout, and waits to be killed.
CHILD = """
import sys, time, grpc
from transerve_client._proto import transerve_pb2 as tpb, transerve_pb2_grpc as tpb_grpc
channel = grpc.insecure_channel(sys.argv[1])
stub = tpb_grpc.TranslatorStub(channel)
if sys.argv[2] == "stream":
    stream = stub.TranslateStream(tpb.TranslateStreamRequest(model="long-mt", text="one hundred and seven"))
    next(stream)  # mid-stream: the first piece has arrived
else:
    future = stub.Translate.future(tpb.TranslateRequest(model="long-mt", texts=["one hundred and seven"] * 4))
print("started", flush=True)
time.sleep(60)
"""


@pytest.fixture(scope="module")
def server(small_repo: Path, long_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("misbehaving-repo")
    shutil.copytree(small_repo / "tiny-vit", repo / "tiny-vit")
    shutil.copytree(long_repo / "long-mt", repo / "long-mt")
    without_sentence_cache(repo / "long-mt")  # each killed request must be decoding, not answered from the cache
    with running_server(repo) as server:
        yield server


def answers(address: str) -> tuple[object, ...]:
    """What the server answers now, to compare before and after the misbehaviour."""
    with grpc.insecure_channel(address) as channel:
        translator = tpb_grpc.TranslatorStub(channel)
        classify = tpb_grpc.ClassifierStub(channel).Classify(CLASSIFY)
        stream = [m.piece for m in translator.TranslateStream(STREAM)]
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest())
        return ([[p.index for p in r.predictions] for r in classify.results],
                [t.tokens for t in translator.Translate(TRANSLATE).translations], "".join(stream), health.status,
                infer.live)


@pytest.fixture(scope="module")
def baseline(server: ServerProcess) -> tuple[tuple[object, ...], int, int]:
    """Answers, threads and fds after every path ran at the concurrency the tests use (pools at full size)."""
    async def warm() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            translator, classifier = tpb_grpc.TranslatorStub(channel), tpb_grpc.ClassifierStub(channel)
            calls = [translator.Translate(TRANSLATE) for _ in range(8)] + [classifier.Classify(CLASSIFY)
                                                                          for _ in range(8)]
            await asyncio.gather(*calls, *(drain(translator.TranslateStream(STREAM)) for _ in range(8)))

    asyncio.run(warm())
    expected = answers(server.address)
    wait_for(lambda: settled(server, MODELS), 10, "warm-up settled")
    now = counts(server.process.pid)
    return expected, now.threads, now.fds


async def drain(call: grpc.aio.UnaryStreamCall) -> None:
    async for _ in call:
        pass


def assert_recovered(server: ServerProcess, baseline: tuple[tuple[object, ...], int, int]) -> dict[str, float]:
    """Everything back to zero and to the baseline; the server still answers as before."""
    expected, threads, fds = baseline
    wait_for(lambda: settled(server, MODELS) and total(scrape(server), "transerve_inflight_requests") == 0, 20,
             "queues, batches, caches and in-flight RPCs back to 0")
    # sockets of killed clients close when the kernel resets them; give the server's poller a moment
    wait_for(lambda: counts(server.process.pid).fds <= fds, 20, f"file descriptors back to {fds}")
    # gRPC's event-engine pool adds a thread while its work queue backs up and reclaims it after 20 s idle
    wait_for(lambda: counts(server.process.pid).threads <= threads, 30, f"threads back to {threads}")
    now = counts(server.process.pid)
    assert answers(server.address) == expected
    return {"threads": now.threads, "threads_baseline": threads, "fds": now.fds, "fds_baseline": fds}


def test_killed_clients_mid_request_and_mid_stream(server: ServerProcess, baseline: tuple[object, int, int]
                                                   ) -> None:
    before = total(scrape(server), "transerve_requests_total", code="CANCELLED")
    kills = 0
    for kind in ("stream", "unary"):
        for _ in range(2):  # 2 rounds of 5 processes each kind: 20 kills
            children = [subprocess.Popen([sys.executable, "-c", CHILD, server.address, kind], stdout=subprocess.PIPE,
                                         text=True) for _ in range(5)]
            for child in children:
                assert child.stdout is not None and child.stdout.readline().strip() == "started"
            for child in children:
                child.send_signal(signal.SIGKILL)
                child.wait(10)
                kills += 1
    figures = assert_recovered(server, baseline)  # type: ignore[arg-type]
    cancelled = total(scrape(server), "transerve_requests_total", code="CANCELLED") - before
    assert cancelled >= 10, cancelled  # the streams at least were cut mid-way and counted so
    record_figures("misbehaving.killed_clients", kills=kills, server_counted_cancelled=cancelled, **figures)


def test_streams_opened_and_never_read(server: ServerProcess, baseline: tuple[object, int, int]) -> None:
    channel = grpc.insecure_channel(server.address)
    stub = tpb_grpc.TranslatorStub(channel)
    idle = [stub.TranslateStream(STREAM) for _ in range(16)]  # started, never iterated
    expected = baseline[0]
    assert answers(server.address) == expected  # the others are served meanwhile
    for call in idle:
        call.cancel()
    channel.close()
    figures = assert_recovered(server, baseline)  # type: ignore[arg-type]
    record_figures("misbehaving.unread_streams", streams=len(idle), **figures)


def test_cancels_at_random_points(server: ServerProcess, baseline: tuple[object, int, int]) -> None:
    """Cancelled after 0 to 30 ms: before queueing, in a queue, mid-batch, mid-decode (fixed seed)."""
    rng = random.Random(14)
    before = scrape(server)

    async def one(channel: grpc.aio.Channel, i: int) -> str:
        kind = i % 3
        if kind == 0:
            call = tpb_grpc.ClassifierStub(channel).Classify(CLASSIFY)
        elif kind == 1:
            call = tpb_grpc.TranslatorStub(channel).Translate(TRANSLATE)
        else:
            call = tpb_grpc.TranslatorStub(channel).TranslateStream(STREAM)
        task = asyncio.ensure_future(drain(call) if kind == 2 else call)  # type: ignore[arg-type]
        await asyncio.sleep(rng.uniform(0, 0.03))
        call.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "CANCELLED"
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return "OK"

    async def run() -> list[str]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            return list(await asyncio.gather(*(one(channel, i) for i in range(300))))

    outcomes = asyncio.run(run())
    assert set(outcomes) <= {"OK", "CANCELLED"}, set(outcomes)
    figures = assert_recovered(server, baseline)  # type: ignore[arg-type]
    after = scrape(server)
    dropped = total(after, "transerve_dropped_requests_total") - total(before, "transerve_dropped_requests_total")
    record_figures("misbehaving.random_cancels", calls=len(outcomes), cancelled=outcomes.count("CANCELLED"),
                   dropped_by_server=dropped, **figures)
