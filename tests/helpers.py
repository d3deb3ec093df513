"""What the tests share that is not a fixture: a server process started, waited for and stopped; its metrics
scraped; a condition waited for with a bound; a PNG built from pixels; the offline translation the served ones
are held to. (Fixtures are in conftest.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

PROJECT = Path(__file__).resolve().parent.parent
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    metrics_port: int | None
    output: list[str]
    http_port: int | None = None  # REST (start_server opens an ephemeral one unless told --no-http)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the exit status (the drain must end by itself)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()  # never leave a server behind
            raise


def free_port() -> int:
    """A loopback port free now (for servers that must be told their port before they start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(repo: Path, *extra: str, timeout: float = 120, port: int = 0,
                 launcher: list[str] | None = None) -> ServerProcess:
    """``transerve serve`` on a loopback port (0: ephemeral); returns once it says it is serving. ``launcher``
    replaces ``python -m transerve`` (another interpreter, or one with modules blocked)."""
    cmd = [*(launcher or [sys.executable, "-m", "transerve"]), "serve", "--repo", str(repo), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "0",
           *([] if "--drain-delay" in extra else ["--drain-delay", "0"]),
           *([] if {"--http-port", "--no-http"} & set(extra) else ["--http-port", "0"]), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    ready = threading.Event()
    found: dict[str, int | None] = {}

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            match = re.search(r"on 127\.0\.0\.1:(\d+) \(metrics on 127\.0\.0\.1:(\d+|None)\)", line)
            if match:
                found["port"] = int(match.group(1))
                found["metrics"] = None if match.group(2) == "None" else int(match.group(2))
                rest = re.search(r"REST on 127\.0\.0\.1:(\d+)", line)
                found["http"] = int(rest.group(1)) if rest else None
                ready.set()
        ready.set()  # the process ended: stop waiting

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or "port" not in found:
        process.kill()
        raise RuntimeError("server did not start:\n" + "".join(output[-40:]))
    return ServerProcess(process, int(found["port"] or 0), found["metrics"], output, found.get("http"))


@contextmanager
def running_server(repo: Path, *extra: str, clean_exit: bool = True, **options: Any) -> Iterator[ServerProcess]:
    """``transerve serve`` for a ``with`` block: started and waited for (:func:`start_server`), then stopped with
    SIGTERM; with ``clean_exit`` the drain must end with exit status 0 (checked when the block did not fail)."""
    server = start_server(repo, *extra, **options)
    try:
        yield server
    finally:
        code = server.terminate()
    if clean_exit:
        assert code == 0, "".join(server.output[-20:])


def metrics_text(server: ServerProcess) -> str:
    """The server's Prometheus exposition, as scraped from its metrics port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def scrape(server: ServerProcess) -> dict[str, float]:
    """Every sample of the server's /metrics as ``'name{labels}' → value`` (labels as the server wrote them)."""
    samples: dict[str, float] = {}
    for line in metrics_text(server).splitlines():
        match = SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(value for key, value in samples.items()
               if key.split("{")[0] == name and all(w in key for w in wanted))


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll ``condition`` until true (bounded); returns the seconds it took, or fails naming ``what``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


async def until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Yield to the event loop until ``condition`` holds (bounded): tasks just scheduled reach the state the test
    needs (queued, past a deadline) before it goes on."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.001)


def image_bytes(pixels: Any, format: str = "PNG", mode: str | None = None, **options: Any) -> bytes:
    """``pixels`` (an ``HxW`` or ``HxWxC`` uint8 array, or a PIL image) encoded as a file of ``format`` (PIL's
    name: PNG, JPEG, WEBP, …), converted to ``mode`` first if given; ``options`` go to PIL's ``save``."""
    from PIL import Image

    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.asarray(pixels))
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format=format, **options)
    return buffer.getvalue()


def png_bytes(pixels: Any, mode: str | None = None) -> bytes:
    """A PNG of ``pixels`` (see :func:`image_bytes`)."""
    return image_bytes(pixels, "PNG", mode)


def offline_ids(model: Any, source: list[int], budget: int, beam: int = 1, penalty: float = 1.0) -> list[int]:
    """The reference decoder every served or scheduled translation is held to, token for token: PyTorch eager
    (``transerve.models.decoding.translate_ids``, KV cache and beam search written from the formulas) on one
    source alone."""
    import torch
    from transerve.models.decoding import translate_ids

    src = torch.tensor([source])
    return list(translate_ids(model, src, torch.ones_like(src, dtype=torch.bool), budget, beam_size=beam,
                              length_penalty=penalty)[0])


@functools.cache
def entry_model(repo: Path, entry: str) -> tuple[Any, Any]:
    """A repository entry's PyTorch checkpoint (``<version>/torch``, written by ``export --torch-checkpoint``) and
    its tokenizer, loaded once per test session."""
    from tokenizers import Tokenizer
    from transerve.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(repo / entry / "1" / "torch")
    return model.eval(), Tokenizer.from_file(str(repo / entry / "tokenizer.json"))


def entry_copies(source: Path, repo: Path, changes: dict[str, dict[str, Any]]) -> Path:
    """``repo`` holding a copy of the entry ``source`` per ``{name: config changes}``, each named so and not the
    default unless its changes say, with its changes written over its ``config.yaml`` (a nested dict replaces
    the key's value whole, except ``scheduler``, which it updates)."""
    for name, change in changes.items():
        shutil.copytree(source, repo / name)
        path = repo / name / "config.yaml"
        config = yaml.safe_load(path.read_text())
        config.update(name=name, default=False, **{k: v for k, v in change.items() if k != "scheduler"})
        config["scheduler"].update(change.get("scheduler", {}))
        path.write_text(yaml.safe_dump(config))
    return repo


def mode_copies(source: Path, repo: Path, modes: dict[str, str], **settings: Any) -> Path:
    """``repo`` holding a copy of the entry ``source`` per ``{name: scheduler mode}``, each named so, not the
    default, with ``settings`` written over its ``config.yaml``; extra files for the copies go in afterwards."""
    return entry_copies(source, repo, {name: {**settings, "scheduler": {"mode": mode}}
                                       for name, mode in modes.items()})


def without_sentence_cache(entry: Path) -> None:
    """``translation_cache_mb: 0`` in an entry's config: for tests whose point is repeated decoding work (queues,
    deadlines, killed clients), which the cache would otherwise answer at once."""
    path = entry / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["translation_cache_mb"] = 0
    path.write_text(yaml.safe_dump(config))


def sentence_budget(repo: Path, entry: str, text: str) -> int:
    """The new tokens a served sentence may make without ``max_new_tokens``: the larger of the entry's
    ``max_new_tokens`` and 2 × its source tokens (EOS included) + 10, up to its ``max_new_tokens_limit`` —
    server/engine/document_plan.py's rule, written out again here."""
    import yaml

    config = yaml.safe_load((repo / entry / "config.yaml").read_text())
    _, tokenizer = entry_model(repo, entry)
    scaled = 2 * (len(tokenizer.encode(text).ids) + 1) + 10
    return int(min(config["max_new_tokens_limit"], max(config["max_new_tokens"], scaled)))


def offline_text(repo: Path, entry: str, text: str, budget: int, beam: int = 1, penalty: float = 1.0) -> str:
    """``text`` translated by :func:`offline_ids` with the entry's own checkpoint and tokenizer."""
    model, tokenizer = entry_model(repo, entry)
    source = [*tokenizer.encode(text).ids, model.config.eos_id]
    return str(tokenizer.decode(offline_ids(model, source, budget, beam, penalty)))


SERVE_YAML = PROJECT / "deploy" / "ray" / "serve.yaml"


def serve_config(grpc_port: int, http_port: int) -> dict[str, Any]:
    """deploy/ray/serve.yaml with only its two ports changed (to free ephemeral ones)."""
    raw = yaml.safe_load(SERVE_YAML.read_text())
    raw["grpc_options"]["port"], raw["http_options"]["port"] = grpc_port, http_port
    return raw


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C (``serve run`` then shuts the application and its local Ray down), then the whole group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def wait_serving(address: str, timeout: float = 300) -> None:
    """Until the proxy's health Check (answered by a replica) says SERVING. ``serve.run`` already waited for
    the replicas, so this normally passes at once; between tries the proxy is given a moment."""
    deadline, pause, last = time.monotonic() + timeout, threading.Event(), "no answer"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as e:  # no replica routable yet: the proxy says so
                last = f"{e.code()}: {e.details()}"
            pause.wait(0.5)
    raise AssertionError(f"not SERVING after {timeout} s: {last}")
