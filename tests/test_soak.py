"""Soak: mixed traffic for a long time must not leak memory, threads or file descriptors, nor fail.

Both tasks, unary and streaming, through the task API and KServe; every 20th request a bad input and every
20th stream cancelled after its first piece (the injected failures, which must come back as exactly
INVALID_ARGUMENT and CANCELLED). The leak check compares the server at request 1 000 with the server at the
end, once its queues are empty: RSS may grow less than 5 %, threads and file descriptors not at all. A
control run starts the same server with a deliberate leak of 16 KB per request, and the same check must
fail on it — proof that the check can fail.

CI runs 60 seconds (``TRANSERVE_SOAK_SECONDS``, default 60); the 10-minute soak is
``TRANSERVE_SOAK_SECONDS=600 .venv/bin/python -m pytest tests/test_soak.py -k mixed_traffic``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import ServerProcess, png_bytes, running_server, scrape, total, wait_for
from reliability import ProcessCounts, counts, record_figures, settled, thread_names
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

pytestmark = pytest.mark.slow
SOAK_SECONDS = float(os.environ.get("TRANSERVE_SOAK_SECONDS", "60"))
CHECKPOINT = 1000  # requests after which the server counts as warm
MAX_RSS_GROWTH = 0.05
CONCURRENCY = 8
LEAKING_SERVER = """
import sys
from transerve.server.engine.metrics import Metrics
held = []
counted = Metrics.on_request
def on_request(self, *args):
    held.append(b"x" * 16384)  # a deliberate leak: 16 KB kept per finished request
    counted(self, *args)
Metrics.on_request = on_request
sys.argv = ["transerve", *sys.argv[1:]]
from transerve.cli import app
app()
"""


class Cancelled(Exception):
    """A stream the client cancelled; its argument is the status the call ended with."""


def png() -> bytes:
    return png_bytes((np.arange(64).reshape(8, 8) * 4).astype(np.uint8))


@dataclass
class Soak:
    """What a soak run saw: outcomes by kind and status, the server at the checkpoint and at the end."""

    outcomes: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    at_checkpoint: ProcessCounts | None = None
    at_end: ProcessCounts | None = None
    threads_at_checkpoint: dict[str, int] = field(default_factory=dict)
    threads_at_end: dict[str, int] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """Every broken promise, in words (empty: the run was clean)."""
        expected = {"bad": "INVALID_ARGUMENT", "cancel": "CANCELLED"}  # injected kinds; the rest must be OK
        found = [f"{n} × {key}" for key, n in self.outcomes.items()
                 if key.rsplit(":", 1)[1] != expected.get(key.split(":")[0], "OK")]
        start, end = self.at_checkpoint, self.at_end
        if start is None or end is None:
            return [*found, f"only {self.sent} requests: never reached request {CHECKPOINT}"]
        if end.rss_mb > start.rss_mb * (1 + MAX_RSS_GROWTH):
            found.append(f"RSS grew {100 * (end.rss_mb / start.rss_mb - 1):.1f} % ({start.rss_mb:.1f} → "
                         f"{end.rss_mb:.1f} MB) after request {CHECKPOINT}")
        if end.threads > start.threads:
            grown = {n: c - self.threads_at_checkpoint.get(n, 0) for n, c in self.threads_at_end.items()
                     if c > self.threads_at_checkpoint.get(n, 0)}
            found.append(f"threads grew {start.threads} → {end.threads} ({grown})")
        if end.fds > start.fds:
            found.append(f"file descriptors grew {start.fds} → {end.fds}")
        return found


def traffic(channel: grpc.aio.Channel) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    """The mix, cycled: (kind, call); 'bad:' and 'cancel:' kinds are the injected failures."""
    classifier, translator = tpb_grpc.ClassifierStub(channel), tpb_grpc.TranslatorStub(channel)
    kserve = pb_grpc.GRPCInferenceServiceStub(channel)
    infer = pb.ModelInferRequest(model_name="tiny-vit")
    infer.inputs.add(name="images", datatype="FP32", shape=[2, 3, 8, 8])
    infer.raw_input_contents.append(np.linspace(-1, 1, 384, dtype="<f4").tobytes())
    image = png()

    async def stream(cancel: bool) -> None:
        # the long translator: its 40 tokens make text pieces, so a cancellation lands mid-stream
        call = translator.TranslateStream(tpb.TranslateStreamRequest(
            model="long-mt", text="one hundred and seven", options=tpb.TranslateOptions(max_new_tokens=40)))
        async for _ in call:
            if cancel:
                call.cancel()
                raise Cancelled(await call.code())  # after the first piece: the injected cancellation

    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("classify", lambda: classifier.Classify(tpb.ClassifyRequest(images=[tpb.Image(encoded=image)] * 2))),
        ("infer", lambda: kserve.ModelInfer(infer)),
        ("translate", lambda: translator.Translate(tpb.TranslateRequest(model="tiny-mt",
                                                                        texts=["seven", "twenty one"]))),
        ("stream", lambda: stream(cancel=False)),
    ] * 5
    calls[7] = ("bad:empty text", lambda: translator.Translate(tpb.TranslateRequest(model="tiny-mt", texts=[""])))
    calls[13] = ("cancel:stream", lambda: stream(cancel=True))
    return calls


async def soak(server: ServerProcess, seconds: float) -> Soak:
    run = Soak()
    end = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(server.address) as channel:
        mix = traffic(channel)

        async def client() -> None:
            while time.monotonic() < end:
                kind, call = mix[run.sent % len(mix)]
                run.sent += 1
                if run.sent == CHECKPOINT:
                    run.at_checkpoint = counts(server.process.pid)
                    run.threads_at_checkpoint = thread_names(server.process.pid)
                try:
                    await call()
                    run.outcomes[f"{kind}:OK"] += 1
                except Cancelled as e:
                    run.outcomes[f"{kind}:{e.args[0].name}"] += 1
                except grpc.aio.AioRpcError as e:
                    run.outcomes[f"{kind}:{e.code().name}"] += 1

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    await asyncio.to_thread(wait_for, lambda: settled(server, ["tiny-vit", "tiny-mt", "long-mt"]) and total(
        scrape(server), "transerve_inflight_requests") == 0, 20, "server settled after the soak")
    run.at_end = await asyncio.to_thread(settled_counts, server.process.pid, run.at_checkpoint)
    run.threads_at_end = thread_names(server.process.pid)
    return run


def settled_counts(pid: int, baseline: ProcessCounts | None, seconds: float = 10) -> ProcessCounts:
    """The server's counts once short-lived threads and sockets are gone (gRPC's own thread pool grows under
    load and retires idle threads after a while; a scrape of the metrics endpoint runs on a thread of its
    own): the lowest thread and descriptor counts seen within ``seconds``, stopping early at the baseline.
    A leak does not come back down."""
    lowest, end = counts(pid), time.monotonic() + seconds
    while baseline is not None and time.monotonic() < end and (lowest.threads > baseline.threads
                                                               or lowest.fds > baseline.fds):
        time.sleep(0.1)
        now = counts(pid)
        lowest = ProcessCounts(min(lowest.threads, now.threads), min(lowest.fds, now.fds), now.rss_mb)
    return lowest


def soak_repo(small_repo: Path, long_repo: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(small_repo, repo)
    shutil.copytree(long_repo / "long-mt", repo / "long-mt")
    return repo


def test_mixed_traffic_leaks_nothing(small_repo: Path, long_repo: Path, tmp_path: Path) -> None:
    with running_server(soak_repo(small_repo, long_repo, tmp_path)) as server:
        run = asyncio.run(soak(server, SOAK_SECONDS))
    assert run.problems() == [], run.problems()
    start, end = run.at_checkpoint, run.at_end
    assert start is not None and end is not None
    record_figures(f"soak.{SOAK_SECONDS:g}s", seconds=SOAK_SECONDS, requests=run.sent, outcomes=dict(run.outcomes),
                   rss_at_1000_mb=round(start.rss_mb, 1), rss_end_mb=round(end.rss_mb, 1),
                   rss_growth_pct=round(100 * (end.rss_mb / start.rss_mb - 1), 2),
                   threads=[start.threads, end.threads], fds=[start.fds, end.fds])


def test_the_leak_check_catches_a_leaking_server(small_repo: Path, long_repo: Path, tmp_path: Path) -> None:
    with running_server(soak_repo(small_repo, long_repo, tmp_path),
                        launcher=[sys.executable, "-c", LEAKING_SERVER]) as server:
        run = asyncio.run(soak(server, min(SOAK_SECONDS, 20)))
    problems = run.problems()
    assert any(p.startswith("RSS grew") for p in problems), (problems, run.at_checkpoint, run.at_end)
    record_figures("soak.leaking_control", requests=run.sent, problems=problems)
