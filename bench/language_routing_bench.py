"""Many language pairs under a memory budget: lazy loading, LRU eviction, cold start, detection and pivot cost.

Usage: ``python bench/language_routing_bench.py [--work /tmp/transerve-bench] [--seconds 120] [--clients 8]``

A repository of 8 opus-mt-shaped entries (4 language pairs, both directions: en↔de, en↔fr, en↔es, de↔fr;
random weights, one ``transerve export hf-marian`` of bench/opus_model.py's checkpoint, its files hard-linked
into each entry — every entry loads and holds its own copy, as distinct checkpoints would), requests routed by
``source_language``/``target_language``:
1. every entry eager, no budget — the reference throughput, and each entry's cost (resident bytes / 8);
2. every entry lazy, ``--memory-budget`` = the process's baseline + 3.5 entries' cost (room for 3), uniform
   traffic over the 8 directions, its prepared graphs (``--prepared-graphs``) saved in ``WORK/prepared``;
3. the same budget, Zipf (s = 1.1) traffic, a fresh server (each entry's first reload prepares its graphs) —
   target: throughput ≥ 0.7 × run 1's; 4. as 3, with run 2's prepared graphs: a server whose entries have all
   been reloaded once (or restarted with ``--prepared-graphs DIR``); 5. as 4 with ``--eviction frequency``
   (the default is ``lru``), the candidates compared.
Each run: ``--clients`` closed-loop clients for ``--seconds``, one sentence per request (``max_new_tokens``
16); requests/s, p50/p99 latency, loads and evictions per minute (the server's metrics), and the server's RSS
sampled every 0.25 s against the budget — target: ≤ budget + 200 MB at every sample.
4. Cold start: a fresh server of lazy entries, one request each to 3 of them — request to answer, median —
   target ≤ 1.5 s.
5. Detection: ``source_language: auto`` against the language given, per sentence and per 20-sentence document
   (in-process detector time, and its share of the request's time).
6. Pivot: es→de (es→en→de, two entries) against en→de (direct), requests/s, all entries loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import yaml
from num2words import num2words
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import command_line, markdown, verdict, write_section
from opus_model import exported
from transerve.server.engine.residency import estimate_bytes

HEADING = "## Language routing and lazy loading"
PAIRS = [("en", "de"), ("de", "en"), ("en", "fr"), ("fr", "en"), ("en", "es"), ("es", "en"), ("de", "fr"),
         ("fr", "de")]
MAX_NEW_TOKENS = 16
MB = 2**20


def link_source(work: Path) -> Path:
    """The export's fp32 files, copied once: the entries hard-link these, never the export's own files (the
    ONNX checker of the other benchmarks refuses a weights file with several links)."""
    export, source = exported(work) / "opus-shaped", work / "routing-source"
    if not (source / "config.yaml").is_file():
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(export, source, ignore=shutil.ignore_patterns("*.int8.*"))
    return source


def repository(work: Path, load: str) -> Path:
    """8 entries, one per direction, hard-linked from one copy of the export; ``load``: eager or lazy."""
    source = link_source(work)
    repo = work / f"routing-{load}"
    shutil.rmtree(repo, ignore_errors=True)
    for src, tgt in PAIRS:
        entry = repo / f"opus-{src}-{tgt}"
        shutil.copytree(source, entry, copy_function=os.link)
        (entry / "config.yaml").unlink()  # written afresh, not through the link
        config = yaml.safe_load((source / "config.yaml").read_text())
        config.update(name=entry.name, default=False, load=load, precision="fp32",
                      languages={"source": src, "target": tgt})
        config["batching"]["max_queue_size"] = 4096
        (entry / "config.yaml").write_text(yaml.safe_dump(config))
    return repo


class Server:
    def __init__(self, repo: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "transerve", "serve", "--repo", str(repo), "--port", "0", "--metrics-port", "0",
               "--no-http", *extra]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.process.stdout is not None
        for line in self.process.stdout:
            match = re.search(r"on (127\.0\.0\.1:\d+) \(metrics on 127\.0\.0\.1:(\d+)\)", line)
            if match:
                self.address, self.metrics_port = match.group(1), int(match.group(2))
                break
        else:
            raise RuntimeError("server did not start")
        threading.Thread(target=lambda: [None for _ in self.process.stdout or ()], daemon=True).start()

    def rss(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) * 1024

    def metric(self, name: str) -> float:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


@contextmanager
def serving(repo: Path, *extra: str) -> Iterator[Server]:
    server = Server(repo, *extra)
    try:
        yield server
    finally:
        server.stop()


def sentence(rng: random.Random) -> str:
    return f"{num2words(rng.randint(1, 99_999)).capitalize()} people came to the meeting."


def zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (k ** s) for k in range(1, n + 1)]


def traffic(server: Server, seconds: float, clients: int, weights: list[float] | None, seed: int = 1
            ) -> dict[str, object]:
    """Closed-loop clients for ``seconds``; the server's RSS sampled meanwhile."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            samples.append(server.rss())

    loads, evictions = server.metric("transerve_model_loads_total"), server.metric("transerve_model_evictions_total")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    errors: list[str] = []
    latencies = asyncio.run(closed_loop(server.address, seconds, clients, weights, seed, errors))
    stop.set()
    sampler.join()
    minutes = seconds / 60
    return {"requests/s": len(latencies) / seconds,
            "p50 ms": statistics.median(latencies) * 1e3 if latencies else float("nan"),
            "p99 ms": sorted(latencies)[int(0.99 * (len(latencies) - 1))] * 1e3 if latencies else float("nan"),
            "loads/min": (server.metric("transerve_model_loads_total") - loads) / minutes,
            "evictions/min": (server.metric("transerve_model_evictions_total") - evictions) / minutes,
            "max RSS MB": max(samples, default=server.rss()) / MB,
            "errors": ", ".join(f"{errors.count(c)} {c}" for c in sorted(set(errors))) or "0"}


async def closed_loop(address: str, seconds: float, clients: int, weights: list[float] | None, seed: int,
                      errors: list[str]) -> list[float]:
    """Latencies of the requests answered; ``errors`` gets the status code of each one that failed."""
    rng = random.Random(seed)
    order = list(PAIRS)
    rng.shuffle(order)  # which directions are the popular ones under Zipf
    latencies: list[float] = []
    end = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tpb_grpc.TranslatorStub(channel)

        async def client(k: int) -> None:
            local = random.Random(seed * 100 + k)
            while time.monotonic() < end:
                src, tgt = local.choices(order, weights)[0] if weights else local.choice(order)
                start = time.perf_counter()
                try:
                    await stub.Translate(tpb.TranslateRequest(
                        texts=[sentence(local)], source_language=src, target_language=tgt,
                        options=tpb.TranslateOptions(max_new_tokens=MAX_NEW_TOKENS, cache=False)), timeout=300)
                except grpc.aio.AioRpcError as e:
                    errors.append(e.code().name)
                    continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies


def cold_starts(repo: Path, count: int) -> list[float]:
    """Request to answer for ``count`` entries' first requests, each on a fresh server (nothing loaded)."""
    times = []
    for src, tgt in PAIRS[:count]:
        with serving(repo) as server, grpc.insecure_channel(server.address) as channel:
            stub = tpb_grpc.TranslatorStub(channel)
            start = time.perf_counter()
            stub.Translate(tpb.TranslateRequest(texts=["Seven people came to the meeting."], source_language=src,
                                                target_language=tgt,
                                                options=tpb.TranslateOptions(max_new_tokens=MAX_NEW_TOKENS)),
                           timeout=120)
            times.append(time.perf_counter() - start)
    return times


def detection_cost(repeats: int) -> dict[str, float]:
    from transerve.server.engine.language_id import LanguageDetector

    detector, rng = LanguageDetector(), random.Random(3)
    candidates = sorted({s for s, _ in PAIRS})
    one = [sentence(rng) for _ in range(200)]
    documents = [" ".join(sentence(rng) for _ in range(20)) for _ in range(20)]
    detector.detect(one[0], candidates, "warm up")

    def per_call(texts: list[str]) -> float:
        times = []
        for _ in range(repeats):
            for text in texts:
                start = time.perf_counter()
                detector.detect(text, candidates, "text")
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {"sentence": per_call(one), "document": per_call(documents)}


def pivot_rate(server: Server, seconds: float, clients: int, pair: tuple[str, str]) -> float:
    async def run() -> int:
        done, end = 0, time.monotonic() + seconds
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = tpb_grpc.TranslatorStub(channel)

            async def client(k: int) -> None:
                nonlocal done
                rng = random.Random(k)
                while time.monotonic() < end:
                    await stub.Translate(tpb.TranslateRequest(
                        texts=[sentence(rng)], source_language=pair[0], target_language=pair[1],
                        options=tpb.TranslateOptions(max_new_tokens=MAX_NEW_TOKENS, cache=False)), timeout=300)
                    done += 1

            await asyncio.gather(*(client(k) for k in range(clients)))
        return done

    return asyncio.run(run()) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/transerve-bench"))
    parser.add_argument("--seconds", type=float, default=120.0, help="per traffic run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cold-starts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="detection timing repeats")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args()
    eager, lazy = repository(args.work, "eager"), repository(args.work, "lazy")
    rows: list[dict[str, object]] = []
    with serving(eager) as server:
        per_entry = server.metric("transerve_resident_bytes") / len(PAIRS)
        baseline = server.rss() - server.metric("transerve_resident_bytes")  # the process without its models
        rows.append({"run": "all 8 loaded, no budget", "budget MB": "-",
                     **traffic(server, args.seconds, args.clients, zipf_weights(len(PAIRS), 1.1))})
        direct = pivot_rate(server, args.seconds / 4, args.clients, ("en", "de"))
        pivot = pivot_rate(server, args.seconds / 4, args.clients, ("es", "de"))
    # the budget counts the process's baseline too; each entry at least its first-load estimate (the tiny model
    # of the smoke test costs less than its estimate)
    first_load = estimate_bytes(lazy / f"opus-{PAIRS[0][0]}-{PAIRS[0][1]}" / "1")
    budget = int(baseline + 3.5 * max(per_entry, first_load)) + 64 * MB * bool(os.environ.get("TRANSERVE_BENCH_SMOKE"))
    kept = args.work / "prepared"  # the prepared graphs of run 2, kept for run 4 (`serve --prepared-graphs DIR`)
    shutil.rmtree(kept, ignore_errors=True)
    zipf = zipf_weights(len(PAIRS), 1.1)
    for label, weights, extra in (("lazy, uniform", None, ("--prepared-graphs", str(kept))),
                                  ("lazy, Zipf s=1.1", zipf, ()),
                                  ("lazy, Zipf s=1.1, prepared graphs kept", zipf, ("--prepared-graphs", str(kept))),
                                  ("lazy, Zipf s=1.1, prepared graphs kept, --eviction frequency", zipf,
                                   ("--prepared-graphs", str(kept), "--eviction", "frequency"))):
        with serving(lazy, "--memory-budget", str(budget), *extra) as server:
            rows.append({"run": label, "budget MB": f"{budget / MB:.0f}",
                         **traffic(server, args.seconds, args.clients, weights)})
    kept_mb = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file()) / MB
    colds = cold_starts(lazy, args.cold_starts)
    detect = detection_cost(args.repeats)
    report(args, rows, per_entry, budget, colds, detect, direct, pivot, kept_mb)


def report(args: argparse.Namespace, rows: list[dict[str, object]], per_entry: float, budget: int,
           colds: list[float], detect: dict[str, float], direct: float, pivot: float, kept_mb: float) -> None:
    for row in rows:
        for key in ("requests/s", "p50 ms", "p99 ms", "loads/min", "evictions/min", "max RSS MB"):
            row[key] = f"{row[key]:.1f}"
    reference, zipf, steady, frequency = (float(str(rows[i]["requests/s"])) for i in (0, 2, 3, 4))
    worst = max(float(str(r["max RSS MB"])) for r in rows[1:])
    cold = statistics.median(colds)
    request_s = float(str(rows[0]["p50 ms"])) / 1e3
    lines = [
        f"- Zipf under the budget vs all loaded, fresh server (each entry's first reload prepares its graphs): "
        f"{zipf:.1f} / {reference:.1f} requests/s = {zipf / reference:.2f}× — "
        f"{verdict('target ≥ 0.7×', zipf / reference >= 0.7)}",
        f"- Zipf under the budget vs all loaded, the prepared graphs of the uniform run kept "
        f"(`--prepared-graphs DIR`, {kept_mb:.0f} MB on disk): {steady:.1f} / {reference:.1f} requests/s = "
        f"{steady / reference:.2f}× — {verdict('target ≥ 0.7×', steady / reference >= 0.7)}",
        f"- Eviction policy, same traffic and prepared graphs: lru (default) {steady:.1f} requests/s, "
        f"{rows[3]['loads/min']} loads/min, p50 {rows[3]['p50 ms']} ms; frequency {frequency:.1f} requests/s, "
        f"{rows[4]['loads/min']} loads/min, p50 {rows[4]['p50 ms']} ms ({frequency / reference:.2f}× all loaded)",
        f"- RSS under the budget: at most {worst:.0f} MB against {budget / MB:.0f} MB + 200 MB — "
        f"{verdict('target ≤ budget + 200 MB', worst <= budget / MB + 200)}",
        f"- Cold start (request to answer, fresh server, {len(colds)} entries): median {cold:.2f} s "
        f"({', '.join(f'{c:.2f}' for c in colds)}) — {verdict('target ≤ 1.5 s', cold <= 1.5)}",
        f"- Detection (py3langid, in-process): {detect['sentence'] * 1e6:.0f} µs per sentence, "
        f"{detect['document'] * 1e6:.0f} µs per 20-sentence document — "
        f"{100 * detect['sentence'] / request_s:.2f} % of a one-sentence request's median time",
        f"- Pivot es→de (es→en→de) vs direct en→de, all loaded: {pivot:.1f} vs {direct:.1f} requests/s = "
        f"{pivot / direct:.2f}× (two decodes per request)",
        f"- Entry cost (resident bytes / 8, all loaded): {per_entry / MB:.0f} MB; budget = the process's "
        f"baseline ({(budget - 3.5 * per_entry) / MB:.0f} MB) + 3.5 entries"]
    print(markdown(rows))
    print("\n".join(lines))
    section = "\n".join([
        HEADING, "", command_line(), "",
        f"{args.clients} closed-loop clients, {args.seconds:g} s per run, one sentence per request "
        f"(max_new_tokens {MAX_NEW_TOKENS}, sentence cache off), routed by source_language/target_language over 8 "
        "opus-mt-shaped fp32 entries.", "", markdown(rows), "", *lines, ""])
    write_section(args.results, HEADING, section)


if __name__ == "__main__":
    main()
