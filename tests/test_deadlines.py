"""Deadlines and cancellation on a real server: what expired or was cancelled is dropped before compute, and a
timed-out request leaves the queue and the decode batch at once (triton#7532: a timed-out request stayed
queued). The server's own metrics are the proof: ``transerve_dropped_requests_total{reason}``, the queue and
batch gauges, and ModelStatistics' inference count.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from helpers import ServerProcess, running_server, scrape, total, wait_for
from reliability import record_figures, settled
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

pytestmark = pytest.mark.slow
BLOCKERS = 24  # 200-token decodes queued one behind the other (a few tens of ms each on the tiny model)
LONG = tpb.TranslateStreamRequest(model="long-mt", text="one hundred and seven",
                                  options=tpb.TranslateOptions(max_new_tokens=200))


@pytest.fixture(scope="module")
def server(small_repo: Path, long_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The ViT holds each batch 1.5 s (no idle flush); the long translator decodes one sequence at a time."""
    repo = tmp_path_factory.mktemp("deadline-repo")
    shutil.copytree(small_repo / "tiny-vit", repo / "tiny-vit")
    shutil.copytree(long_repo / "long-mt", repo / "long-mt")
    for name, change in (("tiny-vit", {"max_queue_delay_ms": 1500, "flush_when_idle": False,
                                       "preferred_batch_sizes": []}), ("long-mt", {})):
        path = repo / name / "config.yaml"
        config = yaml.safe_load(path.read_text())
        config["batching"].update(change)
        if name == "long-mt":
            config["scheduler"].update(max_active_sequences=1)
            config["translation_cache_mb"] = 0  # every blocker decodes: the same sentence each time
        path.write_text(yaml.safe_dump(config))
    with running_server(repo) as server:
        yield server


def vit_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny-vit")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 8, 8])
    request.raw_input_contents.append(np.zeros((1, 3, 8, 8), "<f4").tobytes())
    return request


def dropped(server: ServerProcess, model: str) -> dict[str, float]:
    samples = scrape(server)
    return {reason: total(samples, "transerve_dropped_requests_total", model=model, reason=reason)
            for reason in ("expired_queued", "cancelled_queued", "expired_decoding", "cancelled_decoding")}


def code_of(call: grpc.Future) -> grpc.StatusCode:
    try:
        call.result()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_expired_and_cancelled_batcher_requests_are_never_computed(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        stats = lambda: kserve.ModelStatistics(pb.ModelStatisticsRequest(name="tiny-vit")).model_stats[0]  # noqa: E731
        before, drops = stats(), dropped(server, "tiny-vit")
        expiring = kserve.ModelInfer.future(vit_request(), timeout=0.3)
        cancelled = kserve.ModelInfer.future(vit_request())
        wait_for(lambda: total(scrape(server), "transerve_queue_length", model="tiny-vit") == 2, 5, "both queued")
        cancelled.cancel()
        assert code_of(expiring) == grpc.StatusCode.DEADLINE_EXCEEDED
        # both leave the queue at once, not when their batch would have formed (1.5 s after the first arrived)
        left = wait_for(lambda: total(scrape(server), "transerve_queue_length", model="tiny-vit") == 0, 0.8,
                        "the cancelled and the expired request left the queue")
        assert kserve.ModelInfer(vit_request()).outputs
        after, now = stats(), dropped(server, "tiny-vit")
    assert after.inference_count == before.inference_count + 1  # only the live request was computed
    assert now["expired_queued"] + now["cancelled_queued"] - drops["expired_queued"] - drops["cancelled_queued"] == 2
    record_figures("deadlines.batcher", computed=after.inference_count - before.inference_count,
                   dropped_before_compute=2, queue_left_after_s=left)


def test_timed_out_translation_leaves_the_queue_and_the_batch(server: ServerProcess) -> None:
    """One row in the batch: 24 requests of 200 tokens queue one behind the other; a request with a short deadline
    behind them must leave the queue when its deadline passes — while they still run — and never join the
    batch; a stream whose deadline passes mid-decode must leave the batch."""
    budget = tpb.TranslateOptions(max_new_tokens=200)
    with grpc.insecure_channel(server.address) as channel:
        translator = tpb_grpc.TranslatorStub(channel)
        start = time.perf_counter()
        full = [m for m in translator.TranslateStream(LONG)][-1].tokens
        full_s = time.perf_counter() - start  # one decode alone
        wait_for(lambda: settled(server, ["long-mt"]), 5, "idle")
        drops, finished = dropped(server, "long-mt"), decoded(server)
        blockers = [translator.Translate.future(tpb.TranslateRequest(model="long-mt", texts=["seven"],
                                                                     options=budget)) for _ in range(BLOCKERS)]
        wait_for(lambda: total(scrape(server), "transerve_queue_length", model="long-mt") >= BLOCKERS // 2, 5,
                 "blockers queued")
        waiting = translator.Translate.future(tpb.TranslateRequest(model="long-mt", texts=["seven"], options=budget),
                                              timeout=max(1.5 * full_s, 0.05))
        assert code_of(waiting) == grpc.StatusCode.DEADLINE_EXCEEDED
        left_queue = wait_for(lambda: sum(dropped(server, "long-mt").values()) > sum(drops.values()), 2,
                              "the timed-out request dropped from the queue")
        still_running = sum(not b.done() for b in blockers)
        assert [b.result(timeout=60).translations[0].tokens for b in blockers] == [full] * BLOCKERS
        with pytest.raises(grpc.RpcError) as expired:
            list(translator.TranslateStream(LONG, timeout=max(full_s / 3, 0.02)))
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        left_batch = wait_for(lambda: settled(server, ["long-mt"]), 5, "batch and cache empty")
        now = dropped(server, "long-mt")
    delta = {k: now[k] - drops[k] for k in now}
    assert still_running >= BLOCKERS // 2, f"dropped only when {still_running} requests were left ahead of it"
    assert delta["expired_queued"] + delta["cancelled_queued"] == 1, delta
    assert delta["expired_decoding"] + delta["cancelled_decoding"] == 1, delta
    # rows that joined the batch: the blockers and the stream cut mid-decode, never the queued request
    assert decoded(server) - finished == BLOCKERS + 1
    record_figures("deadlines.scheduler", full_decode_s=full_s, dropped_from_queue_after_s=left_queue,
                   blockers_still_running=still_running, batch_empty_after_s=left_batch, dropped=delta)


def decoded(server: ServerProcess) -> float:
    """Requests that held rows in the decode batch (finished or taken out)."""
    return total(scrape(server), "transerve_request_tokens_count", model="long-mt")
